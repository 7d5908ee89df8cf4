"""Per-token statistics of the softmax over the vocabulary, forward and backward: the log-prob of the target
token, the entropy and the self-certainty of each row of logits, from the whole vocabulary in one launch or
from one vocab slice (a chunk of the fused LM head, kernels/linear_token_stats.py, or a tensor-parallel rank);
Triton kernels and their plain PyTorch references.

    from nanoufo.kernels.token_stats import token_stats
    logp, entropy, self_certainty = token_stats(logits, targets, temperature=0.7)   # each (N,) fp32

The maths, per row, with z = logits / T, p = softmax(z), y the target and V the FULL vocabulary's size:
1. A vocab slice reduces to five statistics (RowStats): m = max z, s = sum e^(z - m), a = sum (z - m) e^(z - m),
   b = sum z and z_y (0 where y lies outside the slice). a is kept relative to m, not as sum z e^(z - m), so a
   confident row's entropy does not come from cancelling two large numbers.
2. Slices merge exactly: relative to the common max m' (r = m - m'), s' = e^r s and a' = e^r (a + r s), since
   z - m' = (z - m) + r; b and z_y add up.
3. Finish: lse = m + log s, logp = z_y - lse, entropy = -sum p log p = log s - a/s, self-certainty = lse - b/V
   (= KL(U || p) + log V, U uniform over the full vocabulary), and mu = E_p[z] = m + a/s for the backward.
4. Backward of g_logp . logp + g_ent . entropy + g_sc . self-certainty, with d lse / d z_j = p_j and
   d p_k / d z_j = p_k ([k = j] - p_j):
     d logp / d z_j = [j = y] - p_j
     d H / d z_j = -p_j (z_j - mu)      (H = lse - mu and d mu / d z_j = p_j + sum_k z_k p_k ([k = j] - p_j)
                                         = p_j (1 + z_j - mu))
     d sc / d z_j = p_j - 1/V
   so dz_j = p_j (g_sc - g_logp - g_ent (z_j - mu)) + g_logp [j = y] - g_sc / V, and dx_j = dz_j / T. A column
   needs only its own logit and the row's lse and mu (p_j = e^(z_j - lse)): a rank or a chunk differentiates
   its slice with no communication.

In the kernels: x is a raw logit and c = log2(e) / T, so e^(z - z') = 2^((x - x') c) and one FFMA forms each
exponent; m, s, a, b are kept in these units (m = max x, s = sum 2^d, a = sum d 2^d with d = (x - m) c, b = sum
x) and turned into natural ones at the end (m / T, s, a ln 2, b / T). Each thread owns lanes of K contiguous
columns with their own running m, s, a, b; the lanes merge (step 2) once, after the loop.
Speed tricks stay only where they lower the SASS instructions per logit of the compiled loop (sm_90, bf16
logits, V = 151936: `python bench/kernel_counts.py --sass`, `--kernel _token_stats_grad_kernel` for the
backward), the count this kernel is tuned against: a bf16 logit is 2 bytes, so a loop that spends many
instructions on each cannot keep up with HBM. Each trick says its reason beside it; bench/RESULTS.md ("Fused
token statistics") has the count with and without each.

Paths: the whole vocabulary on the Triton path is one launch and no host sync (the kernel does steps 1 and 3).
A slice's statistics (a fused head's chunk, a rank's slice) come from the partial kernel or reference, merge
in PyTorch, and under a tensor-parallel group are all-gathered once (no host sync) and finished by PyTorch ops.

Edge cases: a row whose target is ignore_index is masked: its three outputs are 0, it gets no gradient and its
logits are not read. A -inf logit has p = 0 and no gradient, and adds nothing to logp or the entropy; the mean
logit is then -inf, so the self-certainty is +inf (KL(U || p) is infinite). A row that is -inf everywhere but at
the target has logp = 0 and entropy 0 (to rounding); a row that is -inf everywhere is no distribution and gives
NaN, as torch.log_softmax does. A target outside [0, V) makes the row's logp NaN, and a NaN logit all three of
its outputs (never a plausible number), on every path and without a host sync; with debug=True or
NANOUFO_KERNEL_DEBUG=1 they raise instead, naming the first bad row (one host sync).

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_token_stats.py
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import TL_ACC, acc_dtype, debug_mode, pick_impl

LOG2E = tl.constexpr(1.4426950408889634)  # e^x = 2^(x log2 e): exp2 is the GPU's native exponential (one MUFU op)
LN2 = tl.constexpr(0.6931471805599453)  # log2 units back to natural ones
NEG_FINITE = tl.constexpr(-1e30)  # floor for d = x c - m c: at a -inf logit d stays finite, so 2^d = d 2^d = 0
MAX_BLOCK = 4096  # vocab columns per loop step: 8 warps x 32 threads x 16 logits (two 16-byte bf16 loads each)
LANE_COLUMNS = 8  # K: one 16-byte load of bf16 logits per lane and tile


@dataclass(frozen=True)
class SliceConfig:
    """How one vocab slice is reduced: shared by the forward and the backward's recomputation."""
    temperature: float = 1.0
    vocab_start: int = 0  # global id of the slice's first column
    ignore_index: int = -100
    impl: str = "torch"  # already resolved: "triton" or "torch"
    block_size: int | None = None  # Triton block over the vocabulary (None: up to MAX_BLOCK)
    debug: bool = False  # check targets and NaN logits on the device, raise naming the first bad row
    vocab_size: int | None = None  # the full vocabulary's size under a tensor-parallel group (None: gathered)


