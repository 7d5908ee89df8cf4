"""The per-row statistics of a softmax over one vocab slice, shared by kernels/token_stats.py (forward),
kernels/token_stats_grad.py (backward) and the fused LM heads: the slice's configuration, the Triton
reduction of a row, the launch geometry, and the exact merge of slices in PyTorch.

A row of a slice reduces to five numbers of z = logits / T: the max m, and relative to it s = sum e^(z - m),
a = sum (z - m) e^(z - m), b = sum z and z_target (0 where the target lies outside the slice). Slices (the
vocab chunks of a fused head, tensor-parallel ranks, the programs of one row) merge by re-expressing each
relative to the common max m' (r = m - m'): s' = e^r s, a' = e^r (a + r s), since z - m' = (z - m) + r.
(a is kept relative to m rather than as sum z e^(z - m), so a confident row's entropy does not come from
cancelling two large numbers.)

Units inside the kernels: x is a raw logit. With c = log2(e) / T, e^(z - z') = 2^((x - x') c), so one FFMA
forms each exponent and the temperature costs nothing per logit. Each thread owns lanes of K contiguous
columns and keeps per lane m = max x, s = sum 2^d and a = sum d 2^d with d = (x - m) c (log2 units),
b = sum x; full blocks load without masks, and the lanes merge once, after the loop. Natural units at the
end: m / T, s, a ln 2, b / T.

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_token_stats.py
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import acc_dtype

M, S, A, B, ZY = range(5)  # rows of a (5, N) statistics tensor
LOG2E = 1.4426950408889634  # e^x = 2^(x log2 e): exp2 is the GPU's native exponential (one MUFU op)
LOG2E_TL = tl.constexpr(LOG2E)  # the same, readable inside @triton.jit code
LN2_TL = tl.constexpr(0.6931471805599453)  # log2 units back to natural ones
NEG_FINITE = tl.constexpr(-1e30)  # floor for d = x c - m c: at a -inf logit d stays finite, so 2^d = d 2^d = 0
MAX_BLOCK = 4096  # vocab columns per loop step: 8 warps x 32 threads x 16 logits (two 16-byte bf16 loads each)
PROGRAMS_PER_SM = 4  # when rows are few, split them until each SM runs a few programs, whose loads overlap


@dataclass(frozen=True)
class SliceConfig:
    """How one vocab slice is reduced: shared by the forward and the backward's recomputation."""
    temperature: float = 1.0
    vocab_start: int = 0  # global id of the slice's first column
    ignore_index: int = -100
    impl: str = "torch"  # already resolved: "triton" or "torch"
    block_size: int | None = None  # Triton block over the vocabulary (None: up to MAX_BLOCK)
    num_splits: int | None = None  # programs per row, a power of two (None: enough to fill the GPU)
    debug: bool = False  # check targets and NaN logits on the device, raise naming the first bad row
    vocab_size: int | None = None  # the full vocabulary's size under a tensor-parallel group (None: gathered)


