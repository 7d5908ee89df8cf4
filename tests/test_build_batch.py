"""build_batch (nanoufo/trainer.py) on a hand-made rollout whose every number is worked out below: the group
filter, rewards placed at the last token or per turn, the KL penalty to a reference that differs from the
actor, GAE, whitening and GRPO's group advantages (with the KL in the reward: its sampled tokens only). The
models' statistics are fixed functions of the tokens (the forwards are tested in test_trainer.py), so only the
wiring between the RL pieces is under test.

    python -m pytest -q tests/test_build_batch.py
"""
import math

import pytest
import torch

from nanoufo import trainer
from nanoufo.config import TrainConfig
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.rollout import Graded
from nanoufo.sampler import Rollout
from nanoufo.trainer import build_batch

TINY = QwenConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)

# Six episodes, three groups of two. Token layout: prompt (0-1), attempt 1 (2-3), feedback (4), attempt 2 (5).
TOKENS = [[1, 2, 7, 7, 9, 7], [1, 2, 7, 7, 9, 7],  # group 0: equal scores, spread 0: dropped
          [1, 2, 3, 4, 9, 5], [1, 2, 6, 7, 0, 0],  # group 1: solved at turn 1 (two attempts), at turn 0
          [1, 2, 3, 6, 0, 0], [1, 2, 4, 4, 9, 5]]  # group 2: solved at turn 0, never solved
TWO_TURNS, ONE_TURN = [0, 0, 1, 1, 0, 1], [0, 0, 1, 1, 0, 0]
MASKS = [TWO_TURNS, TWO_TURNS, TWO_TURNS, ONE_TURN, ONE_TURN, TWO_TURNS]
TURN_REWARDS = [[0.0, 0.5], [0.0, 0.5], [0.25, 0.25], [1.0], [1.0], [-0.1, -0.15]]  # scores 0.5 .5 .5 1 1 -.25
KEPT = [2, 3, 4, 5]  # spreads (population std) 0, 0.25, 0.625: groups 1 and 2 kept, in order
ACTIONS = [(2, 2), (2, 3), (2, 5), (3, 2), (3, 3), (4, 2), (4, 3), (5, 2), (5, 3), (5, 5)]  # (row, t) sampled


def rollout() -> Graded:
    """The rows as run_episodes returns them: the sampler's rollout and the environment's turn rewards (the
    records are not read by build_batch)."""
    mask = torch.tensor(MASKS, dtype=torch.float32)
    spans = [[(2, 4), (5, 6)] if m == TWO_TURNS else [(2, 4)] for m in MASKS]
    tokens = torch.tensor(TOKENS)
    sampled = Rollout(tokens=tokens, lengths=torch.tensor([6 if m == TWO_TURNS else 4 for m in MASKS]),
                      loss_mask=mask, logprobs=-0.1 * tokens * mask, turn_spans=spans, n_prefill_tokens=0,
                      n_decode_steps=0)
    return Graded(sampled, [None] * len(TOKENS), TURN_REWARDS, group_size=2)


def batch_of(cfg: TrainConfig, actor, critic, ref):
    """build_batch on the rollout scored with the environment's rewards (score_rollout, reward "gold")."""
    scored, _ = trainer.score_rollout(cfg, actor, rollout())
    return build_batch(cfg, actor, critic, ref, scored)


@pytest.fixture
def models(monkeypatch):
    """(actor, critic, ref) whose statistics are: actor log-prob -0.1 * token; reference log-prob 0.2 lower on
    odd tokens (so the k1 KL is 0.2 on odd tokens, 0 on even ones); critic value 0.1 * token."""
    actor, ref, critic = Qwen2(TINY), Qwen2(TINY), Qwen2(TINY, value_head=True)

    def stats(model, forward, *args, **kwargs):  # of each predicted token (N,)
        assert model is actor or model is ref, "token_stats called on a model that is neither actor nor reference"
        token = forward.targets.clamp(min=0)  # the token each hidden row predicts (-100: none)
        logp = -0.1 * token.float() - (0.2 * (token % 2) if model is ref else 0.0)  # (N,)
        return logp, torch.zeros_like(logp), torch.zeros_like(logp)

    monkeypatch.setattr(trainer, "token_stats", stats)
    monkeypatch.setattr(trainer, "token_values", lambda model, forward: 0.1 * forward.targets.clamp(min=0).float())
    return actor, critic, ref