class RowStats(NamedTuple):
    """Step 1's statistics of a vocab slice in natural units, each (N,), or (K, N) for K slices of the same rows."""
    z_max: torch.Tensor  # m
    exp_sum: torch.Tensor  # s
    centred_sum: torch.Tensor  # a
    z_sum: torch.Tensor  # b
    z_target: torch.Tensor  # z_y, 0 where the target lies outside the slice


def _scaled_logits(logits: torch.Tensor, valid: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    """z = logits / T in the math dtype (N, V), masked rows all -inf."""
    z = logits.to(acc_dtype(logits.dtype)) / cfg.temperature  # (N, V)
    return z.masked_fill(~valid[:, None], float("-inf"))


def _owned_targets(targets, valid, cfg: SliceConfig, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) whether this slice holds the row's target, and its column in the slice (clamped in range)."""
    local = targets - cfg.vocab_start
    return valid & (local >= 0) & (local < n_cols), local.clamp(0, n_cols - 1)


def token_stats_partial_reference(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> RowStats:
    """Step 1: the statistics of a (N, V_slice) block of logits."""
    valid = targets != cfg.ignore_index
    z = _scaled_logits(logits, valid, cfg)  # (N, V)
    m = z.amax(1)  # (N,)
    m_safe = torch.where(m == float("-inf"), 0.0, m)[:, None]  # (N, 1)
    e = torch.exp(z - m_safe)  # (N, V)
    a = torch.where(e > 0, (z - m_safe) * e, 0.0).sum(1)
    b = torch.where(valid[:, None], z, 0.0).sum(1)
    owned, local = _owned_targets(targets, valid, cfg, logits.shape[1])
    z_y = torch.where(owned, z.gather(1, local[:, None])[:, 0], 0.0)
    return RowStats(m, e.sum(1), a, b, z_y)


def merge_slices(slices: RowStats) -> RowStats:
    """Step 2: the statistics of K disjoint vocab slices of the same rows, each field (K, N), merged into (N,)."""
    m = slices.z_max.amax(0)  # (N,)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    shift = slices.z_max - m_safe  # (K, N) r; -inf where a slice saw only -inf, and then s = a = 0
    s = slices.exp_sum
    a = slices.centred_sum + torch.where(s > 0, shift * s, 0.0)
    scale = torch.exp(shift)
    return RowStats(m, (scale * s).sum(0), (scale * a).sum(0), slices.z_sum.sum(0), slices.z_target.sum(0))


# all_gather_into_tensor, the name torch 2.8 knows, is deprecated in newer torch (2.13 here) for all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather_stats(stats: RowStats, n_cols: int, group) -> tuple[RowStats, torch.Tensor]:
    """Vocab-parallel merge in one collective: every rank's statistics and slice width, all-gathered and merged
    exactly in rank order (the same bits on every rank). Returns the full vocabulary's statistics and its size
    as a 0-d tensor (not read on the host)."""
    n = stats.z_max.shape[0]
    packed = torch.cat([*stats, stats.z_max.new_full((1,), float(n_cols))])  # (5N + 1,): the statistics, the width
    gathered = packed.new_empty(dist.get_world_size(group) * packed.numel())  # flat, as gloo wants it
    _all_gather(gathered, packed, group=group)
    gathered = gathered.view(-1, packed.numel())  # (ranks, 5N + 1)
    return merge_slices(RowStats(*gathered[:, :-1].view(-1, 5, n).unbind(1))), gathered[:, -1].sum()


def _raise_bad_target(row: int, target: int, vocab_size: int, ignore_index: int) -> None:
    raise ValueError(f"token_stats: targets[{row}] = {target} is outside the vocabulary [0, {vocab_size}); mark "
                     f"masked rows with ignore_index={ignore_index}")


def _raise_nan_row(row: int) -> None:
    raise ValueError(f"token_stats: row {row} of the logits holds NaN")


def _check_rows(stats: RowStats, targets: torch.Tensor, valid: torch.Tensor, vocab_size: int | torch.Tensor,
                cfg: SliceConfig) -> None:
    """debug: raise naming the first row whose target is outside [0, vocab_size) or whose logits hold NaN."""
    if len(bad := (valid & ((targets < 0) | (targets >= vocab_size))).nonzero()):
        row = int(bad[0, 0])
        _raise_bad_target(row, int(targets[row]), int(vocab_size), cfg.ignore_index)
    if (nan_rows := (valid & stats.z_sum.isnan()).nonzero()).numel():  # a NaN logit makes the sum NaN
        _raise_nan_row(int(nan_rows[0, 0]))


def finish_slice(stats: RowStats, targets: torch.Tensor, n_cols: int, cfg: SliceConfig,
                 group=None) -> tuple[list[torch.Tensor], torch.Tensor, int | torch.Tensor]:
    """Step 3 from the statistics of this rank's slice of n_cols columns: logp, entropy, self-certainty, each
    (N,), (2, N) lse and mu, masked rows 0, and the full vocabulary's size V. group: the tensor-parallel process
    group whose ranks hold the other slices (one all-gather; V is then cfg.vocab_size, or when that is None the
    gathered widths' sum as a 0-d tensor, which the backward reads on the host), or None when the slice is the
    whole vocabulary (V = n_cols). No host sync: a target outside [0, V) gives a NaN logp, as on the one-launch
    path; with cfg.debug the rows are checked on the host and the first bad one named."""
    vocab_size = n_cols
    if group is not None:
        stats, gathered_size = _all_gather_stats(stats, n_cols, group)
        if cfg.debug and cfg.vocab_size is not None and int(gathered_size) != cfg.vocab_size:
            raise ValueError(f"token_stats: vocab_size={cfg.vocab_size} but the ranks' slices hold "
                             f"{int(gathered_size)} columns")
        vocab_size = cfg.vocab_size or gathered_size
    valid = targets != cfg.ignore_index
    if cfg.debug:
        _check_rows(stats, targets, valid, vocab_size, cfg)
    log_s = torch.log(stats.exp_sum)
    lse = stats.z_max + log_s  # (N,)
    a_over_s = stats.centred_sum / stats.exp_sum
    logp = torch.where((targets >= 0) & (targets < vocab_size), stats.z_target - lse, float("nan"))
    outs = (logp, log_s - a_over_s, lse - stats.z_sum / vocab_size)
    lse_mu = torch.stack([lse, stats.z_max + a_over_s])  # (2, N); mu = E_p[z]
    return [torch.where(valid, out, 0.0) for out in outs], torch.where(valid, lse_mu, 0.0), vocab_size


def token_stats_grad_reference(logits, targets, lse, mu, grads, vocab_size: int, cfg: SliceConfig,
                               out_dtype: torch.dtype) -> torch.Tensor:
    """Step 4: dx (N, V_slice); grads = (g_logp, g_ent, g_sc), each (N,) or None (then 0)."""
    valid = targets != cfg.ignore_index
    z = _scaled_logits(logits, valid, cfg)  # (N, V)
    g_logp, g_ent, g_sc = (torch.zeros_like(lse) if g is None else torch.where(valid, g.to(z.dtype), 0.0)
                           for g in grads)  # (N,) each
    p = torch.exp(z - lse[:, None])  # (N, V)
    dz = torch.where(p > 0, p * ((g_sc - g_logp)[:, None] - g_ent[:, None] * (z - mu[:, None])), 0.0)
    owned, local = _owned_targets(targets, valid, cfg, logits.shape[1])
    rows = owned.nonzero()[:, 0]
    dz.index_put_((rows, local[rows]), g_logp[rows], accumulate=True)
    dz = dz - g_sc[:, None] / vocab_size
    return (dz / cfg.temperature).to(out_dtype)


@triton.jit
def _exp2(x, ACC: tl.constexpr):
    # exp2 of exponents formed with log2(e) / T folded in: one FFMA forms each exponent, where tl.exp would
    # multiply by log2(e) again per logit
    if ACC == tl.float64:  # fp64 (gradcheck): exact exp, as the GPU has no fp64 exp2
        return tl.exp(x * LN2)
    else:
        return tl.exp2(x)


@triton.jit
def _rescale(m, s, a, m_new, c, ACC: tl.constexpr):
    """Step 2 inside a kernel: (s, a) of lanes whose max is m re-expressed relative to the larger max m_new."""
    m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(s > 0, (m - m_new_safe) * c, 0.0)  # s = a = 0 while a lane has seen only -inf
    r = _exp2(shift, ACC)
    return r * s, r * (a + shift * s)  # sum (d + shift) 2^(d + shift)


@triton.jit
def _lane_update(x0, x1, m, s, a, c, ACC: tl.constexpr):
    """Fold two (G, K) tiles of logits into the per-lane running statistics, each (G,): one rescale per 2K
    logits, and every reduction stays within a thread."""
    m_new = tl.maximum(m, tl.maximum(tl.max(x0, 1), tl.max(x1, 1)))
    s, a = _rescale(m, s, a, m_new, c, ACC)
    m_c = (tl.where(m_new == float("-inf"), 0.0, m_new) * c)[:, None]
    d0 = tl.maximum(x0 * c - m_c, NEG_FINITE)
    d1 = tl.maximum(x1 * c - m_c, NEG_FINITE)
    e0 = _exp2(d0, ACC)
    e1 = _exp2(d1, ACC)
    return m_new, s + tl.sum(e0 + e1, 1), a + tl.sum(d0 * e0 + d1 * e1, 1)


@triton.jit
def _row_stats(row_ptr, end, c, K: tl.constexpr, GROUPS: tl.constexpr, BF16_PAIRS: tl.constexpr,
               ACC: tl.constexpr):
    """Step 1 over the columns [0, end) of one row, in the kernels' units, merged across lanes. A block is two
    tiles of GROUPS lanes x K columns: lane g holds columns g K + [0, K) of each (with BF16_PAIRS, the low and
    high halves of K 32-bit words, 2 g K + [0, 2K)): which lane holds a column does not matter. Per-lane
    statistics merged once after the loop keep every reduction inside a thread, so the loop has no barrier; one
    running (m, s, a, b) per row, reduced across the block every step as in the textbook online softmax, needs
    cross-thread reductions and barriers at every block."""
    HALF: tl.constexpr = K * GROUPS
    offs = tl.arange(0, GROUPS)[:, None] * K + tl.arange(0, K)[None, :]  # (G, K)
    m = tl.full([GROUPS], float("-inf"), ACC)
    s = tl.zeros([GROUPS], ACC)
    a = tl.zeros([GROUPS], ACC)
    b = tl.zeros([GROUPS], ACC)
    full_end = end // (2 * HALF) * (2 * HALF)
    for start in range(0, full_end, 2 * HALF):  # full blocks: no masks, so no compare and select per logit
        # one 32-bit word = two bf16 logits, each widened to fp32 in one integer op: half the load instructions
        # of two bf16 loads (`--constexpr BF16_PAIRS=0`)
        if BF16_PAIRS:
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
    s, a = _rescale(m, s, a, m_row, c, ACC)
    return m_row, tl.sum(s, 0), tl.sum(a, 0), tl.sum(b, 0)


@triton.jit
def _token_stats_kernel(logits_ptr, targets_ptr, logp_ptr, entropy_ptr, sc_ptr, lse_mu_ptr, bad_ptr, n_rows,
                        n_cols, row_stride, c, inv_temp, ignore_index, DEBUG: tl.constexpr, K: tl.constexpr,
                        GROUPS: tl.constexpr, BF16_PAIRS: tl.constexpr, ACC: tl.constexpr):
    # one program per row of the whole vocabulary: steps 1 and 3
    row = tl.program_id(0).to(tl.int64)  # int64 so row * row_stride cannot overflow past 2^31
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    row_ptr = logits_ptr + row * row_stride
    m, s, a, b = _row_stats(row_ptr, tl.where(valid, n_cols, 0), c, K, GROUPS, BF16_PAIRS, ACC)  # masked: no read
    in_vocab = (target >= 0) & (target < n_cols)
    x_y = tl.load(row_ptr + tl.where(in_vocab, target, 0), mask=valid & in_vocab, other=0.0).to(ACC)
    nan_row = b != b  # a NaN logit anywhere makes the sum of the logits NaN
    s = tl.where(valid, s, 1.0)  # a masked row has s = 0 and writes zeros
    log_s = tl.log(s)
    lse = m * inv_temp + log_s
    a_over_s = a * LN2 / s  # E_p[z] - m / T
    # an out-of-vocabulary target or a NaN logit gives NaN, never a plausible number
    logp = tl.where(in_vocab & ~nan_row, x_y * inv_temp - lse, float("nan"))
    entropy = tl.where(nan_row, float("nan"), log_s - a_over_s)
    self_certainty = lse - b * inv_temp / n_cols
    if DEBUG:  # the first bad row, for the launcher's error message
        tl.atomic_min(bad_ptr, tl.where(valid & ~in_vocab, row, n_rows))
        tl.atomic_min(bad_ptr + 1, tl.where(valid & nan_row, row, n_rows))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))
    tl.store(sc_ptr + row, tl.where(valid, self_certainty, 0.0))
    tl.store(lse_mu_ptr + row, tl.where(valid, lse, 0.0))
    tl.store(lse_mu_ptr + n_rows + row, tl.where(valid, m * inv_temp + a_over_s, 0.0))  # mu = E_p[z]


