"""Fused per-token statistics of the softmax over the vocabulary: the log-prob of the target token,
the entropy and the self-certainty, in one pass over the logits, with the
backward of each, a plain PyTorch reference of both passes, and the vocab-parallel form.

    from kernels import token_stats
    logp, entropy, self_certainty = token_stats(logits, targets, temperature=0.7)   # each (N,) fp32

How it works: each row of a vocab slice reduces to five partial statistics of z = logits / T:
the max m, and relative to it s = sum exp(z - m), a = sum (z - m) exp(z - m), b = sum z and z_target
(0 where the target lies outside the slice). Slices (vocab chunks of the fused LM head, or
tensor-parallel ranks) merge by rescaling to the common max; then lse = m + log s,
logp = z_y - lse, entropy = log s - a/s and self-certainty = lse - b/V, V the FULL vocabulary.
(a is kept relative to m, sum (z - m) exp(z - m) rather than sum z exp(z - m), so a confident row's entropy does not
come from cancelling two large numbers.) The backward needs only lse and mu = m + a/s per row, so
a vocab-parallel rank differentiates its own slice with no communication.

When the slice is the whole vocabulary (no group), the Triton forward is one launch and no host sync: the
kernel finishes logp, entropy, self-certainty, lse and mu itself. For few rows it splits each row over
several programs (a 2D grid); the last program of a row to arrive merges their partials. Otherwise the
partials of the slice are all-reduced and finished by PyTorch ops (combine_partial_stats).

Edge cases: a row whose target is ignore_index is masked: its three outputs are 0, it gets no
gradient and its logits are not read. A -inf logit has p = 0 and no gradient, and adds nothing to
logp or the entropy; the mean logit is then -inf, so the self-certainty is +inf (KL(U || p) is
infinite). A row that is -inf everywhere but at the target has logp = 0 and entropy 0 (to rounding); a row
that is -inf everywhere is no distribution and gives NaN, as torch.log_softmax does. A target outside
[0, V) or a NaN logit in a row gives NaN outputs for that row on the one-launch path (never a plausible
number); with debug=True or NANOUFO_KERNEL_DEBUG=1 the launcher raises instead, naming the first bad row
(one host sync). The PyTorch paths and the vocab-parallel combine check the targets on the host and raise.

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_token_stats.py
"""
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.dispatch import pick_impl

M, S, A, B, ZY = range(5)  # rows of a (5, N) statistics tensor
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@dataclass(frozen=True)
class SliceConfig:
    """How one vocab slice is reduced: shared by the forward and the backward's recomputation."""
    temperature: float = 1.0
    vocab_start: int = 0  # global id of the slice's first column
    ignore_index: int = -100
    impl: str = "torch"  # already resolved: "triton" or "torch"
    block_size: int | None = None  # Triton block over the vocabulary (None: up to 4096)
    num_splits: int | None = None  # programs per row, a power of two (None: enough to fill the GPU)
    debug: bool = False  # check targets and NaN logits on the device, raise naming the first bad row


@dataclass
class PartialStats:
    """Per-row statistics of one vocab slice, and what the backward recomputes them from.
    grad_fn(targets, lse, mu, vocab_size, grads, needs_input_grad, *inputs) -> a grad per input."""
    stats: torch.Tensor  # (5, N): m, s, a, b, z_target
    vocab_size: int  # width of the slice
    targets: torch.Tensor  # (N,) global token ids
    inputs: tuple[torch.Tensor, ...]  # differentiable inputs: (logits,) or (hidden, weight)
    grad_fn: Callable
    ignore_index: int


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math dtype: float32 for 16/32-bit inputs; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- Triton kernels
#
# Units inside the kernels: x is a raw logit and z = x / T. With c = log2(e) / T, exp(z - z') = 2^((x - x') c),
# so one FFMA forms each exponent and the temperature costs nothing per logit. Each thread owns lanes of K
# contiguous columns and keeps per lane m = max x, s = sum 2^d and a = sum d 2^d with d = (x - m) c (log2
# units), b = sum x; full blocks load without masks, and the lanes merge once, after the loop. Natural units
# at the end: m / T, s, a ln 2, b / T.

LOG2E = 1.4426950408889634


@triton.jit
def _exp2(x, ACC: tl.constexpr):
    if ACC == tl.float64:  # fp64 (gradcheck): exact exp, as the GPU has no fp64 exp2
        return tl.exp(x * 0.6931471805599453)
    else:
        return tl.exp2(x)


