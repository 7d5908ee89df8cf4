"""The LM head fused with the PPO loss: from hidden states (N, H), the head weight (V, H) and per-token
weights, the PPO loss and its gradients w.r.t. hidden and weight, without ever holding the (N, V) logits
and without recomputing them: 6 N H V matmul FLOPs (forward GEMM, then the grad-hidden and grad-weight
GEMMs), where the statistics-only head (kernels/linear_token_stats.py) needs 8.

    from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss
    loss, metrics, logp = linear_ppo_loss(hidden, weight, targets, old_logp, advantages, mask, weights,
                                          ref_logp=ref_logp, kl_coef=0.005, entropy_coef=0.001)

Why the backward can be done in the forward: the loss is sum_t w_t loss_t, and each token's loss depends on
the logits of its own row only through logp_t and H_t (the entropy). With the weights fixed in advance
(the normaliser of the whole minibatch, see kernels/ppo_loss.py), d loss / d logp_t and d loss / d H_t
are known as soon as row t's statistics are: the PPO loss's backward (kernels/ppo_loss.py, derivations
there) on that row chunk. The token statistics' backward (kernels/token_stats.py) turns them into the
logits gradient dz = d loss / d logits of the chunk, and then
    grad_hidden[chunk] = dz @ W        grad_W += dz.T @ hidden[chunk]   (fp32, added in place: kernels/mm_acc.py)
So each row chunk is: one GEMM to fp32 logits, the statistics (one launch), the per-token derivatives,
dz in the input dtype, two GEMMs; the logits chunk is dropped. The autograd backward only multiplies the
saved gradients by the upstream gradient of the scalar loss (d(g loss) = g d loss).

On-policy (old_logp None): the update's first and only optimizer step after a rollout, where the old policy is
the current one, needs no forward of its own for the old log-probs: each token's is its own logp, detached (the
ratio is 1, the clipped surrogate's gradient the plain policy gradient's), as TRL and verl do for one step.

Vocab-parallel (group, vocab_start): as in kernels/linear_token_stats.py; each chunk's statistics are
all-gathered (one small collective per chunk, no host sync), so logp, the loss and the metrics are those of
the full vocabulary on every rank.

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_linear_ppo.py
"""
import torch

from nanoufo.kernels.dispatch import acc_dtype, debug_mode, pick_impl
from nanoufo.kernels.linear_token_stats import check_head
from nanoufo.kernels.mm_acc import mm_acc
from nanoufo.kernels.ppo_loss import ppo_loss
from nanoufo.kernels.token_stats import (SliceConfig, check_targets_shape, finished_stats, token_stats,
                                         token_stats_grad)

CHUNK_ELEMENTS = 1 << 28  # fp32 logits per row chunk (1 GiB): 1766 rows at V = 151936
# The CPU's chunk is smaller: its PyTorch path holds several chunk-sized fp32 temporaries at once (the scaled
# logits, their exponentials, dz), about 6 GiB at 2^28; at 2^26 (441 rows at V = 151936) the peak is a quarter
# for the same CPU seconds, measured at hidden 64 and 896 (bench/RESULTS.md, "Peers"). Much smaller chunks
# cost time: each re-reads the weight and re-writes its fp32 gradient.
CPU_CHUNK_ELEMENTS = 1 << 26


def default_chunk_rows(n_cols: int, device: torch.device | str = "cuda") -> int:
    """Rows per chunk of fp32 logits over n_cols vocabulary columns: CHUNK_ELEMENTS logits on a GPU,
    CPU_CHUNK_ELEMENTS on the CPU."""
    elements = CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else CHUNK_ELEMENTS
    return max(1, elements // n_cols)


def _ppo_of_row(logp, entropy, old, adv, mask, ref, weights, **ppo) -> tuple[torch.Tensor, dict]:
    """ppo_loss over one row of N tokens (every input (N,), ref None or (N,))."""
    return ppo_loss(logp[None], old[None], adv[None], mask[None], ref_logp=None if ref is None else ref[None],
                    entropy=entropy[None], weights=weights[None], **ppo)


def linear_ppo_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              old_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                              weights: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
                              temperature: float = 1.0, **ppo) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The unfused path: materialised logits, the PyTorch statistics and PPO loss, autograd."""
    targets = torch.where(mask != 0, targets, -100)
    logp, entropy, _ = token_stats(hidden @ weight.T, targets, temperature, impl="torch")
    old_logp = logp.detach() if old_logp is None else old_logp  # on-policy: ratio 1
    loss, metrics = _ppo_of_row(logp, entropy, old_logp, advantages, mask, ref_logp, weights, impl="torch", **ppo)
    return loss, metrics, logp.detach()


def _ppo_of_chunk(logp, entropy, per_token: list, ppo: dict, needs_grad: bool):
    """The PPO loss of one row chunk (every input (R,)), its metrics, and when needs_grad d loss / d logp and
    d loss / d entropy, each (R,), by the PPO loss's own backward: each token's loss is computed once."""
    lp, ent = (x.detach().requires_grad_(needs_grad) for x in (logp, entropy))
    with torch.enable_grad():
        loss, metrics = _ppo_of_row(lp, ent, *per_token, **ppo)
    return loss.detach(), metrics, torch.autograd.grad(loss, (lp, ent)) if needs_grad else (None, None)


@torch.no_grad()
def _forward(hidden, weight, targets, per_token: list, cfg: SliceConfig, ppo: dict, group, chunk_rows: int,
             needs: tuple[bool, bool]):
    """(loss, metrics, logp (N,), grad_hidden, grad_weight); see the module doc. per_token: old .. weights."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    logp = torch.empty(n, dtype=acc, device=hidden.device)  # (N,)
    grad_hidden = torch.empty_like(hidden) if needs[0] else None  # (N, H)
    grad_weight = None  # (V, H) fp32: the first chunk's product, then each chunk's added in place
    tokens = (per_token[2] != 0).sum().clamp(min=1).to(acc)  # the metrics are token-means over the mask
    loss, metrics = 0.0, {}
    for r0 in range(0, max(n, 1), chunk_rows):  # no rows: one empty chunk, for the (zero) loss and metrics
        rows = slice(r0, min(r0 + chunk_rows, n))
        h = hidden[rows]  # (R, H)
        logits = mm_acc(h, weight.T)  # (R, V) fp32
        (logp[rows], entropy, _), lse_mu, _ = finished_stats(logits, targets[rows], cfg, group)
        chunk = [None if x is None else x[rows] for x in per_token]
        chunk[0] = logp[rows] if chunk[0] is None else chunk[0]  # on-policy: each token's old log-prob is its own
        chunk_loss, chunk_metrics, (d_logp, d_ent) = _ppo_of_chunk(logp[rows], entropy, chunk, ppo, any(needs))
        # the loss sum_t w_t loss_t adds up over the chunks, and each chunk's token-means weigh by its share of
        # the tokens (exactly 1 for a single chunk)
        loss = loss + chunk_loss
        share = (chunk[2] != 0).sum().to(acc) / tokens
        metrics = {name: metrics.get(name, 0.0) + value * share for name, value in chunk_metrics.items()}
        if any(needs):
            # (R, V) d loss / d logits; V is only used by the self-certainty's term, absent here
            dz = token_stats_grad(logits, targets[rows], lse_mu[0], lse_mu[1], (d_logp, d_ent, None), v, cfg,
                                  hidden.dtype)
            del logits  # free the fp32 chunk before the GEMMs allocate theirs
            if needs[0]:
                grad_hidden[rows] = mm_acc(dz, weight)
            if needs[1]:
                grad_weight = mm_acc(dz.T, h, out=grad_weight)
    return loss, metrics, logp, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


