"""The PPO policy loss over (B, T) token tensors in one pass, with its metrics: a Triton kernel and a
plain PyTorch reference.

    from nanoufo.kernels.ppo_loss import ppo_loss
    loss, metrics = ppo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.005)

Per token where mask is nonzero (masked tokens are never read, so they may hold anything):
  ratio = exp(clamp(logp - old, -C, C)), C = LOG_RATIO_CLAMP = 20
  loss  = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)), and for A < 0 at most -A dual_clip
        + kl_coef * kl   (k1: logp - ref; k3: exp(d) - d - 1 with d = clamp(ref - logp, -C, C), capped at
                          kl_clamp when it is given: verl's low_var_kl, whose gradient is 0 past the cap)
        - entropy_coef * entropy
Aggregation: "token-mean" over every masked token of the batch, or "seq-mean" (long name
"seq-mean-token-mean"): each row's token-mean, averaged over the rows that have at least one token; or
per-token weights (loss = sum w * token loss), how micro-batches of one minibatch share its normaliser.
No tokens at all gives a loss of 0, not NaN.
Metrics (0-d tensors, token-means over the masked tokens whatever the aggregation): clip_frac (tokens
where the clipped branch wins, so their gradient is 0), approx_kl (KL(old || new) by the k3
estimator ratio - 1 - log ratio), ratio_mean, and kl / entropy when ref_logp / entropy are given.

Triton path: forward = two launches and no host sync: the token kernel (a (B, T/BLOCK) grid; each program
reads its tokens once and writes per-block sums of the seven row statistics and, when logp needs a
gradient, d(token loss)/d(logp), each case derived beside it) and one program finishing the loss, the
metrics and the per-row gradient scales on the device; backward = one launch, one multiply per token.
Gradients flow to logp and entropy only. debug=True (or NANOUFO_KERNEL_DEBUG=1) names the first masked-in
NaN input (one sync).

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_ppo_loss.py
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import TL_ACC, acc_dtype, debug_mode, pick_impl

# The log-ratios inside exp (logp - old for the ratio, ref - logp for the k3 KL) are clamped to +-20, so exp
# stays finite in fp32 (e^20 ~ 5e8, and so does its product with an advantage) for a token whose log-prob moved
# very far since sampling; past the clamp the term is flat and passes no gradient. nanoufo/rl.py uses it too.
LOG_RATIO_CLAMP = 20.0
_CLAMP = tl.constexpr(LOG_RATIO_CLAMP)  # the same, readable inside @triton.jit code
COUNT, LOSS, CLIP, APPROX_KL, RATIO, KL, ENT = range(7)  # rows of the (7, B) per-row sums
AGGREGATIONS = {"token-mean": 0, "seq-mean": 1, "seq-mean-token-mean": 1, "weights": 2}  # seq-mean: the short name
MAX_BLOCK = 1024  # tokens per program (4 warps x 32 threads x 8): a response up to 1024 tokens is one block
# The one finishing program reads the (B, T-blocks) sums in tiles of at most FINISH_ROWS x FINISH_ELEMENTS / rows:
# 4 values per thread per statistic at 4 warps. (A 64 x 64 tile held 7 x 32 loaded values per thread, 243 registers.)
FINISH_ROWS, FINISH_ELEMENTS = 64, 512


@dataclass(frozen=True)
class PPOConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = None  # k3's value is capped here (verl's low_var_kl: 10); None: not capped
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    block_size: int | None = None  # Triton block over T (None: up to MAX_BLOCK)


def finish_tile(n_rows: int, n_blocks: int) -> tuple[int, int]:
    """(ROWS, BLOCKS): the finishing program's tile over the (B, T-blocks) partial sums (see FINISH_ELEMENTS)."""
    rows = min(FINISH_ROWS, triton.next_power_of_2(n_rows))
    return rows, min(triton.next_power_of_2(n_blocks), FINISH_ELEMENTS // rows)


def ppo_row_sums_reference(logp, old, adv, mask, ref, entropy, weights, cfg: PPOConfig) -> torch.Tensor:
    """(7, B) per-row sums (the LOSS row weighted when weights are given), differentiable."""
    tok = mask != 0
    acc = acc_dtype(logp.dtype)
    logp, old, adv = (torch.where(tok, x.to(acc), 0.0) for x in (logp, old, adv))  # (B, T) each
    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg = -adv * ratio
    pg_clip = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss = torch.maximum(pg, pg_clip)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.dual_clip), loss)
    kl = torch.zeros_like(logp)
    if ref is not None:
        ref_delta = torch.where(tok, ref.to(acc), 0.0) - logp
        u = ref_delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = -ref_delta if cfg.kl_estimator == "k1" else torch.exp(u) - u - 1
        if cfg.kl_estimator == "k3" and cfg.kl_clamp is not None:
            kl = kl.clamp(max=cfg.kl_clamp)  # k3 >= 0: verl's clamp to [-10, 10] caps it from above only
        loss = loss + cfg.kl_coef * kl
    ent = torch.zeros_like(logp) if entropy is None else torch.where(tok, entropy.to(acc), 0.0)
    loss = loss - cfg.entropy_coef * ent
    if weights is not None:
        loss = loss * torch.where(tok, weights.to(acc), 0.0)
    terms = (tok.to(acc), loss, (pg_clip > pg).to(acc), ratio - 1 - log_ratio, ratio, kl, ent)
    return torch.stack([torch.where(tok, term, 0.0).sum(1) for term in terms])