@triton.jit
def _lane_rescale(m, s, a, m_new, c, ACC: tl.constexpr):
    """(s, a) of lanes whose max is m re-expressed relative to the larger max m_new."""
    m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(s > 0, (m - m_new_safe) * c, 0.0)  # s = a = 0 while a lane has seen only -inf
    r = _exp2(shift, ACC)
    return r * s, r * (a + shift * s)  # sum (d + shift) 2^(d + shift)


@triton.jit
def _lane_update(x0, x1, m, s, a, c, ACC: tl.constexpr):
    """Fold two (G, K) tiles of logits into the per-lane running statistics, each (G,): one rescale per 2K
    logits, and every reduction stays within a thread."""
    m_new = tl.maximum(m, tl.maximum(tl.max(x0, 1), tl.max(x1, 1)))
    s, a = _lane_rescale(m, s, a, m_new, c, ACC)
    m_c = (tl.where(m_new == float("-inf"), 0.0, m_new) * c)[:, None]
    d0 = tl.maximum(x0 * c - m_c, -1e30)  # a -inf logit: d finite, 2^d = 0 and d 2^d = 0
    d1 = tl.maximum(x1 * c - m_c, -1e30)
    e0 = _exp2(d0, ACC)
    e1 = _exp2(d1, ACC)
    return m_new, s + tl.sum(e0 + e1, 1), a + tl.sum(d0 * e0 + d1 * e1, 1)