def scaled_logits(logits: torch.Tensor, valid: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    """Reference: z = logits / T in the math dtype (N, V), masked rows all -inf."""
    z = logits.to(acc_dtype(logits.dtype)) / cfg.temperature  # (N, V)
    return z.masked_fill(~valid[:, None], float("-inf"))


def owned_targets(targets, valid, cfg: SliceConfig, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) whether this slice holds the row's target, and its column in the slice (clamped in range)."""
    local = targets - cfg.vocab_start
    return valid & (local >= 0) & (local < n_cols), local.clamp(0, n_cols - 1)


@triton.jit
def exp2_acc(x, ACC: tl.constexpr):
    if ACC == tl.float64:  # fp64 (gradcheck): exact exp, as the GPU has no fp64 exp2
        return tl.exp(x * LN2_TL)
    else:
        return tl.exp2(x)


@triton.jit
def lane_rescale(m, s, a, m_new, c, ACC: tl.constexpr):
    """(s, a) of lanes whose max is m re-expressed relative to the larger max m_new."""
    m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(s > 0, (m - m_new_safe) * c, 0.0)  # s = a = 0 while a lane has seen only -inf
    r = exp2_acc(shift, ACC)
    return r * s, r * (a + shift * s)  # sum (d + shift) 2^(d + shift)


@triton.jit
def _lane_update(x0, x1, m, s, a, c, ACC: tl.constexpr):
    """Fold two (G, K) tiles of logits into the per-lane running statistics, each (G,): one rescale per 2K
    logits, and every reduction stays within a thread."""
    m_new = tl.maximum(m, tl.maximum(tl.max(x0, 1), tl.max(x1, 1)))
    s, a = lane_rescale(m, s, a, m_new, c, ACC)
    m_c = (tl.where(m_new == float("-inf"), 0.0, m_new) * c)[:, None]
    d0 = tl.maximum(x0 * c - m_c, NEG_FINITE)
    d1 = tl.maximum(x1 * c - m_c, NEG_FINITE)
    e0 = exp2_acc(d0, ACC)
    e1 = exp2_acc(d1, ACC)
    return m_new, s + tl.sum(e0 + e1, 1), a + tl.sum(d0 * e0 + d1 * e1, 1)


@triton.jit
def row_stats(row_ptr, lo, end, c, K: tl.constexpr, GROUPS: tl.constexpr, BF16_PAIRS: tl.constexpr,
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
    s, a = lane_rescale(m, s, a, m_row, c, ACC)
    return m_row, tl.sum(s, 0), tl.sum(a, 0), tl.sum(b, 0)


@triton.jit
def split_columns(split, n_splits, n_cols, BLOCK: tl.constexpr):
    """[lo, hi): the columns of a row that program `split` of n_splits reads: whole blocks (aligned, unmasked
    loads), n_blocks // n_splits or one more each, so no program is idle while n_splits <= n_blocks (equal
    widths rounded up to whole blocks left 13 of 32 programs without a column at V = 151936)."""
    n_blocks = tl.cdiv(n_cols, BLOCK)
    lo = split * n_blocks // n_splits * BLOCK
    return lo, tl.minimum((split + 1) * n_blocks // n_splits * BLOCK, n_cols)


def block_of(cfg: SliceConfig, n_cols: int) -> int:
    return cfg.block_size or min(MAX_BLOCK, triton.next_power_of_2(n_cols))


def lanes(block: int) -> tuple[int, int, int]:
    """(K, GROUPS, num_warps) for a block of two tiles of GROUPS lanes x K columns; K = 8 is one 16-byte
    load of bf16 logits, and a warp per 32 lanes (one lane per thread)."""
    k = min(8, max(1, block // 2))
    groups = max(1, block // (2 * k))
    return k, groups, max(1, min(8, groups // 32))


def bf16_pairs(logits: torch.Tensor) -> bool:
    """Whether full blocks may be read as 32-bit words of two bf16 logits: rows start 4-byte aligned."""
    return logits.dtype == torch.bfloat16 and logits.stride(0) % 2 == 0 and logits.data_ptr() % 4 == 0


def multiprocessors(device: torch.device) -> int:
    """The SMs of a CUDA device; 0 elsewhere (the interpreter runs one program per row unless told)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def splits_of(cfg: SliceConfig, n_rows: int, n_cols: int, block: int, sms: int) -> int:
    """Programs per row (a power of two): enough that a few rows still fill every one of a GPU's sms SMs."""
    if cfg.num_splits is not None:
        return cfg.num_splits
    if not sms:
        return 1
    programs = PROGRAMS_PER_SM * sms
    most = max(1, n_cols // block)  # every split keeps at least one full block
    return min(triton.next_power_of_2(triton.cdiv(programs, n_rows)), 1 << (most.bit_length() - 1))


def rescale(stats: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    s, a = rescale(stats, m)  # (K, N) each
    return torch.stack([m, s.sum(0), a.sum(0), stats[:, B].sum(0), stats[:, ZY].sum(0)])
