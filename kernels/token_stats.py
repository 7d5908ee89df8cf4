"""Fused per-token statistics of the softmax over the vocabulary: the log-prob of the target token,
the entropy and the self-certainty, in one pass over the logits (DESIGN.md section 4), with the
backward of each, a plain PyTorch reference of both passes, and the vocab-parallel form.

    from kernels import token_stats
    logp, entropy, self_certainty = token_stats(logits, targets, temperature=0.7)   # each (N,) fp32

How it works: each row of a vocab slice reduces to five partial statistics of z = logits / T:
the max m, and relative to it s = sum exp(z - m), a = sum (z - m) exp(z - m), b = sum z and z_target
(0 where the target lies outside the slice). Slices (vocab chunks of the fused LM head, or
tensor-parallel ranks) merge by rescaling to the common max; then lse = m + log s,
logp = z_y - lse, entropy = log s - a/s and self-certainty = lse - b/V, V the FULL vocabulary.
(a is kept relative to m, unlike DESIGN.md's sum z exp(z - m), so a confident row's entropy does not
come from cancelling two large numbers.) The backward needs only lse and mu = m + a/s per row, so
a vocab-parallel rank differentiates its own slice with no communication.

Edge cases: a row whose target is ignore_index is masked: its three outputs are 0, it gets no
gradient and its logits are not read. A -inf logit has p = 0 and no gradient, and adds nothing to
logp or the entropy; the mean logit is then -inf, so the self-certainty is +inf (KL(U || p) is
infinite). A row that is -inf everywhere but at the target has logp = 0 and entropy 0 (to rounding); a row that is
-inf everywhere is no distribution and gives NaN, as torch.log_softmax does.

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_token_stats.py
"""
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

@triton.jit
def _partials_kernel(logits_ptr, targets_ptr, stats_ptr, n_rows, n_cols, row_stride, vocab_start,
                     inv_temp, ignore_index, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 so row * row_stride cannot overflow past 2^31
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    owned = valid & (local >= 0) & (local < n_cols)
    row_ptr = logits_ptr + row * row_stride
    z_y = tl.load(row_ptr + tl.where(owned, local, 0), mask=owned, other=0.0).to(ACC) * inv_temp
    n_live = tl.where(valid, n_cols, 0)  # a masked row loads nothing
    m = tl.full([], float("-inf"), ACC)
    # per-lane sums, reduced once after the loop; only the max is reduced per block
    s = tl.zeros([BLOCK], ACC)
    a = tl.zeros([BLOCK], ACC)
    b = tl.zeros([BLOCK], ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        live = cols < n_live
        z = tl.load(row_ptr + cols, mask=live, other=float("-inf")).to(ACC) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp(-inf - -inf) would be NaN
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)  # s and a are 0 while m is -inf
        scale = tl.exp(shift)
        e = tl.exp(z - m_safe)
        a = scale * (a + shift * s) + tl.where(e > 0, z - m_safe, 0.0) * e  # no -inf * 0
        s = scale * s + e
        b += tl.where(live, z, 0.0)
        m = m_new
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + n_rows + row, tl.sum(s, 0))
    tl.store(stats_ptr + 2 * n_rows + row, tl.sum(a, 0))
    tl.store(stats_ptr + 3 * n_rows + row, tl.sum(b, 0))
    tl.store(stats_ptr + 4 * n_rows + row, z_y)


@triton.jit
def _grad_kernel(logits_ptr, targets_ptr, lse_ptr, mu_ptr, g_logp_ptr, g_ent_ptr, g_sc_ptr, grad_ptr,
                 n_cols, row_stride, grad_row_stride, vocab_start, inv_temp, inv_vocab, ignore_index,
                 HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SC: tl.constexpr,
                 BLOCK: tl.constexpr, ACC: tl.constexpr):
    # dz_j = p_j (-g_logp - g_ent (z_j - mu) + g_sc) + g_logp [j = y] - g_sc / V; dx = dz / T
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    lse = tl.load(lse_ptr + row).to(ACC)
    mu = tl.load(mu_ptr + row).to(ACC)
    coef = tl.zeros([], ACC)
    if HAS_LOGP:
        g_logp = tl.where(valid, tl.load(g_logp_ptr + row).to(ACC), 0.0)
        coef -= g_logp
    if HAS_SC:
        g_sc = tl.where(valid, tl.load(g_sc_ptr + row).to(ACC), 0.0)
        coef += g_sc
    if HAS_ENT:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row).to(ACC), 0.0)
    n_live = tl.where(valid, n_cols, 0)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=cols < n_live, other=float("-inf")).to(ACC) * inv_temp
        p = tl.exp(z - lse)
        inner = coef
        if HAS_ENT:
            inner = coef - g_ent * (tl.where(p > 0, z, mu) - mu)  # p = 0 at -inf: keep inner finite
        dz = p * inner
        if HAS_LOGP:
            dz += tl.where(cols == local, g_logp, 0.0)
        if HAS_SC:
            dz -= g_sc * inv_vocab
        tl.store(grad_row_ptr + cols, (dz * inv_temp).to(grad_ptr.dtype.element_ty), mask=in_row)


def _block(cfg: SliceConfig, n_cols: int) -> int:
    return cfg.block_size or min(4096, triton.next_power_of_2(n_cols))


