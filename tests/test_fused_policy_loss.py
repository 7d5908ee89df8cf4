"""The trainer's policy loss runs the LM head fused with the PPO loss (kernels/linear_ppo_loss.py); it must
equal the unfused path it replaced (sequence_stats, then ppo_loss with the same per-token weights), padded and
packed, in the loss, the metrics and the gradients of every actor parameter.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_fused_policy_loss.py
"""
import pytest
import torch

from nanoufo.kernels.ppo_loss import ppo_loss
from nanoufo import rl
from nanoufo.config import TrainConfig
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.parallel import SINGLE
from nanoufo.trainer import Batch, policy_loss, sequence_stats
from trainer_utils import update_rows

LENGTHS = [9, 5, 12]


def _actor() -> Qwen2:
    config = QwenConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    actor = Qwen2(config, par=SINGLE)
    actor.init_weights(torch.Generator().manual_seed(0))
    return actor


def _batch(actor: Qwen2) -> Batch:
    g = torch.Generator().manual_seed(1)
    B, T = len(LENGTHS), max(LENGTHS)
    tokens = torch.randint(0, actor.config.vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T)
    for b, n in enumerate(LENGTHS):
        tokens[b, n:] = 0
        mask[b, 3:n] = 1.0  # a 3-token prompt, then sampled tokens
    with torch.no_grad():
        old = sequence_stats(actor, tokens, 0.7)[0] + 0.2 * torch.randn(B, T, generator=g) * mask
    ref = old + 0.1 * torch.randn(B, T, generator=g) * mask
    return Batch(tokens, mask, old, torch.randn(B, T, generator=g) * mask, ref_logp=ref, temperature=0.7)


def _unfused(cfg: TrainConfig, actor: Qwen2, mb: Batch, weights: torch.Tensor):
    logp, entropy, _ = sequence_stats(actor, mb.tokens, mb.temperature)
    return ppo_loss(logp, mb.old_logp, mb.advantages, mb.mask, ref_logp=mb.ref_logp, entropy=entropy,
                    clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl_coef=cfg.kl_coef,
                    kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, weights=weights)


def _grads(actor: Qwen2, loss: torch.Tensor) -> list[torch.Tensor]:
    actor.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in actor.parameters() if p.grad is not None]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_fused_policy_loss_equals_the_unfused_path(packed, aggregation):
    cfg = TrainConfig(kl_in="loss", kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, aggregation=aggregation)
    actor = _actor()
    mb = _batch(actor)
    weights = rl.loss_weights(mb.mask, aggregation)
    want, want_metrics = _unfused(cfg, actor, mb, weights)
    want_grads = _grads(actor, want)
    got, got_metrics = policy_loss(cfg, actor, update_rows(mb, weights, LENGTHS if packed else None))
    got_grads = _grads(actor, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, value in want_metrics.items():
        torch.testing.assert_close(got_metrics[f"pg/{name}"], value, rtol=1e-5, atol=1e-6)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert got_metrics["ratio_dev"] > 0  # the perturbed old log-probs are seen through the taken ones