class _LinearPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.set_materialize_grads(False)
        return loss.detach()  # not the input itself, which autograd would hand out as a view (no in-place)

    @staticmethod
    def backward(ctx, g_loss):
        if g_loss is None:
            return (None,) * 5
        scaled = [None if g is None else g * g_loss.to(g.dtype) for g in ctx.saved_tensors]  # d(g loss) = g d loss
        return *scaled, None, None, None


def _check(hidden, weight, per_token: dict, chunk_rows: int | None, vocab_start: int, group, temperature) -> None:
    check_head(hidden, weight, "linear_ppo_loss")
    for name, x in per_token.items():
        if x is not None and (x.shape != hidden.shape[:1] or x.device != hidden.device):
            raise ValueError(f"linear_ppo_loss: {name} must be ({hidden.shape[0]},) on {hidden.device}, got "
                             f"{tuple(x.shape)} on {x.device}")
    if vocab_start != 0 and group is None:
        raise ValueError("linear_ppo_loss: vocab_start is the offset of a vocab-parallel slice: pass its group")
    if (chunk_rows is not None and chunk_rows <= 0) or not temperature > 0:
        raise ValueError(f"linear_ppo_loss: chunk_rows and temperature must be > 0, got {chunk_rows}, {temperature}")


def linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor | None,
                    advantages: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, *,
                    ref_logp: torch.Tensor | None = None, temperature: float = 1.0, clip_low: float = 0.2,
                    clip_high: float = 0.28, dual_clip: float | None = 3.0, kl_coef: float = 0.0,
                    kl_estimator: str = "k3", kl_clamp: float | None = None, entropy_coef: float = 0.0,
                    vocab_start: int = 0, group=None,
                    chunk_rows: int | None = None, impl: str = "auto", block_size: int | None = None,
                    debug: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(loss, metrics, logp) of the PPO loss sum_t weights_t loss_t over the tokens where mask is nonzero,
    loss_t as in kernels/ppo_loss.py from logp_t and entropy_t of the logits hidden @ weight.T / temperature.
    Per token (N,): targets, old_logp, advantages, mask, weights, ref_logp. The loss is differentiable
    w.r.t. hidden and weight; logp (N,) fp32 comes detached (masked tokens 0); metrics as ppo_loss's,
    entropy included. old_logp None: on-policy, each token's own logp (the module doc). chunk_rows: rows per
    chunk (default: default_chunk_rows of the weight's device)."""
    _check(hidden, weight, dict(targets=targets, old_logp=old_logp, advantages=advantages, mask=mask,
                                weights=weights, ref_logp=ref_logp), chunk_rows, vocab_start, group, temperature)
    targets = check_targets_shape(targets, hidden.shape[0], "linear_ppo_loss", hidden.device)
    targets = torch.where(mask != 0, targets, -100)  # unmasked rows: never read, no gradient
    cfg = SliceConfig(temperature, vocab_start, -100, pick_impl(impl, hidden), block_size, debug_mode(debug))
    ppo = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
               kl_estimator=kl_estimator, kl_clamp=kl_clamp, entropy_coef=entropy_coef, impl=cfg.impl)
    rows = chunk_rows or default_chunk_rows(weight.shape[0], weight.device)
    per_token = [None if x is None else x.detach() for x in (old_logp, advantages, mask, ref_logp, weights)]
    needs = tuple(torch.is_grad_enabled() and x.requires_grad for x in (hidden, weight))
    loss, metrics, logp, *grads = _forward(hidden, weight, targets, per_token, cfg, ppo, group, rows, needs)
    return _LinearPPOLoss.apply(hidden, weight, loss, *grads), metrics, logp
