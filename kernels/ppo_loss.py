"""The PPO policy loss over (B, T) token tensors in one pass, with its metrics: a Triton kernel and a
plain PyTorch reference (DESIGN.md section 3).

    from kernels import ppo_loss
    loss, metrics = ppo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.005)

Per token where mask is nonzero (masked tokens are never read, so they may hold anything):
  ratio = exp(clamp(logp - old, -20, 20))
  loss  = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)), and for A < 0 at most -A dual_clip
        + kl_coef * kl   (k1: logp - ref; k3: exp(d) - d - 1 with d = clamp(ref - logp, -20, 20))
        - entropy_coef * entropy
Aggregation: "token-mean" over every masked token of the batch, or "seq-mean-token-mean" (short name
"seq-mean"): each row's token-mean, averaged over the rows that have at least one token. No tokens at all
gives a loss of 0, not NaN. With `weights` (B, T) (nanoufo.rl.loss_weights over a whole minibatch) the loss
is sum(weights * token loss) instead: a micro-batch's share of its minibatch's aggregated loss.
Metrics (0-d tensors, token-means over the masked tokens whatever the aggregation): clip_frac (tokens
where the clipped branch wins, so their gradient is 0), approx_kl (KL(old || new) by the k3
estimator ratio - 1 - log ratio), ratio_mean, and kl / entropy when ref_logp / entropy are given.

The kernel runs a (B, T/BLOCK) grid; each program reads its tokens once and writes per-block sums
of the seven row statistics and, when logp needs a gradient, d(token loss)/d(logp), so the backward
is one multiply per token. Gradients flow to logp and entropy only.

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_ppo_loss.py
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.dispatch import pick_impl
from kernels.token_stats import acc_dtype

COUNT, LOSS, CLIP, APPROX_KL, RATIO, KL, ENT = range(7)  # rows of the (7, B) per-row sums
AGGREGATIONS = ("token-mean", "seq-mean", "seq-mean-token-mean")  # seq-mean is seq-mean-token-mean's short name
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@dataclass(frozen=True)
class PPOConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    block_size: int | None = None  # Triton block over T (None: up to 1024)


@triton.jit
def _ppo_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, w_ptr, dloss_ptr, sums_ptr,
                n_rows, n_cols, n_blocks, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
                HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_W: tl.constexpr, USE_DUAL: tl.constexpr,
                KL_K3: tl.constexpr, STORE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    offs = row * n_cols + cols  # int64
    tok = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
    logp = tl.load(logp_ptr + offs, mask=tok, other=0.0).to(ACC)
    old = tl.load(old_ptr + offs, mask=tok, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + offs, mask=tok, other=0.0).to(ACC)
    delta = logp - old
    log_ratio = tl.minimum(tl.maximum(delta, -20.0), 20.0)
    ratio = tl.exp(log_ratio)
    d_ratio = tl.where(tl.abs(delta) <= 20.0, ratio, 0.0)  # the clamp passes no gradient outside
    pg = -adv * ratio
    pg_clip = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = pg_clip > pg
    loss = tl.maximum(pg, pg_clip)
    d_loss = tl.where(clipped, 0.0, -adv * d_ratio)
    if USE_DUAL:
        capped = (adv < 0) & (loss > -adv * dual_clip)
        loss = tl.where(capped, -adv * dual_clip, loss)
        d_loss = tl.where(capped, 0.0, d_loss)
    kl = tl.zeros([BLOCK], ACC)
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=tok, other=0.0).to(ACC)
        if KL_K3:
            ref_delta = tl.minimum(tl.maximum(ref - logp, -20.0), 20.0)
            kl = tl.exp(ref_delta) - ref_delta - 1.0
            d_loss += kl_coef * tl.where(tl.abs(ref - logp) <= 20.0, 1.0 - tl.exp(ref_delta), 0.0)
        else:
            kl = logp - ref
            d_loss += kl_coef
        loss += kl_coef * kl
    ent = tl.zeros([BLOCK], ACC)
    if HAS_ENT:
        ent = tl.load(ent_ptr + offs, mask=tok, other=0.0).to(ACC)
        loss -= entropy_coef * ent
    if HAS_W:  # the LOSS row becomes sum(w * loss); its gradient (and the entropy's) scales with w
        w = tl.load(w_ptr + offs, mask=tok, other=0.0).to(ACC)
        loss = loss * w
        d_loss = d_loss * w
    out = sums_ptr + row * n_blocks + blk
    plane = n_rows * n_blocks  # one (B, n_blocks) plane per statistic, in COUNT .. ENT order
    tl.store(out, tl.sum(tl.where(tok, 1.0, 0.0).to(ACC), 0))
    tl.store(out + plane, tl.sum(tl.where(tok, loss, 0.0), 0))
    tl.store(out + 2 * plane, tl.sum(tl.where(tok & clipped, 1.0, 0.0).to(ACC), 0))
    tl.store(out + 3 * plane, tl.sum(tl.where(tok, ratio - 1.0 - log_ratio, 0.0), 0))
    tl.store(out + 4 * plane, tl.sum(tl.where(tok, ratio, 0.0), 0))
    tl.store(out + 5 * plane, tl.sum(tl.where(tok, kl, 0.0), 0))
    tl.store(out + 6 * plane, tl.sum(tl.where(tok, ent, 0.0), 0))
    if STORE_GRAD:
        tl.store(dloss_ptr + offs, tl.where(tok, d_loss, 0.0), mask=in_row)


def _row_sums_triton(logp, old, adv, mask, ref, entropy, weights, cfg: PPOConfig, store_grad: bool):
    """(7, B) per-row sums and, if store_grad, the masked d(token loss)/d(logp) (B, T)."""
    n_rows, n_cols = logp.shape
    acc = acc_dtype(logp.dtype)
    block = cfg.block_size or min(1024, triton.next_power_of_2(n_cols))
    n_blocks = triton.cdiv(n_cols, block)
    sums = torch.empty((7, n_rows, n_blocks), dtype=acc, device=logp.device)  # (7, B, T-blocks)
    dloss = torch.empty((n_rows, n_cols), dtype=acc, device=logp.device) if store_grad else sums
    _ppo_kernel[(n_rows, n_blocks)](
        logp, old, adv, mask, logp if ref is None else ref, logp if entropy is None else entropy,
        logp if weights is None else weights, dloss,
        sums, n_rows, n_cols, n_blocks, float(cfg.clip_low), float(cfg.clip_high), float(cfg.dual_clip or 0),
        float(cfg.kl_coef), float(cfg.entropy_coef), HAS_REF=ref is not None, HAS_ENT=entropy is not None,
        HAS_W=weights is not None, USE_DUAL=cfg.dual_clip is not None, KL_K3=cfg.kl_estimator == "k3",
        STORE_GRAD=store_grad,
        BLOCK=block, ACC=_TL_ACC[acc], num_warps=4)
    return sums.sum(2), (dloss if store_grad else None)


class _PPORowSums(torch.autograd.Function):
    """Kernel path: (7, B) row sums whose LOSS row is differentiable w.r.t. logp and entropy."""

    @staticmethod
    def forward(ctx, logp, entropy, old, adv, mask, ref, weights, cfg: PPOConfig):
        rows, dloss = _row_sums_triton(logp, old, adv, mask, ref, entropy, weights, cfg, ctx.needs_input_grad[0])
        ctx.save_for_backward(dloss, (mask != 0) if weights is None else torch.where(mask != 0, weights, 0.0))
        ctx.entropy_coef = cfg.entropy_coef
        return rows

    @staticmethod
    def backward(ctx, g_rows):
        dloss, token_weight = ctx.saved_tensors  # token_weight: the mask, or the masked weights
        g = g_rows[LOSS][:, None]  # (B, 1): d(aggregated loss)/d(row loss sum)
        grad_logp = dloss * g if ctx.needs_input_grad[0] else None
        grad_ent = token_weight * (-ctx.entropy_coef * g) if ctx.needs_input_grad[1] else None
        return grad_logp, grad_ent, None, None, None, None, None, None


def _row_sums_torch(logp, old, adv, mask, ref, entropy, weights, cfg: PPOConfig) -> torch.Tensor:
    """Reference: (7, B) per-row sums, differentiable by autograd."""
    tok = mask != 0
    acc = acc_dtype(logp.dtype)
    logp, old, adv = (torch.where(tok, x.to(acc), 0.0) for x in (logp, old, adv))  # (B, T) each
    log_ratio = (logp - old).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    pg = -adv * ratio
    pg_clip = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss = torch.maximum(pg, pg_clip)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.dual_clip), loss)
    kl = torch.zeros_like(logp)
    if ref is not None:
        ref_delta = torch.where(tok, ref.to(acc), 0.0) - logp
        kl = -ref_delta if cfg.kl_estimator == "k1" else _k3(ref_delta.clamp(-20, 20))
        loss = loss + cfg.kl_coef * kl
    ent = torch.zeros_like(logp) if entropy is None else torch.where(tok, entropy.to(acc), 0.0)
    loss = loss - cfg.entropy_coef * ent
    if weights is not None:
        loss = loss * torch.where(tok, weights.to(acc), 0.0)
    terms = (tok.to(acc), loss, (pg_clip > pg).to(acc), ratio - 1 - log_ratio, ratio, kl, ent)
    return torch.stack([torch.where(tok, term, 0.0).sum(1) for term in terms])


def _k3(d: torch.Tensor) -> torch.Tensor:
    return torch.exp(d) - d - 1


def aggregate(rows: torch.Tensor, aggregation: str, has_ref: bool, has_entropy: bool, weighted: bool = False):
    """Loss and metrics from the (7, B) per-row sums (shared by both paths); weighted: the LOSS row already
    holds sum(weights * loss), so the loss is its sum."""
    count = rows[COUNT]  # (B,)
    total = count.sum().clamp(min=1)
    if weighted:
        loss = rows[LOSS].sum()
    elif aggregation == "token-mean":
        loss = rows[LOSS].sum() / total
    else:  # seq-mean over the rows that hold tokens
        loss = (rows[LOSS] / count.clamp(min=1)).sum() / (count > 0).sum().clamp(min=1)
    names = {"clip_frac": CLIP, "approx_kl": APPROX_KL, "ratio_mean": RATIO}
    names |= {"kl": KL} if has_ref else {}
    names |= {"entropy": ENT} if has_entropy else {}
    return loss, {name: (rows[i].sum() / total).detach() for name, i in names.items()}


def _check(logp, old, adv, mask, ref, entropy, weights, cfg: PPOConfig) -> None:
    named = {"old_logp": old, "advantages": adv, "mask": mask, "ref_logp": ref, "entropy": entropy,
             "weights": weights}
    if logp.ndim != 2 or not logp.dtype.is_floating_point:
        raise ValueError(f"ppo_loss: logp must be a float (B, T) tensor, got {logp.dtype} {tuple(logp.shape)}")
    for name, x in named.items():
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"ppo_loss: {name} has shape {tuple(x.shape)}, logp has {tuple(logp.shape)}")
    if cfg.aggregation not in AGGREGATIONS or cfg.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"ppo_loss: aggregation must be {'|'.join(AGGREGATIONS)} and kl_estimator k1|k3, "
                         f"got {cfg.aggregation!r}, {cfg.kl_estimator!r}")
    if cfg.clip_low < 0 or cfg.clip_high < 0 or (cfg.dual_clip is not None and cfg.dual_clip <= 1):
        raise ValueError(f"ppo_loss: clips must be >= 0 and dual_clip > 1 (or None), got "
                         f"{cfg.clip_low}, {cfg.clip_high}, {cfg.dual_clip}")


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
             clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0,
             kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
             aggregation: str = "token-mean", weights: torch.Tensor | None = None, impl: str = "auto",
             block_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss scalar, metrics) of the clipped PPO surrogate over (B, T) tokens; see the module doc."""
    cfg = PPOConfig(clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, aggregation,
                    block_size)
    _check(logp, old_logp, advantages, mask, ref_logp, entropy, weights, cfg)
    old_logp, advantages = old_logp.detach(), advantages.detach()
    weights = None if weights is None else weights.detach()
    ref_logp = None if ref_logp is None else ref_logp.detach()
    if pick_impl(impl, logp) == "triton" and logp.numel() > 0:
        inputs = [None if x is None else x.contiguous() for x in (logp, entropy, old_logp, advantages,
                                                                    mask, ref_logp, weights)]
        rows = _PPORowSums.apply(*inputs, cfg)
    else:
        rows = _row_sums_torch(logp, old_logp, advantages, mask, ref_logp, entropy, weights, cfg)
    return aggregate(rows, aggregation, ref_logp is not None, entropy is not None, weights is not None)
