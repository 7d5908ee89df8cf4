"""The token statistics of kernels/token_stats.py fused with the LM head: logp, entropy and
self-certainty from hidden states (N, H) and the head weight (V, H) without ever holding the (N, V)
logits. The vocabulary is cut into chunks of chunk_size columns; each chunk's logits
(N, chunk) = hidden @ weight[chunk].T are made in fp32 (no bf16 rounding of the logits), reduced to the
statistics of a vocab slice (token_stats_partial) and dropped; chunks merge exactly as tensor-parallel ranks
do (kernels/token_stats.py, steps 1-3). The backward recomputes each chunk, turns it into the logits gradient
(in the input dtype, for the tensor cores) and feeds two matmuls: grad_hidden += dz @ W_chunk (fp32
accumulator, added in place: kernels/mm_acc.py) and grad_W[chunk] = dz.T @ hidden (fp32 accumulation, one
rounding). Cost: 8*N*H*V FLOPs forward+backward.

    from nanoufo.kernels.linear_token_stats import linear_token_stats
    logp, entropy, sc = linear_token_stats(hidden, model.lm_head_weight, targets, temperature=1.0)

Vocab-parallel: pass the rank's weight slice, its vocab_start and the group. The hidden gradient is
then this rank's share; the caller's column-parallel input function (identity forward, all-reduce
backward) sums it across ranks, as for any vocab-parallel head.

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_linear.py
"""
from dataclasses import replace

import torch

from nanoufo.kernels.dispatch import acc_dtype, debug_mode, pick_impl
from nanoufo.kernels.mm_acc import mm_acc
from nanoufo.kernels.token_stats import (RowStats, SliceConfig, check_targets_shape, finish_slice, merge_slices,
                                         token_stats, token_stats_grad, token_stats_partial)

DEFAULT_CHUNK = 8192  # vocab columns per chunk: N=16384 gives a 0.5 GB fp32 chunk


def linear_token_stats_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 temperature: float = 1.0, **kwargs) -> tuple[torch.Tensor, ...]:
    """The unfused path: materialise the (N, V) logits in the input dtype, then the PyTorch statistics."""
    return token_stats(hidden @ weight.T, targets, temperature, impl="torch", **kwargs)


def check_head(hidden: torch.Tensor, weight: torch.Tensor, where: str) -> None:
    """hidden (N, H) and weight (V, H), V > 0, of one float dtype on one device, or an error naming them."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"{where}: need hidden (N, H) and weight (V, H) with V > 0, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point or hidden.device != weight.device:
        raise ValueError(f"{where}: hidden and weight must share a float dtype and a device, got "
                         f"{hidden.dtype} on {hidden.device} and {weight.dtype} on {weight.device}")


def _chunks(cfg: SliceConfig, n_cols: int, chunk_size: int) -> list[tuple[slice, SliceConfig]]:
    """Each chunk's columns, and its configuration (vocab_start: the chunk's first global id)."""
    return [(slice(start, start + chunk_size), replace(cfg, vocab_start=cfg.vocab_start + start))
            for start in range(0, n_cols, chunk_size)]


def _linear_grad(hidden, weight, targets, lse, mu, vocab_size: int, grads, needs: tuple[bool, bool],
                 cfg: SliceConfig, chunk_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # logits = hidden @ W.T, so with dz = d out / d logits (token_stats' backward, per chunk):
    #   d out / d hidden = dz @ W  (summed over the chunks)      d out / d W[chunk] = dz.T @ hidden
    need_hidden, need_weight = needs
    grad_hidden = torch.zeros(hidden.shape, dtype=acc_dtype(hidden.dtype), device=hidden.device) \
        if need_hidden else None  # (N, H) fp32 accumulator over chunks
    grad_weight = torch.empty_like(weight) if need_weight else None  # (V, H)
    for cols, chunk_cfg in _chunks(cfg, weight.shape[0], chunk_size):
        logits = mm_acc(hidden, weight[cols].T)  # (N, C) fp32, as in the forward
        dz = token_stats_grad(logits, targets, lse, mu, grads, vocab_size, chunk_cfg, hidden.dtype)  # (N, C)
        del logits  # free the fp32 chunk before the matmuls allocate theirs
        if need_hidden:
            mm_acc(dz, weight[cols], out=grad_hidden)
        if need_weight:
            grad_weight[cols] = mm_acc(dz.T, hidden)  # (C, H)
    return (grad_hidden.to(hidden.dtype) if need_hidden else None), grad_weight


class _LinearTokenStats(torch.autograd.Function):
    """The statistics chunk by chunk forward (the logits dropped); the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cfg: SliceConfig, chunk_size: int, group):
        parts = [token_stats_partial(mm_acc(hidden, weight[cols].T), targets, chunk_cfg)
                 for cols, chunk_cfg in _chunks(cfg, weight.shape[0], chunk_size)]
        stats = merge_slices(RowStats(*map(torch.stack, zip(*parts))))  # each field (chunks, N) -> (N,)
        outs, lse_mu, vocab_size = finish_slice(stats, targets, weight.shape[0], cfg, group)
        ctx.save_for_backward(hidden, weight, targets, lse_mu)
        ctx.cfg, ctx.chunk_size, ctx.vocab_size = cfg, chunk_size, vocab_size
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_sc):
        hidden, weight, targets, lse_mu = ctx.saved_tensors
        grads, needs = (g_logp, g_ent, g_sc), ctx.needs_input_grad[:2]
        if not any(needs) or all(g is None for g in grads):
            return (None,) * 6
        vocab_size = int(ctx.vocab_size)  # a 0-d tensor when vocab-parallel without vocab_size: one host read
        return *_linear_grad(hidden, weight, targets, *lse_mu, vocab_size, grads, needs, ctx.cfg, ctx.chunk_size), \
            None, None, None, None


def linear_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0, *, chunk_size: int = DEFAULT_CHUNK, vocab_start: int = 0,
                       group=None, ignore_index: int = -100, impl: str = "auto", block_size: int | None = None,
                       debug: bool | None = None,
                       vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, self_certainty), each (N,) fp32, of the logits hidden @ weight.T at a temperature;
    differentiable w.r.t. hidden and weight. weight (V_slice, H) holds global vocab ids
    [vocab_start, vocab_start + V_slice); group, vocab_start, vocab_size, debug: as in token_stats."""
    check_head(hidden, weight, "linear_token_stats")
    if temperature <= 0 or chunk_size <= 0:
        raise ValueError(f"linear_token_stats: temperature and chunk_size must be > 0, got "
                         f"{temperature} and {chunk_size}")
    targets = check_targets_shape(targets, hidden.shape[0], "linear_token_stats", hidden.device)
    cfg = SliceConfig(temperature, vocab_start, ignore_index, pick_impl(impl, hidden), block_size,
                      debug=debug_mode(debug), vocab_size=vocab_size)
    return _LinearTokenStats.apply(hidden, weight, targets, cfg, chunk_size, group)
