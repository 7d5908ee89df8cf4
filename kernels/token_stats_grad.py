"""The backward of kernels/token_stats.py: the gradient w.r.t. a (N, V_slice) block of logits of
g_logp . logp + g_ent . entropy + g_sc . self_certainty, given each row's global lse and mu; a Triton
kernel and its plain PyTorch reference.

Derivation, per row, with z = x / T (x the logits), p = softmax(z), lse = log sum_k e^(z_k),
mu = E_p[z] = sum_k p_k z_k, V the FULL vocabulary, and d lse / d z_j = p_j, d p_k / d z_j = p_k ([k = j] - p_j):
  logp = z_y - lse                 d logp / d z_j = [j = y] - p_j
  H = -sum_k p_k log p_k = lse - mu, and d mu / d z_j = p_j + sum_k z_k p_k ([k = j] - p_j) = p_j (1 + z_j - mu):
                                   d H / d z_j = p_j - p_j (1 + z_j - mu) = -p_j (z_j - mu)
  sc = lse - (1/V) sum_k z_k       d sc / d z_j = p_j - 1/V
so  dz_j = p_j (g_sc - g_logp - g_ent (z_j - mu)) + g_logp [j = y] - g_sc / V,  and dx_j = dz_j / T.
A column needs only its own logit and the row's lse and mu (p_j = e^(z_j - lse)): a vocab-parallel rank or a
chunk of the fused head differentiates its slice with no communication. At a -inf logit p_j = 0 and so is
its gradient (the product p_j (z_j - mu) is kept 0, not NaN); a masked row (ignore_index) gets zeros.

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_token_stats.py
"""
import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import TL_ACC
from nanoufo.kernels.softmax_stats import (LOG2E, LOG2E_TL, NEG_FINITE, SliceConfig, block_of, exp2_acc,
                                           multiprocessors, owned_targets, scaled_logits, split_columns, splits_of)


def token_stats_grad_reference(logits, targets, lse, mu, grads, vocab_size: int, cfg: SliceConfig,
                               out_dtype: torch.dtype) -> torch.Tensor:
    """dx (N, V_slice) by the derivation above; grads = (g_logp, g_ent, g_sc), each (N,) or None (then 0)."""
    valid = targets != cfg.ignore_index
    z = scaled_logits(logits, valid, cfg)  # (N, V)
    g_logp, g_ent, g_sc = (torch.zeros_like(lse) if g is None else torch.where(valid, g.to(z.dtype), 0.0)
                           for g in grads)  # (N,) each
    p = torch.exp(z - lse[:, None])  # (N, V)
    dz = torch.where(p > 0, p * ((g_sc - g_logp)[:, None] - g_ent[:, None] * (z - mu[:, None])), 0.0)
    owned, local = owned_targets(targets, valid, cfg, logits.shape[1])
    rows = owned.nonzero()[:, 0]
    dz.index_put_((rows, local[rows]), g_logp[rows], accumulate=True)
    dz = dz - g_sc[:, None] / vocab_size
    return (dz / cfg.temperature).to(out_dtype)


@triton.jit
def _dlogits(x, cols, local, lse_c, mu, coef, g_logp, g_ent, g_sc_v, c, inv_temp, HAS_LOGP: tl.constexpr,
             HAS_ENT: tl.constexpr, ACC: tl.constexpr):
    """dx = dz / T of one tile; the row's coefficients come already divided by T."""
    p = exp2_acc(x * c - lse_c, ACC)
    dx = p * coef - g_sc_v
    if HAS_ENT:
        dx -= g_ent * p * tl.maximum(x * inv_temp - mu, NEG_FINITE)  # p = 0 at a -inf logit: keep the product 0
    if HAS_LOGP:
        dx += tl.where(cols == local, g_logp, 0.0)
    return dx


@triton.jit
def _token_stats_grad_kernel(logits_ptr, targets_ptr, lse_ptr, mu_ptr, g_logp_ptr, g_ent_ptr, g_sc_ptr, grad_ptr,
                             n_cols, row_stride, grad_row_stride, vocab_start, c, inv_temp, inv_vocab, ignore_index,
                             HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr, HAS_SC: tl.constexpr,
                             BLOCK: tl.constexpr, ACC: tl.constexpr):
    # grid (N, splits): program (row, j) writes the row's columns split_columns(j) gives
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    lse_c = tl.load(lse_ptr + row).to(ACC) * LOG2E_TL  # p_j = 2^(x_j c - lse log2 e)
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
    lo, end = split_columns(tl.program_id(1), tl.num_programs(1), n_cols, BLOCK)
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


def token_stats_grad_triton(logits, targets, lse, mu, grads, vocab_size: int, cfg: SliceConfig,
                            out_dtype: torch.dtype) -> torch.Tensor:
    n, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == lse.shape == mu.shape == (n,), "rows of unit-stride logits"
    assert all(g is None or g.shape == (n,) for g in grads) and lse.dtype in TL_ACC
    grad = torch.empty((n, v), dtype=out_dtype, device=logits.device)  # (N, V)
    g_logp, g_ent, g_sc = (lse if g is None else g.contiguous() for g in grads)  # lse: unused pointer
    block = block_of(cfg, v)
    splits = splits_of(cfg, n, v, block, multiprocessors(logits.device))
    _token_stats_grad_kernel[(n, splits)](
        logits, targets, lse, mu, g_logp, g_ent, g_sc, grad, v, logits.stride(0), grad.stride(0), cfg.vocab_start,
        LOG2E / cfg.temperature, 1.0 / cfg.temperature, 1.0 / vocab_size, cfg.ignore_index,
        HAS_LOGP=grads[0] is not None, HAS_ENT=grads[1] is not None, HAS_SC=grads[2] is not None, BLOCK=block,
        ACC=TL_ACC[lse.dtype], num_warps=8 if block >= 2048 else 4)
    return grad


def token_stats_grad(logits, targets, lse, mu, grads, vocab_size: int, cfg: SliceConfig,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """(N, V_slice) gradient w.r.t. the logits block, in out_dtype, given the global lse and mu (N,)."""
    if cfg.impl == "triton" and logits.shape[0] > 0:  # no rows: no launch
        return token_stats_grad_triton(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype)
    return token_stats_grad_reference(logits, targets, lse, mu, grads, vocab_size, cfg, out_dtype)