def ppo_loss_reference(logp, entropy, old, adv, mask, ref, weights,
                       cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the (5,) metrics (clip_frac .. entropy), differentiable w.r.t. logp and entropy by autograd."""
    rows = ppo_row_sums_reference(logp, old, adv, mask, ref, entropy, weights, cfg)  # (7, B)
    count = rows[COUNT]  # (B,)
    total = count.sum().clamp(min=1)
    if cfg.aggregation == "token-mean":
        loss = rows[LOSS].sum() / total
    elif cfg.aggregation == "weights":  # already inside the LOSS row
        loss = rows[LOSS].sum()
    else:  # seq-mean(-token-mean): each row's token-mean, over the rows that hold tokens
        loss = (rows[LOSS] / count.clamp(min=1)).sum() / (count > 0).sum().clamp(min=1)
    return loss, (rows[CLIP:].sum(1) / total).detach()


@triton.jit
def _ppo_loss_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, w_ptr, dloss_ptr, sums_ptr,
                     n_rows, n_cols, n_blocks, clip_low, clip_high, dual_clip, kl_coef, kl_clamp, entropy_coef,
                     HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_W: tl.constexpr, USE_DUAL: tl.constexpr,
                     KL_K3: tl.constexpr, KL_CAP: tl.constexpr, STORE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                     ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    offs = row * n_cols + cols  # int64
    tok = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
    logp = tl.load(logp_ptr + offs, mask=tok, other=0.0).to(ACC)
    old = tl.load(old_ptr + offs, mask=tok, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + offs, mask=tok, other=0.0).to(ACC)
    # d_loss = d(token loss) / d logp, branch by branch, with r = exp(clamp(logp - old, -C, C)):
    #   dr/dlogp = r inside the clamp, 0 outside it (the clamp is flat there)
    #   unclipped branch, loss = -A r:                       d_loss = -A dr/dlogp = -A r
    #   clipped branch wins, loss = -A clip(r, 1 - el, 1 + eh): it wins only with r outside the clip range
    #     (inside, both branches are equal and the unclipped one is taken), where clip(r) is constant: 0
    #   dual clip, A < 0 and loss > -A c, loss = -A c:       0
    #   k1, kl = logp - ref:                                 + kl_coef
    #   k3, kl = e^u - u - 1 with u = clamp(ref - logp):     + kl_coef (1 - e^u) inside the clamp, else 0
    #     (du/dlogp = -1, so d kl/dlogp = -(e^u - 1)); capped at kl_clamp (KL_CAP): 0 where kl > kl_clamp
    #   entropy bonus, loss -= entropy_coef H:               d_loss / dH = -entropy_coef (the backward's)
    delta = logp - old
    log_ratio = tl.minimum(tl.maximum(delta, -_CLAMP), _CLAMP)
    ratio = tl.exp(log_ratio)
    d_ratio = tl.where(tl.abs(delta) <= _CLAMP, ratio, 0.0)
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
            ref_delta = tl.minimum(tl.maximum(ref - logp, -_CLAMP), _CLAMP)
            kl = tl.exp(ref_delta) - ref_delta - 1.0
            d_kl = tl.where(tl.abs(ref - logp) <= _CLAMP, 1.0 - tl.exp(ref_delta), 0.0)
            if KL_CAP:
                d_kl = tl.where(kl <= kl_clamp, d_kl, 0.0)
                kl = tl.minimum(kl, kl_clamp)
            d_loss += kl_coef * d_kl
        else:
            kl = logp - ref
            d_loss += kl_coef
        loss += kl_coef * kl
    ent = tl.zeros([BLOCK], ACC)
    if HAS_ENT:
        ent = tl.load(ent_ptr + offs, mask=tok, other=0.0).to(ACC)
        loss -= entropy_coef * ent
    if HAS_W:  # the loss is sum_t w_t loss_t: the aggregation is in the weights
        loss *= tl.load(w_ptr + offs, mask=tok, other=0.0).to(ACC)
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


@triton.jit
def _ppo_loss_finish_kernel(sums_ptr, loss_ptr, metrics_ptr, row_scale_ptr, n_rows, n_blocks, AGG: tl.constexpr,
                            ROWS: tl.constexpr, BLOCKS: tl.constexpr, ACC: tl.constexpr):
    # one program: the (7, B, n_blocks) partial sums -> the loss, the metrics (token-means), and what the
    # backward needs: d loss / d(row r's loss sum) = row_scale[r] * norm, norm = metrics[5]
    #   token-mean (AGG 0): loss = sum_r L_r / n_tok                 row_scale 1, norm 1 / n_tok
    #   seq-mean (AGG 1):   loss = sum_r (L_r / n_r) / n_nonempty    row_scale 1 / n_r, norm 1 / n_nonempty
    #   weights (AGG 2):    loss = sum_r L_r (weights inside L_r)    row_scale 1, norm 1
    plane = n_rows * n_blocks
    blocks = tl.arange(0, BLOCKS)
    totals = tl.zeros([8], ACC)  # count, loss, clip, approx_kl, ratio, kl, entropy, nonempty rows
    slot = tl.arange(0, 8)
    for r0 in range(0, n_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        live = rows < n_rows
        sums = tl.zeros([ROWS, 8], ACC)
        for b0 in range(0, n_blocks, BLOCKS):
            idx = rows[:, None] * n_blocks + b0 + blocks[None, :]
            ok = live[:, None] & (b0 + blocks[None, :] < n_blocks)
            for k in tl.static_range(7):
                part = tl.sum(tl.load(sums_ptr + k * plane + idx, mask=ok, other=0.0), 1)  # (ROWS,)
                sums += tl.where(slot[None, :] == k, part[:, None], 0.0)
        count = tl.sum(tl.where(slot[None, :] == 0, sums, 0.0), 1)  # (ROWS,)
        row_scale = tl.full([ROWS], 1.0, ACC)
        if AGG == 1:
            row_scale = 1.0 / tl.maximum(count, 1.0)
            sums = tl.where(slot[None, :] == 1, sums * row_scale[:, None], sums)
        sums = tl.where(slot[None, :] == 7, tl.where(count > 0, 1.0, 0.0)[:, None], sums)
        tl.store(row_scale_ptr + rows, row_scale, mask=live)
        totals += tl.sum(sums, 0)
    n_tok = tl.maximum(tl.sum(tl.where(slot == 0, totals, 0.0), 0), 1.0)
    loss = tl.sum(tl.where(slot == 1, totals, 0.0), 0)
    norm = 1.0
    if AGG == 0:
        norm = 1.0 / n_tok
    if AGG == 1:
        norm = 1.0 / tl.maximum(tl.sum(tl.where(slot == 7, totals, 0.0), 0), 1.0)
    tl.store(loss_ptr, loss * norm)
    metric = (slot >= 2) & (slot <= 6)
    tl.store(metrics_ptr + slot - 2, totals / n_tok, mask=metric)  # clip_frac .. entropy, token-means
    tl.store(metrics_ptr + 5, norm)


@triton.jit
def _ppo_loss_grad_kernel(dloss_ptr, mask_ptr, w_ptr, row_scale_ptr, metrics_ptr, g_out_ptr, grad_logp_ptr,
                          grad_ent_ptr, n_cols, entropy_coef, HAS_W: tl.constexpr, LOGP: tl.constexpr,
                          ENT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # d loss / d logp_t = d_loss_t * (d loss / d L_t), d loss / d H_t = -entropy_coef * (d loss / d L_t), where
    # d loss / d L_t = g_out * norm * row_scale[r] * (w_t with weights, else 1), L_t the token's loss
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    offs = row * n_cols + cols
    scale = tl.load(g_out_ptr).to(ACC) * tl.load(metrics_ptr + 5) * tl.load(row_scale_ptr + row)
    tok = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
    g = tl.where(tok, scale, 0.0)
    if HAS_W:
        g *= tl.load(w_ptr + offs, mask=tok, other=0.0).to(ACC)
    if LOGP:
        tl.store(grad_logp_ptr + offs, tl.load(dloss_ptr + offs, mask=in_row, other=0.0) * g, mask=in_row)
    if ENT:
        tl.store(grad_ent_ptr + offs, -entropy_coef * g, mask=in_row)


class _PPOLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old, adv, mask, ref, weights, cfg: PPOConfig):
        n_rows, n_cols = logp.shape
        acc = acc_dtype(logp.dtype)
        block = cfg.block_size or min(MAX_BLOCK, triton.next_power_of_2(n_cols))
        n_blocks = triton.cdiv(n_cols, block)
        sums = torch.empty((7, n_rows, n_blocks), dtype=acc, device=logp.device)  # (7, B, T-blocks)
        store_grad = ctx.needs_input_grad[0]
        dloss = torch.empty((n_rows, n_cols), dtype=acc, device=logp.device) if store_grad else sums  # (B, T)
        _ppo_loss_kernel[(n_rows, n_blocks)](  # logp stands in for an absent ref, entropy or weights (never read)
            logp, old, adv, mask, *(logp if x is None else x for x in (ref, entropy, weights)), dloss, sums, n_rows,
            n_cols, n_blocks, float(cfg.clip_low), float(cfg.clip_high), float(cfg.dual_clip or 0),
            float(cfg.kl_coef), float(cfg.kl_clamp or 0), float(cfg.entropy_coef), HAS_REF=ref is not None,
            HAS_ENT=entropy is not None, HAS_W=weights is not None, USE_DUAL=cfg.dual_clip is not None,
            KL_K3=cfg.kl_estimator == "k3", KL_CAP=cfg.kl_clamp is not None, STORE_GRAD=store_grad, BLOCK=block,
            ACC=TL_ACC[acc], num_warps=4)
        # loss (), metrics (6,): clip .. entropy, then the norm; row_scale (B,)
        loss, metrics, row_scale = (torch.empty(size, dtype=acc, device=logp.device) for size in ((), 6, n_rows))
        rows, blocks = finish_tile(n_rows, n_blocks)
        _ppo_loss_finish_kernel[(1,)](sums, loss, metrics, row_scale, n_rows, n_blocks,
                                      AGG=AGGREGATIONS[cfg.aggregation], ROWS=rows, BLOCKS=blocks, ACC=TL_ACC[acc],
                                      num_warps=4)
        ctx.save_for_backward(dloss, mask, weights, row_scale, metrics)
        ctx.cfg, ctx.block = cfg, block
        ctx.mark_non_differentiable(metrics)
        ctx.set_materialize_grads(False)  # no zeros launched for the metrics' (absent) gradient
        return loss, metrics

    @staticmethod
    def backward(ctx, g_loss, _):
        dloss, mask, weights, row_scale, metrics = ctx.saved_tensors
        need_logp, need_ent = ctx.needs_input_grad[:2]
        if g_loss is None or not (need_logp or need_ent):
            return (None,) * 8
        n_rows, n_cols = mask.shape
        grad_logp, grad_ent = (torch.empty(mask.shape, dtype=metrics.dtype, device=mask.device) if need else None
                               for need in (need_logp, need_ent))  # (B, T) each
        _ppo_loss_grad_kernel[(n_rows, triton.cdiv(n_cols, ctx.block))](
            dloss, mask, mask if weights is None else weights, row_scale, metrics, g_loss.contiguous(),
            metrics if grad_logp is None else grad_logp, metrics if grad_ent is None else grad_ent, n_cols,
            float(ctx.cfg.entropy_coef), HAS_W=weights is not None, LOGP=need_logp, ENT=need_ent, BLOCK=ctx.block,
            ACC=TL_ACC[metrics.dtype], num_warps=4)
        return grad_logp, grad_ent, None, None, None, None, None, None


def ppo_loss_triton(logp, entropy, old, adv, mask, ref, weights, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and (6,) metrics (the 5 of the reference, then the backward's norm); no host sync."""
    inputs = (logp, entropy, old, adv, mask, ref, weights)
    assert logp.ndim == 2 and logp.numel() > 0 and acc_dtype(logp.dtype) in TL_ACC, "logp: float (B, T)"
    assert all(x is None or (x.shape == logp.shape and x.is_contiguous()) for x in inputs), "contiguous (B, T)"
    return _PPOLossTriton.apply(*inputs, cfg)


def _check(logp, old, adv, mask, ref, entropy, weights, cfg: PPOConfig, debug: bool) -> None:
    named = dict(old_logp=old, advantages=adv, mask=mask, ref_logp=ref, entropy=entropy, weights=weights)
    if logp.ndim != 2 or not logp.dtype.is_floating_point:
        raise ValueError(f"ppo_loss: logp must be a float (B, T) tensor, got {logp.dtype} {tuple(logp.shape)}")
    for name, x in named.items():
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"ppo_loss: {name} has shape {tuple(x.shape)}, logp has {tuple(logp.shape)}")
        if x is not None and x.device != logp.device:
            raise ValueError(f"ppo_loss: {name} is on {x.device}, logp on {logp.device}")
        if x is not None and name != "mask" and not x.dtype.is_floating_point:
            raise ValueError(f"ppo_loss: {name} must be a float tensor, got {x.dtype}")
    if cfg.aggregation not in AGGREGATIONS or cfg.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"ppo_loss: aggregation must be token-mean|seq-mean(-token-mean) and kl_estimator "
                         f"k1|k3, got {cfg.aggregation!r}, {cfg.kl_estimator!r}")
    if cfg.clip_low < 0 or cfg.clip_high < 0 or (cfg.dual_clip is not None and cfg.dual_clip <= 1):
        raise ValueError(f"ppo_loss: clips must be >= 0 and dual_clip > 1 (or None), got "
                         f"{cfg.clip_low}, {cfg.clip_high}, {cfg.dual_clip}")
    if debug:  # one host sync: the first masked token holding NaN, by name and position
        tok = mask != 0
        for name, x in ({"logp": logp} | named).items():
            if x is not None and name != "mask" and (bad := (tok & x.isnan()).nonzero()).numel():
                raise ValueError(f"ppo_loss: {name}[{int(bad[0, 0])}, {int(bad[0, 1])}] is NaN on a masked-in token")


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
             weights: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.28,
             dual_clip: float | None = 3.0, kl_coef: float = 0.0, kl_estimator: str = "k3",
             kl_clamp: float | None = None, entropy_coef: float = 0.0, aggregation: str = "token-mean",
             impl: str = "auto", block_size: int | None = None,
             debug: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss scalar, metrics) of the clipped PPO surrogate over (B, T) tokens; see the module doc.
    weights (B, T), when given, replace the aggregation: the loss is sum(weights * token loss)."""
    if weights is not None:
        aggregation = "weights"
    elif aggregation == "weights":
        raise ValueError("ppo_loss: aggregation='weights' needs the weights tensor")
    cfg = PPOConfig(clip_low, clip_high, dual_clip, kl_coef, kl_estimator, kl_clamp, entropy_coef, aggregation,
                    block_size)
    _check(logp, old_logp, advantages, mask, ref_logp, entropy, weights, cfg, debug_mode(debug))
    fixed = [None if x is None else x.detach() for x in (old_logp, advantages, mask, ref_logp, weights)]  # no grad
    if pick_impl(impl, logp) == "triton" and logp.numel() > 0:
        loss, metrics = ppo_loss_triton(*(None if x is None else x.contiguous() for x in (logp, entropy, *fixed)), cfg)
    else:
        loss, metrics = ppo_loss_reference(logp, entropy, *fixed, cfg)
    names = ("clip_frac", "approx_kl", "ratio_mean", "kl" if ref_logp is not None else "",
             "entropy" if entropy is not None else "")
    return loss, {name: metrics[i] for i, name in enumerate(names) if name}