def on_sampled(batch, x: torch.Tensor) -> torch.Tensor:
    """x on the sampled tokens, 0 elsewhere: the scoring forwards run the head only on the rows predicting them."""
    return x * batch.mask


def config(**overrides) -> TrainConfig:
    options = dict(problems_per_step=3, n_samples_per_problem=2, keep_groups=2, max_turns=2, kl_coef=0.5,
                   kl_estimator="k1", kl_in="reward", gamma=0.5, lam=1.0, whiten_advantages=False, minibatch_size=4)
    return TrainConfig(**{**options, **overrides})


def on_actions(values: list[float]) -> torch.Tensor:
    """(4, 6) tensor holding values at ACTIONS (kept rows renumbered 0-3), zero elsewhere."""
    out = torch.zeros(4, 6)
    for (row, t), v in zip(ACTIONS, values):
        out[KEPT.index(row), t] = v
    return out


# Worked by hand with gamma 0.5, lam 1 (so advantage = discounted return G - value, return = G), rewards =
# score (or turn rewards) at the reward tokens minus kl_coef 0.5 * KL 0.2 = 0.1 on every odd sampled token.
# row 2 "last": r = -0.1, 0, -0.1 + 0.5 -> G = 0.0, 0.2, 0.4; V = 0.3, 0.4, 0.5
# row 3:        r = 0, -0.1 + 1.0      -> G = 0.45, 0.9;     V = 0.6, 0.7
# row 4:        r = -0.1, 1.0          -> G = 0.4, 1.0;      V = 0.3, 0.6
# row 5 "last": r = 0, 0, -0.1 - 0.25  -> G = -0.0875, -0.175, -0.35; V = 0.4, 0.4, 0.5
RETURNS_LAST = [0.0, 0.2, 0.4, 0.45, 0.9, 0.4, 1.0, -0.0875, -0.175, -0.35]
VALUES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.3, 0.6, 0.4, 0.4, 0.5]
# "per_turn": row 2 gets 0.25 at t 3 and 0.25 at t 5: r = -0.1, 0.25, 0.15 -> G = 0.0625, 0.325, 0.15;
# row 5 gets -0.1 at t 3 and -0.15 at t 5: r = 0, -0.1, -0.25 -> G = -0.1125, -0.225, -0.25
RETURNS_PER_TURN = [0.0625, 0.325, 0.15, 0.45, 0.9, 0.4, 1.0, -0.1125, -0.225, -0.25]


@pytest.mark.parametrize("placement, returns", [("last", RETURNS_LAST), ("per_turn", RETURNS_PER_TURN)])
def test_ufo_ppo_rewards_kl_and_gae_by_hand(models, placement, returns):
    actor, critic, ref = models
    batch, stats = batch_of(config(reward_placement=placement), actor, critic, ref)
    assert batch.tokens.tolist() == [TOKENS[i] for i in KEPT]
    assert batch.mask.tolist() == [MASKS[i] for i in KEPT]
    assert torch.allclose(batch.old_logp, on_sampled(batch, -0.1 * batch.tokens.float()))  # the actor's, not the ref's
    assert torch.allclose(batch.ref_logp, on_sampled(batch, -0.1 * batch.tokens.float() - 0.2 * (batch.tokens % 2)))
    assert stats["score"] == pytest.approx(3.25 / 6) and stats["kept_score"] == pytest.approx(2.25 / 4)
    assert stats["kl_ref"] == pytest.approx(0.1)  # KL 0.2 on 5 of the 10 sampled tokens
    advantages = [g - v for g, v in zip(returns, VALUES)]
    assert torch.allclose(batch.advantages, on_actions(advantages), atol=1e-6)
    assert torch.allclose(batch.returns, on_actions(returns), atol=1e-6)


def test_whitening_is_over_the_sampled_tokens(models):
    actor, critic, ref = models
    batch, _ = batch_of(config(whiten_advantages=True), actor, critic, ref)
    raw = [g - v for g, v in zip(RETURNS_LAST, VALUES)]
    mean = sum(raw) / len(raw)
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / len(raw))  # population std over the 10 sampled tokens
    assert torch.allclose(batch.advantages, on_actions([(a - mean) / std for a in raw]), atol=1e-5)
    assert torch.allclose(batch.returns, on_actions(RETURNS_LAST), atol=1e-6)  # the critic's targets stay raw