@triton.jit
def _row_stats(row_ptr, lo, end, c, K: tl.constexpr, GROUPS: tl.constexpr, BF16_PAIRS: tl.constexpr,
               ACC: tl.constexpr):
    """(m, s, a, b) over the columns [lo, end) of one row (units as above), merged across lanes. A block is
    two tiles of GROUPS lanes x K columns: lane g holds columns g K + [0, K) of each (with BF16_PAIRS, the
    low and high halves of K 32-bit words, 2 g K + [0, 2K)): which lane holds a column does not matter."""
    HALF: tl.constexpr = K * GROUPS
    offs = tl.arange(0, GROUPS)[:, None] * K + tl.arange(0, K)[None, :]  # (G, K)
    m = tl.full([GROUPS], float("-inf"), ACC)
    s = tl.zeros([GROUPS], ACC)
    a = tl.zeros([GROUPS], ACC)
    b = tl.zeros([GROUPS], ACC)
    full_end = lo + (end - lo) // (2 * HALF) * (2 * HALF)
    for start in range(lo, full_end, 2 * HALF):  # full blocks: no masks
        if BF16_PAIRS:  # one 32-bit word = two bf16 logits; each widens to fp32 in one integer op
            w = tl.load(row_ptr.to(tl.pointer_type(tl.uint32)) + start // 2 + offs)
            x0 = (w << 16).to(tl.float32, bitcast=True).to(ACC)
            x1 = (w & 0xFFFF0000).to(tl.float32, bitcast=True).to(ACC)
        else:
            x0 = tl.load(row_ptr + start + offs).to(ACC)
            x1 = tl.load(row_ptr + start + HALF + offs).to(ACC)
        m, s, a = _lane_update(x0, x1, m, s, a, c, ACC)
        b += tl.sum(x0 + x1, 1)
    for start in range(full_end, end, 2 * HALF):  # the partial last block, if any
        live0 = start + offs < end
        live1 = start + HALF + offs < end
        x0 = tl.load(row_ptr + start + offs, mask=live0, other=float("-inf")).to(ACC)
        x1 = tl.load(row_ptr + start + HALF + offs, mask=live1, other=float("-inf")).to(ACC)
        m, s, a = _lane_update(x0, x1, m, s, a, c, ACC)
        b += tl.sum(tl.where(live0, x0, 0.0) + tl.where(live1, x1, 0.0), 1)
    m_row = tl.max(m, 0)  # the one cross-thread merge
    s, a = _lane_rescale(m, s, a, m_row, c, ACC)
    return m_row, tl.sum(s, 0), tl.sum(a, 0), tl.sum(b, 0)


@triton.jit
def _finish_row(row, target, valid, m, s, a, b, row_ptr, logp_ptr, ent_ptr, sc_ptr, lse_ptr, bad_ptr, n_rows,
                n_cols, inv_temp, DEBUG: tl.constexpr, ACC: tl.constexpr):
    """logp, entropy, self-certainty, lse and mu (the backward's inputs) of one whole-vocabulary row."""
    in_vocab = (target >= 0) & (target < n_cols)
    x_y = tl.load(row_ptr + tl.where(in_vocab, target, 0), mask=valid & in_vocab, other=0.0).to(ACC)
    nan_row = b != b  # a NaN logit anywhere makes the sum of the logits NaN
    s = tl.where(valid, s, 1.0)  # a masked row has s = 0 and writes zeros
    log_s = tl.log(s)
    lse = m * inv_temp + log_s
    a_over_s = a * 0.6931471805599453 / s  # E_p[z] - m / T
    # an out-of-vocabulary target or a NaN logit gives NaN, never a plausible number
    logp = tl.where(in_vocab & ~nan_row, x_y * inv_temp - lse, float("nan"))
    entropy = tl.where(nan_row, float("nan"), log_s - a_over_s)
    self_certainty = lse - b * inv_temp / n_cols
    if DEBUG:  # the first bad row, for the launcher's error message
        tl.atomic_min(bad_ptr, tl.where(valid & ~in_vocab, row, n_rows))
        tl.atomic_min(bad_ptr + 1, tl.where(valid & nan_row, row, n_rows))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, entropy, 0.0))
    tl.store(sc_ptr + row, tl.where(valid, self_certainty, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    tl.store(lse_ptr + n_rows + row, tl.where(valid, m * inv_temp + a_over_s, 0.0))  # mu = E_p[z]


@triton.jit
def _stats_kernel(logits_ptr, targets_ptr, logp_ptr, ent_ptr, sc_ptr, lse_ptr, part_ptr, count_ptr, bad_ptr,
                  n_rows, n_cols, row_stride, cols_per_split, c, inv_temp, ignore_index, SPLIT: tl.constexpr,
                  DEBUG: tl.constexpr, K: tl.constexpr, GROUPS: tl.constexpr, BF16_PAIRS: tl.constexpr,
                  ACC: tl.constexpr):
    # grid (N, SPLIT): program (row, j) reduces columns [j * cols_per_split, +cols_per_split) of the row
    row = tl.program_id(0).to(tl.int64)  # int64 so row * row_stride cannot overflow past 2^31
    split = tl.program_id(1)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    row_ptr = logits_ptr + row * row_stride
    lo = split * cols_per_split
    end = tl.where(valid, tl.maximum(tl.minimum(lo + cols_per_split, n_cols), lo), lo)  # masked: read nothing
    m, s, a, b = _row_stats(row_ptr, lo, end, c, K, GROUPS, BF16_PAIRS, ACC)
    if SPLIT == 1:
        _finish_row(row, target, valid, m, s, a, b, row_ptr, logp_ptr, ent_ptr, sc_ptr, lse_ptr, bad_ptr,
                    n_rows, n_cols, inv_temp, DEBUG, ACC)
    else:
        part = part_ptr + (row * SPLIT + split) * 4
        tl.store(part, m)
        tl.store(part + 1, s)
        tl.store(part + 2, a)
        tl.store(part + 3, b)
        # the last program of the row to arrive merges the SPLIT partials and finishes; the acq_rel atomic
        # makes the other programs' stores visible to it; it re-zeroes the counter for the next launch
        if tl.atomic_add(count_ptr + row, 1) == SPLIT - 1:
            parts = part_ptr + (row * SPLIT + tl.arange(0, SPLIT)) * 4
            ms, ss = tl.load(parts).to(ACC), tl.load(parts + 1).to(ACC)
            as_, bs = tl.load(parts + 2).to(ACC), tl.load(parts + 3).to(ACC)
            m = tl.max(ms, 0)
            ss, as_ = _lane_rescale(ms, ss, as_, m, c, ACC)
            tl.store(count_ptr + row, 0)
            _finish_row(row, target, valid, m, tl.sum(ss, 0), tl.sum(as_, 0), tl.sum(bs, 0), row_ptr, logp_ptr,
                        ent_ptr, sc_ptr, lse_ptr, bad_ptr, n_rows, n_cols, inv_temp, DEBUG, ACC)


@triton.jit
def _partials_kernel(logits_ptr, targets_ptr, stats_ptr, n_rows, n_cols, row_stride, vocab_start, c, inv_temp,
                     ignore_index, K: tl.constexpr, GROUPS: tl.constexpr, BF16_PAIRS: tl.constexpr,
                     ACC: tl.constexpr):
    # one vocab slice of one row: (m, s, a, b, z_target) in natural units, merged by the caller
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    owned = valid & (local >= 0) & (local < n_cols)
    row_ptr = logits_ptr + row * row_stride
    z_y = tl.load(row_ptr + tl.where(owned, local, 0), mask=owned, other=0.0).to(ACC) * inv_temp
    m, s, a, b = _row_stats(row_ptr, 0, tl.where(valid, n_cols, 0), c, K, GROUPS, BF16_PAIRS, ACC)
    tl.store(stats_ptr + row, m * inv_temp)
    tl.store(stats_ptr + n_rows + row, s)
    tl.store(stats_ptr + 2 * n_rows + row, a * 0.6931471805599453)
    tl.store(stats_ptr + 3 * n_rows + row, b * inv_temp)
    tl.store(stats_ptr + 4 * n_rows + row, z_y)


@triton.jit
def _dlogits(x, cols, local, lse_c, mu, coef, g_logp, g_ent, g_sc_v, c, inv_temp, HAS_LOGP: tl.constexpr,
             HAS_ENT: tl.constexpr, ACC: tl.constexpr):
    """dx = dz / T of one tile; the row's coefficients come already divided by T."""
    p = _exp2(x * c - lse_c, ACC)
    dx = p * coef - g_sc_v
    if HAS_ENT:
        dx -= g_ent * p * tl.maximum(x * inv_temp - mu, -1e30)  # p = 0 at a -inf logit: keep the product 0
    if HAS_LOGP:
        dx += tl.where(cols == local, g_logp, 0.0)
    return dx


@triton.jit
def _grad_kernel(logits_ptr, targets_ptr, lse_ptr, mu_ptr, g_logp_ptr, g_ent_ptr, g_sc_ptr, grad_ptr,
                 n_cols, row_stride, grad_row_stride, cols_per_split, vocab_start, c, inv_temp, inv_vocab,
                 ignore_index, HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SC: tl.constexpr,
                 BLOCK: tl.constexpr, ACC: tl.constexpr):
    # With p = softmax(z), z = x / T, lse = log sum_k e^{z_k}, mu = E_p[z] = sum_k p_k z_k:
    #   d logp / d z_j = [j = y] - p_j                              (logp = z_y - lse, d lse / d z_j = p_j)
    #   d H / d z_j = -p_j (z_j - mu)                               (H = lse - mu; d mu / d z_j = p_j (1 + z_j - mu))
    #   d sc / d z_j = p_j - 1 / V                                  (sc = lse - sum_k z_k / V, V the full vocabulary)
    # so dz_j = p_j (-g_logp - g_ent (z_j - mu) + g_sc) + g_logp [j = y] - g_sc / V and dx_j = dz_j / T.
    # Columns of a vocab slice only need the global lse and mu: no communication.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    lse_c = tl.load(lse_ptr + row).to(ACC) * 1.4426950408889634  # p_j = 2^(x_j c - lse log2 e)
    mu = tl.load(mu_ptr + row).to(ACC)
    coef = tl.zeros([], ACC)
    g_logp = tl.zeros([], ACC)
    g_ent = tl.zeros([], ACC)
    g_sc_v = tl.zeros([], ACC)
    if HAS_LOGP:
        g_logp = tl.where(valid, tl.load(g_logp_ptr + row).to(ACC), 0.0)
        coef -= g_logp
    if HAS_SC:
        g_sc = tl.where(valid, tl.load(g_sc_ptr + row).to(ACC), 0.0)
        coef += g_sc
        g_sc_v = g_sc * inv_vocab
    if HAS_ENT:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row).to(ACC), 0.0)
    coef, g_logp, g_ent, g_sc_v = coef * inv_temp, g_logp * inv_temp, g_ent * inv_temp, g_sc_v * inv_temp
    local = tl.where((local >= 0) & (local < n_cols), local, -1).to(tl.int32)  # one 32-bit compare per logit
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    lo = tl.program_id(1) * cols_per_split
    end = tl.maximum(tl.minimum(lo + cols_per_split, n_cols), lo)
    live_end = tl.where(valid, end, lo)  # a masked row reads nothing and writes zeros
    full_end = lo + (live_end - lo) // BLOCK * BLOCK
    for start in range(lo, full_end, BLOCK):  # full blocks: no masks
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols).to(ACC)
        dz = _dlogits(x, cols, local, lse_c, mu, coef, g_logp, g_ent, g_sc_v, c, inv_temp, HAS_LOGP, HAS_ENT, ACC)
        tl.store(grad_row_ptr + cols, dz.to(grad_ptr.dtype.element_ty))
    for start in range(full_end, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < end
        x = tl.load(row_ptr + cols, mask=cols < live_end, other=float("-inf")).to(ACC)
        dz = _dlogits(x, cols, local, lse_c, mu, coef, g_logp, g_ent, g_sc_v, c, inv_temp, HAS_LOGP, HAS_ENT, ACC)
        tl.store(grad_row_ptr + cols, dz.to(grad_ptr.dtype.element_ty), mask=in_row)


def _block(cfg: SliceConfig, n_cols: int) -> int:
    return cfg.block_size or min(4096, triton.next_power_of_2(n_cols))


def _lanes(block: int) -> tuple[int, int, int]:
    """(K, GROUPS, num_warps) for a block of two tiles of GROUPS lanes x K columns; K = 8 is one 16-byte
    load of bf16 logits, and a warp per 32 lanes (one lane per thread)."""
    k = min(8, max(1, block // 2))
    groups = max(1, block // (2 * k))
    return k, groups, max(1, min(8, groups // 32))


def _bf16_pairs(logits: torch.Tensor) -> bool:
    """Whether full blocks may be read as 32-bit words of two bf16 logits: rows start 4-byte aligned."""
    return logits.dtype == torch.bfloat16 and logits.stride(0) % 2 == 0 and logits.data_ptr() % 4 == 0


def _splits(cfg: SliceConfig, n_rows: int, n_cols: int, block: int, device: torch.device) -> int:
    """Programs per row (a power of two): enough that a few rows still fill every SM of a GPU."""
    if cfg.num_splits is not None:
        return cfg.num_splits
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    most = max(1, n_cols // block)  # every split keeps at least one full block
    return min(triton.next_power_of_2(triton.cdiv(programs, n_rows)), 1 << (most.bit_length() - 1))


def _cols_per_split(n_cols: int, splits: int, block: int) -> int:
    return triton.cdiv(triton.cdiv(n_cols, splits), block) * block  # whole blocks: aligned, unmasked loads


_ARRIVALS: dict[torch.device, torch.Tensor] = {}  # per-row arrival counters of the split kernel, kept zeroed


def _arrivals(n_rows: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per row; the kernel leaves it zeroed, so only growing it costs a launch.
    Calls on one device must not overlap (one stream), as they share the counters."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < n_rows:
        counters = _ARRIVALS[device] = torch.zeros(max(n_rows, 1024), dtype=torch.int32, device=device)
    return counters


def _raise_bad_rows(bad: torch.Tensor, targets: torch.Tensor, n_rows: int, vocab_size: int, ignore_index: int,
                    where: str) -> None:
    """Debug mode: the first out-of-vocabulary target or NaN row the kernel recorded (one host sync)."""
    bad_target, nan_row = bad.tolist()
    if bad_target < n_rows:
        raise ValueError(f"{where}: targets[{bad_target}] = {int(targets[bad_target])} is outside the vocabulary "
                         f"[0, {vocab_size}); mark masked rows with ignore_index={ignore_index}")
    if nan_row < n_rows:
        raise ValueError(f"{where}: row {nan_row} of the logits holds NaN")


def _stats_triton(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> tuple[torch.Tensor, ...]:
    """logp, entropy, self-certainty, each (N,), and lse, mu (2, N) of whole-vocabulary rows, in one launch."""
    n, v = logits.shape
    acc = acc_dtype(logits.dtype)
    outs = [torch.empty(n, dtype=acc, device=logits.device) for _ in range(3)]  # 3 x (N,)
    lse_mu = torch.empty((2, n), dtype=acc, device=logits.device)  # (2, N)
    block = _block(cfg, v)
    k, groups, warps = _lanes(block)
    splits = _splits(cfg, n, v, block, logits.device)
    parts = torch.empty((n, splits, 4), dtype=acc, device=logits.device) if splits > 1 else lse_mu  # (N, S, 4)
    counts = _arrivals(n, logits.device) if splits > 1 else lse_mu  # lse_mu: an unused pointer
    bad = torch.full((2,), n, dtype=torch.int64, device=logits.device) if cfg.debug else lse_mu
    _stats_kernel[(n, splits)](logits, targets, *outs, lse_mu, parts, counts, bad, n, v, logits.stride(0),
                               _cols_per_split(v, splits, block), LOG2E / cfg.temperature, 1.0 / cfg.temperature,
                               cfg.ignore_index, SPLIT=splits, DEBUG=cfg.debug, K=k, GROUPS=groups,
                               BF16_PAIRS=_bf16_pairs(logits), ACC=_TL_ACC[acc], num_warps=warps)
    if cfg.debug:
        _raise_bad_rows(bad, targets, n, v, cfg.ignore_index, "token_stats")
    return outs, lse_mu


def _partials_triton(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    n, v = logits.shape
    stats = torch.empty((5, n), dtype=acc_dtype(logits.dtype), device=logits.device)  # (5, N)
    k, groups, warps = _lanes(_block(cfg, v))
    _partials_kernel[(n,)](logits, targets, stats, n, v, logits.stride(0), cfg.vocab_start,
                           LOG2E / cfg.temperature, 1.0 / cfg.temperature, cfg.ignore_index, K=k, GROUPS=groups,
                           BF16_PAIRS=_bf16_pairs(logits), ACC=_TL_ACC[stats.dtype], num_warps=warps)
    return stats


def _grad_triton(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype) -> torch.Tensor:
    n, v = logits.shape
    grad = torch.empty((n, v), dtype=out_dtype, device=logits.device)  # (N, V)
    g_logp, g_ent, g_sc = (lse if g is None else g.contiguous() for g in grads)  # lse: unused pointer
    block = _block(cfg, v)
    splits = _splits(cfg, n, v, block, logits.device)
    _grad_kernel[(n, splits)](logits, targets, lse, mu, g_logp, g_ent, g_sc, grad, v, logits.stride(0),
                              grad.stride(0), _cols_per_split(v, splits, block), cfg.vocab_start,
                              LOG2E / cfg.temperature, 1.0 / cfg.temperature, 1.0 / vocab_size, cfg.ignore_index,
                              HAS_LOGP=grads[0] is not None, HAS_ENT=grads[1] is not None,
                              HAS_SC=grads[2] is not None, BLOCK=block, ACC=_TL_ACC[lse.dtype],
                              num_warps=8 if block >= 2048 else 4)
    return grad


# ----------------------------------------------------------------------------- PyTorch reference

def _scaled_logits(logits: torch.Tensor, valid: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    z = logits.to(acc_dtype(logits.dtype)) / cfg.temperature  # (N, V)
    return z.masked_fill(~valid[:, None], float("-inf"))


def _owned_targets(targets, valid, cfg, n_cols) -> tuple[torch.Tensor, torch.Tensor]:
    local = targets - cfg.vocab_start  # (N,) column of the target in this slice
    return valid & (local >= 0) & (local < n_cols), local.clamp(0, n_cols - 1)


def _partials_torch(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    valid = targets != cfg.ignore_index
    z = _scaled_logits(logits, valid, cfg)  # (N, V)
    m = z.amax(1)  # (N,)
    m_safe = torch.where(m == float("-inf"), 0.0, m)[:, None]  # (N, 1)
    e = torch.exp(z - m_safe)  # (N, V)
    a = torch.where(e > 0, (z - m_safe) * e, 0.0).sum(1)
    b = torch.where(valid[:, None], z, 0.0).sum(1)
    owned, local = _owned_targets(targets, valid, cfg, logits.shape[1])
    z_y = torch.where(owned, z.gather(1, local[:, None])[:, 0], 0.0)
    return torch.stack([m, e.sum(1), a, b, z_y])  # (5, N)


def _grad_torch(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype) -> torch.Tensor:
    # dz_j = p_j (-g_logp - g_ent (z_j - mu) + g_sc) + g_logp [j = y] - g_sc / V, dx = dz / T (derived at
    # _grad_kernel)
    valid = targets != cfg.ignore_index
    z = _scaled_logits(logits, valid, cfg)  # (N, V)
    g_logp, g_ent, g_sc = (None if g is None else torch.where(valid, g.to(z.dtype), 0.0) for g in grads)
    coef = torch.zeros_like(lse)  # (N,)
    coef = coef - g_logp if g_logp is not None else coef
    coef = coef + g_sc if g_sc is not None else coef
    inner = coef[:, None] if g_ent is None else coef[:, None] - g_ent[:, None] * (z - mu[:, None])
    p = torch.exp(z - lse[:, None])  # (N, V)
    dz = torch.where(p > 0, p * inner, 0.0)
    if g_logp is not None:
        owned, local = _owned_targets(targets, valid, cfg, logits.shape[1])
        rows = owned.nonzero()[:, 0]
        dz.index_put_((rows, local[rows]), g_logp[rows], accumulate=True)
    if g_sc is not None:
        dz = dz - g_sc[:, None] / vocab_size
    return (dz / cfg.temperature).to(out_dtype)


# ----------------------------------------------------------------------------- dispatch on a slice

def slice_partials(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    """(5, N) partial statistics of a (N, V_slice) block of logits; no autograd."""
    if logits.shape[0] == 0:
        return logits.new_zeros((5, 0), dtype=acc_dtype(logits.dtype))
    run = _partials_triton if cfg.impl == "triton" else _partials_torch
    return run(logits, targets, cfg)


def slice_grad(logits, targets, lse, mu, grads, vocab_size: int, cfg: SliceConfig,
               out_dtype: torch.dtype) -> torch.Tensor:
    """(N, V_slice) gradient w.r.t. the logits block, in out_dtype, given the global lse and mu."""
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape, dtype=out_dtype, device=logits.device)
    run = _grad_triton if cfg.impl == "triton" else _grad_torch
    return run(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype)


# ----------------------------------------------------------------------------- merging and finishing

def _rescale(stats: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s and a of stats (..., 5, N) re-expressed relative to a new, larger max m (N,)."""
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    shift = stats[..., M, :] - m_safe  # -inf where a slice saw only -inf, and then s = a = 0
    s = stats[..., S, :]
    a = stats[..., A, :] + torch.where(s > 0, shift * s, 0.0)
    scale = torch.exp(shift)
    return scale * s, scale * a


def merge_partial_stats(stats: torch.Tensor) -> torch.Tensor:
    """Merge the (K, 5, N) statistics of K disjoint vocab slices of the same rows into (5, N)."""
    m = stats[:, M].amax(0)  # (N,)
    s, a = _rescale(stats, m)  # (K, N) each
    return torch.stack([m, s.sum(0), a.sum(0), stats[:, B].sum(0), stats[:, ZY].sum(0)])


def _all_reduce_stats(stats: torch.Tensor, vocab_size: int, group) -> tuple[torch.Tensor, int]:
    """Vocab-parallel merge: all-reduce MAX of m, then one packed all-reduce SUM of s, a, b, z_y, V."""
    m = stats[M].clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s, a = _rescale(stats, m)
    packed = torch.cat([torch.stack([s, a, stats[B], stats[ZY]]).flatten(), stats.new_tensor([vocab_size])])
    dist.all_reduce(packed, group=group)
    return torch.cat([m[None], packed[:-1].view(4, -1)]), int(packed[-1].item())


def _check_targets(targets: torch.Tensor, valid: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    bad = (valid & ((targets < 0) | (targets >= vocab_size))).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise ValueError(f"token_stats: targets[{row}] = {int(targets[row])} is outside the vocabulary "
                         f"[0, {vocab_size}); mark masked rows with ignore_index={ignore_index}")


def finish_stats(stats: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int,
                 debug: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """From the merged (5, N) statistics: logp, entropy, self-certainty, each (N,), and (2, N) lse, mu;
    masked rows 0. Checks the targets on the host (a sync), and in debug mode the rows for NaN."""
    valid = targets != ignore_index
    _check_targets(targets, valid, vocab_size, ignore_index)
    if debug and (nan_rows := (valid & stats[B].isnan()).nonzero()).numel():
        raise ValueError(f"token_stats: row {int(nan_rows[0, 0])} of the logits holds NaN")
    log_s = torch.log(stats[S])
    lse = stats[M] + log_s  # (N,)
    a_over_s = stats[A] / stats[S]
    outs = (stats[ZY] - lse, log_s - a_over_s, lse - stats[B] / vocab_size)
    lse_mu = torch.stack([lse, stats[M] + a_over_s])  # (2, N); mu = E_p[z]
    return [torch.where(valid, out, 0.0) for out in outs], torch.where(valid, lse_mu, 0.0)


def finished_stats(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig, group=None,
                   vocab_size: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """No autograd: (logp, entropy, self-certainty) and (2, N) lse, mu of a logits slice. Without a group
    the slice is the whole vocabulary: one launch on the Triton path. With one, the partials of every
    rank are all-reduced first (vocab_size: this slice's width, default logits.shape[1])."""
    if group is None and cfg.impl == "triton" and logits.shape[0] > 0:
        return _stats_triton(logits, targets, cfg)
    stats, width = slice_partials(logits, targets, cfg), vocab_size or logits.shape[1]
    if group is not None:
        stats, width = _all_reduce_stats(stats, width, group)
    return finish_stats(stats, targets, width, cfg.ignore_index, cfg.debug)


class _TokenStats(torch.autograd.Function):
    """Hands out the finished logp, entropy, self-certainty (computed without autograd); the backward
    differentiates the local slice given the global lse and mu (no communication)."""

    @staticmethod
    def forward(ctx, grad_fn, targets, vocab_size, outs, lse_mu, *inputs):
        ctx.save_for_backward(targets, lse_mu, *inputs)
        ctx.grad_fn, ctx.vocab_size = grad_fn, vocab_size
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_sc):
        targets, lse_mu, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        grads = (g_logp, g_ent, g_sc)
        if not any(needs) or all(g is None for g in grads):
            return (None,) * (5 + len(inputs))
        return (None,) * 5 + tuple(ctx.grad_fn(targets, lse_mu[0], lse_mu[1], ctx.vocab_size, grads, needs,
                                               *inputs))


def combine_partial_stats(partials: PartialStats, group=None, debug: bool = False) -> tuple[torch.Tensor, ...]:
    """(logp, entropy, self_certainty), each (N,), from this rank's PartialStats. group: the
    tensor-parallel process group whose ranks hold the other vocab slices, or None when the slice is
    the whole vocabulary. Forward: two all-reduces; backward: none (each rank's input gradients
    cover its own slice)."""
    stats, vocab_size = partials.stats, partials.vocab_size
    if group is not None:
        stats, vocab_size = _all_reduce_stats(stats, vocab_size, group)
    outs, lse_mu = finish_stats(stats.detach(), partials.targets, vocab_size, partials.ignore_index, debug)
    return _TokenStats.apply(partials.grad_fn, partials.targets, vocab_size, outs, lse_mu, *partials.inputs)


# ----------------------------------------------------------------------------- public API

def check_targets_shape(targets: torch.Tensor, n_rows: int, where: str, device: torch.device) -> torch.Tensor:
    if targets.shape != (n_rows,) or targets.dtype.is_floating_point or targets.device != device:
        raise ValueError(f"{where}: targets must be integer of shape ({n_rows},) on {device}, got "
                         f"{targets.dtype} {tuple(targets.shape)} on {targets.device}")
    return targets.long().contiguous()


def debug_mode(debug: bool | None) -> bool:
    """debug=None follows NANOUFO_KERNEL_DEBUG=1: device-side checks that name the first bad row."""
    return os.environ.get("NANOUFO_KERNEL_DEBUG") == "1" if debug is None else debug


def _logits_grad(cfg: SliceConfig, targets, lse, mu, vocab_size, grads, needs, logits):
    return (slice_grad(logits, targets, lse, mu, grads, vocab_size, cfg, logits.dtype),)


def _prepare(logits: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_start: int, ignore_index: int,
             impl: str, block_size: int | None, num_splits: int | None, debug: bool | None):
    """Checked, contiguous inputs and the SliceConfig; errors name the argument."""
    if logits.ndim != 2 or not logits.dtype.is_floating_point or logits.shape[1] == 0:
        raise ValueError(f"token_stats: logits must be a float (N, V) tensor with V > 0, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_stats: temperature must be > 0, got {temperature}")
    if num_splits is not None and (num_splits < 1 or num_splits & (num_splits - 1)):
        raise ValueError(f"token_stats: num_splits must be a power of two, got {num_splits}")
    targets = check_targets_shape(targets, logits.shape[0], "token_stats", logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    cfg = SliceConfig(temperature, vocab_start, ignore_index, pick_impl(impl, logits), block_size, num_splits,
                      debug_mode(debug))
    return logits, targets, cfg


def logits_partial_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                         vocab_start: int = 0, ignore_index: int = -100, impl: str = "auto",
                         block_size: int | None = None) -> PartialStats:
    """Partial statistics of logits (N, V_slice) holding global vocab ids [vocab_start, +V_slice)."""
    logits, targets, cfg = _prepare(logits, targets, temperature, vocab_start, ignore_index, impl, block_size,
                                    None, False)
    with torch.no_grad():
        stats = slice_partials(logits, targets, cfg)
    return PartialStats(stats, logits.shape[1], targets, (logits,), partial(_logits_grad, cfg), ignore_index)


def token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                vocab_start: int = 0, group=None, ignore_index: int = -100, impl: str = "auto",
                block_size: int | None = None, num_splits: int | None = None,
                debug: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, self_certainty), each (N,) fp32, of logits (N, V) at a temperature, each
    differentiable w.r.t. the logits. With group (vocab-parallel), logits is this rank's slice
    starting at vocab_start and the outputs are those of the full vocabulary on every rank.

    The whole vocabulary (no group) on the Triton path is one kernel launch and no host sync: a target
    outside [0, V) or a NaN logit gives NaN outputs for that row; debug=True (or NANOUFO_KERNEL_DEBUG=1)
    raises instead, naming the first bad row (one sync). num_splits: programs per row (a power of two;
    None: enough to fill the GPU when N is small)."""
    if group is not None or vocab_start != 0:
        partials = logits_partial_stats(logits, targets, temperature, vocab_start=vocab_start,
                                        ignore_index=ignore_index, impl=impl, block_size=block_size)
        return combine_partial_stats(partials, group, debug_mode(debug))
    logits, targets, cfg = _prepare(logits, targets, temperature, 0, ignore_index, impl, block_size, num_splits,
                                    debug)
    with torch.no_grad():
        outs, lse_mu = finished_stats(logits, targets, cfg)
    return _TokenStats.apply(partial(_logits_grad, cfg), targets, logits.shape[1], outs, lse_mu, logits)