def _partials_triton(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    n, v = logits.shape
    stats = torch.empty((5, n), dtype=acc_dtype(logits.dtype), device=logits.device)  # (5, N)
    block = _block(cfg, v)
    _partials_kernel[(n,)](logits, targets, stats, n, v, logits.stride(0), cfg.vocab_start,
                           1.0 / cfg.temperature, cfg.ignore_index, BLOCK=block,
                           ACC=_TL_ACC[stats.dtype], num_warps=8 if block >= 2048 else 4)
    return stats


def _grad_triton(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype) -> torch.Tensor:
    n, v = logits.shape
    grad = torch.empty((n, v), dtype=out_dtype, device=logits.device)  # (N, V)
    g_logp, g_ent, g_sc = (lse if g is None else g.contiguous() for g in grads)  # lse: unused pointer
    block = _block(cfg, v)
    _grad_kernel[(n,)](logits, targets, lse, mu, g_logp, g_ent, g_sc, grad, v, logits.stride(0),
                       grad.stride(0), cfg.vocab_start, 1.0 / cfg.temperature, 1.0 / vocab_size,
                       cfg.ignore_index, HAS_LOGP=grads[0] is not None, HAS_ENT=grads[1] is not None,
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
        raise ValueError(f"token stats: targets[{row}] = {int(targets[row])} is outside the vocabulary "
                         f"[0, {vocab_size}); mark masked rows with ignore_index={ignore_index}")


class _StatsFromPartials(torch.autograd.Function):
    """logp, entropy, self-certainty from global statistics; backward differentiates the local slice."""

    @staticmethod
    def forward(ctx, grad_fn, targets, ignore_index, stats, vocab_size, *inputs):
        valid = targets != ignore_index
        _check_targets(targets, valid, vocab_size, ignore_index)
        log_s = torch.log(stats[S])
        lse = stats[M] + log_s  # (N,)
        mean_z = stats[M] + stats[A] / stats[S]  # mu: the mean of z under p
        outs = (stats[ZY] - lse, log_s - stats[A] / stats[S], lse - stats[B] / vocab_size)
        ctx.save_for_backward(targets, torch.where(valid, lse, 0.0), torch.where(valid, mean_z, 0.0), *inputs)
        ctx.grad_fn, ctx.vocab_size = grad_fn, vocab_size
        ctx.set_materialize_grads(False)
        return tuple(torch.where(valid, out, 0.0) for out in outs)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_sc):
        targets, lse, mean_z, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        grads = (g_logp, g_ent, g_sc)
        if not any(needs) or all(g is None for g in grads):
            return (None,) * (5 + len(inputs))
        return (None,) * 5 + tuple(ctx.grad_fn(targets, lse, mean_z, ctx.vocab_size, grads, needs, *inputs))


def combine_partial_stats(partials: PartialStats, group=None) -> tuple[torch.Tensor, ...]:
    """(logp, entropy, self_certainty), each (N,), from this rank's PartialStats. group: the
    tensor-parallel process group whose ranks hold the other vocab slices, or None when the slice is
    the whole vocabulary. Forward: two all-reduces; backward: none (each rank's input gradients
    cover its own slice)."""
    stats, vocab_size = partials.stats, partials.vocab_size
    if group is not None:
        stats, vocab_size = _all_reduce_stats(stats, vocab_size, group)
    return _StatsFromPartials.apply(partials.grad_fn, partials.targets, partials.ignore_index,
                                    stats.detach(), vocab_size, *partials.inputs)


# ----------------------------------------------------------------------------- public API

def check_targets_shape(targets: torch.Tensor, n_rows: int, where: str) -> torch.Tensor:
    if targets.shape != (n_rows,) or targets.dtype.is_floating_point:
        raise ValueError(f"{where}: targets must be integer of shape ({n_rows},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    return targets.long().contiguous()


def _logits_grad(cfg: SliceConfig, targets, lse, mu, vocab_size, grads, needs, logits):
    return (slice_grad(logits, targets, lse, mu, grads, vocab_size, cfg, logits.dtype),)


def logits_partial_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                         vocab_start: int = 0, ignore_index: int = -100, impl: str = "auto",
                         block_size: int | None = None) -> PartialStats:
    """Partial statistics of logits (N, V_slice) holding global vocab ids [vocab_start, +V_slice)."""
    if logits.ndim != 2 or not logits.dtype.is_floating_point or logits.shape[1] == 0:
        raise ValueError(f"token_stats: logits must be a float (N, V) tensor with V > 0, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"token_stats: temperature must be > 0, got {temperature}")
    targets = check_targets_shape(targets, logits.shape[0], "token_stats")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    cfg = SliceConfig(temperature, vocab_start, ignore_index, pick_impl(impl, logits), block_size)
    with torch.no_grad():
        stats = slice_partials(logits, targets, cfg)
    return PartialStats(stats, logits.shape[1], targets, (logits,), partial(_logits_grad, cfg), ignore_index)


def token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                vocab_start: int = 0, group=None, ignore_index: int = -100, impl: str = "auto",
                block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, self_certainty), each (N,) fp32, of logits (N, V) at a temperature, each
    differentiable w.r.t. the logits. With group (vocab-parallel), logits is this rank's slice
    starting at vocab_start and the outputs are those of the full vocabulary on every rank."""
    partials = logits_partial_stats(logits, targets, temperature, vocab_start=vocab_start,
                                    ignore_index=ignore_index, impl=impl, block_size=block_size)
    return combine_partial_stats(partials, group)