@triton.jit
def _token_stats_partial_kernel(logits_ptr, targets_ptr, stats_ptr, n_rows, n_cols, row_stride, vocab_start, c,
                                inv_temp, ignore_index, K: tl.constexpr, GROUPS: tl.constexpr,
                                BF16_PAIRS: tl.constexpr, ACC: tl.constexpr):
    # one vocab slice of one row: step 1 in natural units, into the (5, N) rows of RowStats' fields
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    owned = valid & (local >= 0) & (local < n_cols)
    row_ptr = logits_ptr + row * row_stride
    z_y = tl.load(row_ptr + tl.where(owned, local, 0), mask=owned, other=0.0).to(ACC) * inv_temp
    m, s, a, b = _row_stats(row_ptr, tl.where(valid, n_cols, 0), c, K, GROUPS, BF16_PAIRS, ACC)
    tl.store(stats_ptr + row, m * inv_temp)
    tl.store(stats_ptr + n_rows + row, s)
    tl.store(stats_ptr + 2 * n_rows + row, a * LN2)
    tl.store(stats_ptr + 3 * n_rows + row, b * inv_temp)
    tl.store(stats_ptr + 4 * n_rows + row, z_y)


@triton.jit
def _dlogits(x, offs, target_offs, lse_c, mu, coef, g_logp, g_ent, g_sc_v, c, inv_temp, HAS_LOGP: tl.constexpr,
             HAS_ENT: tl.constexpr, ACC: tl.constexpr):
    """Step 4's dx = dz / T of one tile, whose column offsets are offs and the target's target_offs (any offset
    outside the tile: not in it); the row's coefficients come already divided by T."""
    p = _exp2(x * c - lse_c, ACC)
    dx = p * coef - g_sc_v
    if HAS_ENT:
        dx -= g_ent * p * tl.maximum(x * inv_temp - mu, NEG_FINITE)  # p = 0 at a -inf logit: keep the product 0
    if HAS_LOGP:
        dx += tl.where(offs == target_offs, g_logp, 0.0)
    return dx