def test_kl_in_the_loss_leaves_the_rewards_alone(models):
    actor, critic, ref = models
    batch, _ = batch_of(config(kl_in="loss"), actor, critic, ref)
    # no KL in the rewards: row 2 G = 0.125, 0.25, 0.5; row 3 0.5, 1; row 4 0.5, 1; row 5 -0.0625, -0.125, -0.25
    returns = [0.125, 0.25, 0.5, 0.5, 1.0, 0.5, 1.0, -0.0625, -0.125, -0.25]
    assert torch.allclose(batch.returns, on_actions(returns), atol=1e-6)
    assert torch.allclose(batch.ref_logp, on_sampled(batch, -0.1 * batch.tokens.float() - 0.2 * (batch.tokens % 2)))


def test_grpo_group_advantages_on_every_sampled_token(models):
    actor, _, ref = models
    batch, stats = batch_of(config(algorithm="grpo", kl_in="loss"), actor, None, ref)
    # group 1 scores 0.5, 1.0 and group 2 scores 1.0, -0.25: (s - mean) / sample std = -/+ 1/sqrt(2) each
    s = 1 / math.sqrt(2)
    per_row = [-s, s, s, -s]
    expected = torch.tensor(per_row)[:, None] * torch.tensor([MASKS[i] for i in KEPT], dtype=torch.float32)
    assert batch.tokens.tolist() == [TOKENS[i] for i in KEPT]
    assert torch.allclose(batch.advantages, expected, atol=1e-5)
    assert torch.allclose(batch.ref_logp, on_sampled(batch, -0.1 * batch.tokens.float() - 0.2 * (batch.tokens % 2)))


def test_grpo_kl_in_the_reward_counts_only_the_sampled_tokens(models):
    """kl_in="reward" under GRPO lowers each score by kl_coef x its KL summed over its sampled tokens only. One
    group, equal scores 0.5: row A has one odd sampled token (KL 0.2) and odd tokens in its prompt and feedback,
    row B three odd sampled tokens and none elsewhere. Scores 0.5 - 0.5 x 0.2 = 0.4 and 0.5 - 0.5 x 0.6 = 0.2,
    so A's advantage is +1/sqrt(2) (the off-mask tokens counted too would make it 0.1 and flip the signs)."""
    actor, _, ref = models
    tokens = torch.tensor([[3, 5, 3, 2, 9, 2], [2, 2, 3, 3, 2, 3]])
    mask = torch.tensor([TWO_TURNS, TWO_TURNS], dtype=torch.float32)
    rows = Graded(Rollout(tokens, torch.tensor([6, 6]), mask, -0.1 * tokens * mask, [[(2, 4), (5, 6)]] * 2, 0, 0),
                  [None, None], [[0.25, 0.25], [0.25, 0.25]], group_size=2)  # scores 0.5
    cfg = config(algorithm="grpo", problems_per_step=1, keep_groups=0, minibatch_size=2)
    batch, stats = build_batch(cfg, actor, None, ref, trainer.score_rollout(cfg, actor, rows)[0])
    s = 1 / math.sqrt(2)
    assert torch.allclose(batch.advantages, torch.tensor([[s], [-s]]) * mask, atol=1e-5)
    assert stats["kl_ref"] == pytest.approx(0.8 / 6)  # KL 0.2 on 4 of the 6 sampled tokens


def test_an_on_policy_ppo_batch_carries_the_samplers_log_probs_and_the_spans(models):
    """One optimizer step per rollout (one epoch, one minibatch, no KL in the reward): no old-log-prob forward;
    the batch holds the sampler's log-probs and the kept rows' spans, each in its own field."""
    actor, critic, ref = models
    batch, _ = batch_of(config(kl_in="loss", ppo_epochs=1), actor, critic, ref)
    sampled = rollout().rollout
    assert batch.old_logp is None
    assert torch.equal(batch.sampler_logp, sampled.logprobs[KEPT].float())
    assert batch.spans == [sampled.turn_spans[row] for row in KEPT]