@triton.jit
def _token_stats_grad_kernel(logits_ptr, targets_ptr, lse_ptr, mu_ptr, g_logp_ptr, g_ent_ptr, g_sc_ptr, grad_ptr,
                             n_cols, row_stride, grad_row_stride, vocab_start, c, inv_temp, inv_vocab, ignore_index,
                             HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SC: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    # one program per row: step 4 over the row's slice
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    lse_c = tl.load(lse_ptr + row).to(ACC) * LOG2E  # p_j = 2^(x_j c - lse log2 e)
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
    # the row's coefficients divided by T once, so dz needs no division by T per logit
    coef, g_logp, g_ent, g_sc_v = coef * inv_temp, g_logp * inv_temp, g_ent * inv_temp, g_sc_v * inv_temp
    # the target's column as int32 and compared as an offset in the tile: one 32-bit compare per logit, where an
    # int64 column, or the column index (widened to 64 bits with the loop counter), costs more
    local = tl.where((local >= 0) & (local < n_cols), local, -1).to(tl.int32)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    live_end = tl.where(valid, n_cols, 0)  # a masked row reads nothing and writes zeros
    full_end = live_end // BLOCK * BLOCK
    offs = tl.arange(0, BLOCK)
    for start in range(0, full_end, BLOCK):  # full blocks: no masks, so no compare and select per logit
        x = tl.load(row_ptr + start + offs).to(ACC)
        dz = _dlogits(x, offs, local - start, lse_c, mu, coef, g_logp, g_ent, g_sc_v, c, inv_temp, HAS_LOGP, HAS_ENT,
                      ACC)
        tl.store(grad_row_ptr + start + offs, dz.to(grad_ptr.dtype.element_ty))
    for start in range(full_end, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < live_end, other=float("-inf")).to(ACC)
        dz = _dlogits(x, offs, local - start, lse_c, mu, coef, g_logp, g_ent, g_sc_v, c, inv_temp, HAS_LOGP, HAS_ENT,
                      ACC)
        tl.store(grad_row_ptr + cols, dz.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


def _block(cfg: SliceConfig, n_cols: int) -> int:
    return cfg.block_size or min(MAX_BLOCK, triton.next_power_of_2(n_cols))


def _lanes(block: int) -> tuple[int, int, int]:
    """(K, GROUPS, num_warps) for a block of two tiles of GROUPS lanes x K columns, a warp per 32 lanes (one
    lane per thread)."""
    k = min(LANE_COLUMNS, max(1, block // 2))
    groups = max(1, block // (2 * k))
    return k, groups, max(1, min(8, groups // 32))


def _bf16_pairs(logits: torch.Tensor) -> bool:
    """Whether full blocks may be read as 32-bit words of two bf16 logits: rows start 4-byte aligned."""
    return logits.dtype == torch.bfloat16 and logits.stride(0) % 2 == 0 and logits.data_ptr() % 4 == 0


def token_stats_triton(logits: torch.Tensor, targets: torch.Tensor,
                       cfg: SliceConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
    """logp, entropy, self-certainty, each (N,), and lse, mu (2, N) of whole-vocabulary rows, in one launch."""
    n, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n,) and targets.dtype == torch.int64
    acc = acc_dtype(logits.dtype)
    outs = [torch.empty(n, dtype=acc, device=logits.device) for _ in range(3)]  # 3 x (N,)
    lse_mu = torch.empty((2, n), dtype=acc, device=logits.device)  # (2, N)
    k, groups, warps = _lanes(_block(cfg, v))
    bad = torch.full((2,), n, dtype=torch.int64, device=logits.device) if cfg.debug else lse_mu  # lse_mu: unused
    _token_stats_kernel[(n,)](logits, targets, *outs, lse_mu, bad, n, v, logits.stride(0),
                              LOG2E.value / cfg.temperature, 1.0 / cfg.temperature, cfg.ignore_index,
                              DEBUG=cfg.debug, K=k, GROUPS=groups, BF16_PAIRS=_bf16_pairs(logits), ACC=TL_ACC[acc],
                              num_warps=warps)
    if cfg.debug:  # the first out-of-vocabulary target or NaN row the kernel recorded (one host sync)
        bad_target, nan_row = bad.tolist()
        if bad_target < n:
            _raise_bad_target(bad_target, int(targets[bad_target]), v, cfg.ignore_index)
        if nan_row < n:
            _raise_nan_row(nan_row)
    return outs, lse_mu


def token_stats_partial_triton(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> RowStats:
    n, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n,) and targets.dtype == torch.int64
    stats = torch.empty((5, n), dtype=acc_dtype(logits.dtype), device=logits.device)  # (5, N)
    k, groups, warps = _lanes(_block(cfg, v))
    _token_stats_partial_kernel[(n,)](logits, targets, stats, n, v, logits.stride(0), cfg.vocab_start,
                                      LOG2E.value / cfg.temperature, 1.0 / cfg.temperature, cfg.ignore_index, K=k,
                                      GROUPS=groups, BF16_PAIRS=_bf16_pairs(logits), ACC=TL_ACC[stats.dtype],
                                      num_warps=warps)
    return RowStats(*stats)


def token_stats_grad_triton(logits, targets, lse, mu, grads, vocab_size: int, cfg: SliceConfig,
                            out_dtype: torch.dtype) -> torch.Tensor:
    n, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == lse.shape == mu.shape == (n,), "rows of unit-stride logits"
    assert all(g is None or g.shape == (n,) for g in grads) and lse.dtype in TL_ACC
    grad = torch.empty((n, v), dtype=out_dtype, device=logits.device)  # (N, V)
    g_logp, g_ent, g_sc = (lse if g is None else g.contiguous() for g in grads)  # lse: unused pointer
    block = _block(cfg, v)
    _token_stats_grad_kernel[(n,)](
        logits, targets, lse, mu, g_logp, g_ent, g_sc, grad, v, logits.stride(0), grad.stride(0), cfg.vocab_start,
        LOG2E.value / cfg.temperature, 1.0 / cfg.temperature, 1.0 / vocab_size, cfg.ignore_index,
        HAS_LOGP=grads[0] is not None, HAS_ENT=grads[1] is not None, HAS_SC=grads[2] is not None, BLOCK=block,
        ACC=TL_ACC[lse.dtype], num_warps=8 if block >= 2048 else 4)
    return grad


def token_stats_partial(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> RowStats:
    """Step 1's statistics of a (N, V_slice) block of logits; no autograd."""
    if cfg.impl == "triton" and logits.shape[0] > 0:  # no rows: no launch
        return token_stats_partial_triton(logits, targets, cfg)
    return token_stats_partial_reference(logits, targets, cfg)


def token_stats_grad(logits, targets, lse, mu, grads, vocab_size: int, cfg: SliceConfig,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """(N, V_slice) gradient w.r.t. the logits block, in out_dtype, given the global lse and mu (N,)."""
    if cfg.impl == "triton" and logits.shape[0] > 0:  # no rows: no launch
        return token_stats_grad_triton(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype)
    return token_stats_grad_reference(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype)


def finished_stats(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig,
                   group=None) -> tuple[list[torch.Tensor], torch.Tensor, int | torch.Tensor]:
    """No autograd: finish_slice's outputs for a logits slice; the whole vocabulary on the Triton path: one launch."""
    if group is None and cfg.vocab_start == 0 and cfg.impl == "triton" and logits.shape[0] > 0:
        return (*token_stats_triton(logits, targets, cfg), logits.shape[1])
    return finish_slice(token_stats_partial(logits, targets, cfg), targets, logits.shape[1], cfg, group)


class _TokenStats(torch.autograd.Function):
    """The finished statistics forward; the backward differentiates the local slice given the global lse and mu
    (no communication)."""

    @staticmethod
    def forward(ctx, logits, targets, cfg: SliceConfig, group):
        outs, lse_mu, vocab_size = finished_stats(logits, targets, cfg, group)
        ctx.save_for_backward(logits, targets, lse_mu)
        ctx.cfg, ctx.vocab_size = cfg, vocab_size
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_sc):
        logits, targets, lse_mu = ctx.saved_tensors
        grads = (g_logp, g_ent, g_sc)
        if not ctx.needs_input_grad[0] or all(g is None for g in grads):
            return None, None, None, None
        vocab_size = int(ctx.vocab_size)  # a 0-d tensor when vocab-parallel without vocab_size: one host read
        return token_stats_grad(logits, targets, *lse_mu, grads, vocab_size, ctx.cfg, logits.dtype), None, None, None


def check_targets_shape(targets: torch.Tensor, n_rows: int, where: str, device: torch.device) -> torch.Tensor:
    if targets.shape != (n_rows,) or targets.dtype.is_floating_point or targets.device != device:
        raise ValueError(f"{where}: targets must be integer of shape ({n_rows},) on {device}, got "
                         f"{targets.dtype} {tuple(targets.shape)} on {targets.device}")
    return targets.long().contiguous()


def token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                vocab_start: int = 0, group=None, ignore_index: int = -100, impl: str = "auto",
                block_size: int | None = None, debug: bool | None = None,
                vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, self_certainty), each (N,) fp32, of logits (N, V) at a temperature, each
    differentiable w.r.t. the logits. With group (vocab-parallel), logits is this rank's slice
    starting at vocab_start and the outputs are those of the full vocabulary on every rank; vocab_size, the
    full vocabulary's size, spares the backward a host read of it. Bad targets, NaN logits and debug: see the
    module doc."""
    if logits.ndim != 2 or not logits.dtype.is_floating_point or logits.shape[1] == 0:
        raise ValueError(f"token_stats: logits must be a float (N, V) tensor with V > 0, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_stats: temperature must be > 0, got {temperature}")
    targets = check_targets_shape(targets, logits.shape[0], "token_stats", logits.device)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    cfg = SliceConfig(temperature, vocab_start, ignore_index, pick_impl(impl, logits), block_size, debug_mode(debug),
                      vocab_size)
    return _TokenStats.apply(logits, targets, cfg, group)
