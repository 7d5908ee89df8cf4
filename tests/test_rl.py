"""RL maths (nanoufo/rl.py and the kernels' ppo_loss) against cases computed by hand.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_rl.py
"""
import math

import pytest
import torch

from nanoufo.kernels.ppo_loss import ppo_loss
from nanoufo.kernels.token_stats import token_stats
from nanoufo import rl


def test_gae_gamma_lambda_one_is_return_minus_value_and_skips_feedback_tokens():
    # token 0 prompt, tokens 1-2 attempt 0, token 3 feedback (not an action), token 4 attempt 1
    mask = torch.tensor([[0, 1, 1, 0, 1]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 9.0, 0.8]])  # 9.0 on non-actions must never be used
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.5, 0.4, 0.0, 0.2]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]]))


def test_gae_with_discount_and_lambda():
    mask = torch.tensor([[0, 1, 1, 0, 1]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 9.0, 0.8]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t4: 1 - 0.8 = 0.2; t2: 0.9*0.8 - 0.6 + 0.45*0.2 = 0.21; t1: 0.9*0.6 - 0.5 + 0.45*0.21 = 0.1345
    assert torch.allclose(adv, torch.tensor([[0.0, 0.1345, 0.21, 0.0, 0.2]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.6345, 0.81, 0.0, 1.0]]))


def test_masked_whiten_ignores_unmasked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    out = rl.masked_whiten(x, torch.tensor([[1, 1, 1, 0]]))
    s = math.sqrt(1.5)  # mean 2, population variance 2/3
    assert torch.allclose(out, torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-5)


def test_group_advantages_normalize_within_each_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = rl.group_advantages(scores, group_size=4)
    a = 0.5 / math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), atol=1e-5)
    with pytest.raises(AssertionError):
        rl.group_advantages(scores[:7], group_size=4)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert torch.allclose(rl.kl_penalty(logp, ref, "k1"), torch.tensor([math.log(2.0)]))
    assert torch.allclose(rl.kl_penalty(logp, ref, "k3"), torch.tensor([0.5 - math.log(0.5) - 1.0]))
    assert rl.kl_penalty(ref, ref, "k3").item() == 0.0
    far = torch.tensor([30.0, -30.0], dtype=torch.float64)  # ref - logp past the +-20 clamp of k3
    assert torch.allclose(rl.kl_penalty(torch.zeros(2, dtype=torch.float64), far, "k3"),
                          torch.tensor([math.exp(20) - 21, math.exp(-20) + 19], dtype=torch.float64))
    capped = rl.kl_penalty(torch.zeros(3, dtype=torch.float64), torch.tensor([3.0, -12.0, -0.5]).double(), "k3", 10.0)
    assert capped.tolist() == pytest.approx([10.0, 10.0, math.exp(-0.5) - 0.5])  # verl's low_var_kl clamp
    with pytest.raises(AssertionError):
        rl.kl_penalty(logp, ref, "k2")


def test_self_certainty_score_reads_the_logits_one_position_early():
    # tokens 0-1 prompt, tokens 2-3 response; logits at position j predict token j+1
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    tokens = torch.tensor([0, 1, 2, 0])
    _, _, sc = token_stats(logits[:-1], tokens[1:])  # (T-1,) position j for target j+1
    aligned = torch.cat([sc.new_zeros(1), sc])[None]  # (1, T): token j+1's statistic at j+1
    score = rl.sequence_self_certainty(aligned, torch.tensor([[0, 0, 1, 1]]))
    sc1 = math.log(3.0)  # position 1: logsumexp(0, 0, 0) - 0
    sc2 = math.log(math.exp(2.0) + 2.0) - 2.0 / 3.0  # position 2
    assert score.item() == pytest.approx((sc1 + sc2) / 2, abs=1e-5)
    sc3 = math.log(math.exp(5.0) + 2.0) - 5.0 / 3.0  # what a reader one position late would use
    assert abs(score.item() - (sc2 + sc3) / 2) > 0.1


def test_reward_on_last_sampled_token():
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    placed = rl.place_rewards(mask, episode_rewards=torch.tensor([0.5, -0.25]))
    expected = torch.zeros(2, 8)
    expected[0, 6], expected[1, 1] = 0.5, -0.25
    assert torch.equal(placed, expected)
    with pytest.raises(ValueError, match="trajectory 1"):
        rl.place_rewards(torch.tensor([[1, 0], [0, 0]]), episode_rewards=torch.zeros(2))


def test_reward_per_turn_on_each_attempts_last_token():
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]])
    placed = rl.place_rewards(mask, turn_rewards=[[-0.1, 0.5]], turn_spans=[[(1, 3), (5, 7)]])
    expected = torch.zeros(1, 8)
    expected[0, 2], expected[0, 6] = -0.1, 0.5
    assert torch.allclose(placed, expected)
    with pytest.raises(ValueError, match="2 turns"):
        rl.place_rewards(mask, turn_rewards=[[0.5]], turn_spans=[[(1, 3), (5, 7)]])


def test_reward_per_step_on_the_given_tokens():
    mask = torch.tensor([[0, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]])
    placed = rl.place_rewards(mask, point_rewards=[[(2, 0.25), (3, -0.5), (3, 0.125), (5, 1.0)], []])
    expected = torch.zeros(2, 6)
    expected[0, 2], expected[0, 3], expected[0, 5] = 0.25, -0.375, 1.0
    assert torch.equal(placed, expected)
    with pytest.raises(ValueError, match="trajectory 1: token 3 was not sampled"):
        rl.place_rewards(mask, point_rewards=[[], [(3, 1.0)]])


def test_step_rewards_telescope_to_the_min_or_the_product():
    scores = [0.9, 0.6, 0.8, 0.3]
    assert rl.step_rewards(scores, "min") == pytest.approx([0.9, -0.3, 0.0, -0.3])  # sum 0.3 = min
    # running products 0.9, 0.54, 0.432, 0.1296
    assert rl.step_rewards(scores, "product") == pytest.approx([0.9, -0.36, -0.108, -0.3024])
    assert sum(rl.step_rewards(scores, "product")) == pytest.approx(0.9 * 0.6 * 0.8 * 0.3)
    assert rl.step_rewards([], "min") == []
    with pytest.raises(AssertionError):
        rl.step_rewards(scores, "mean")


def test_group_filter_keeps_the_groups_with_the_largest_spread():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.25, 0.0])
    assert rl.group_filter(scores, group_size=2, keep_groups=2).tolist() == [2, 3, 6, 7]
    assert rl.group_filter(scores, group_size=2, keep_groups=3).tolist() == [2, 3, 6, 7, 8, 9]
    with pytest.raises(AssertionError):
        rl.group_filter(scores, group_size=2, keep_groups=6)


# One token per case: (advantage, ratio) -> hand-computed loss with clip 0.2 / 0.28 and dual clip 3.
PPO_CASES = [(1.0, 1.5, -1.28),  # upper clip
             (1.0, 0.5, -0.5),  # below the lower clip with A > 0: unclipped
             (-1.0, 1.5, 1.5),  # A < 0, ratio up: unclipped, under the dual clip
             (-1.0, 5.0, 3.0),  # dual clip caps the loss at 3 |A|
             (-1.0, 0.5, 0.8)]  # lower clip


@pytest.mark.parametrize("aggregation, expected", [
    ("token-mean", (-1.28 - 0.5 + 1.5 + 3.0 + 0.8) / 5),
    ("seq-mean", ((-1.28 - 0.5) / 2 + (1.5 + 3.0 + 0.8) / 3) / 2)])
def test_ppo_loss_both_clips(aggregation, expected):
    adv = torch.tensor([[c[0] for c in PPO_CASES]])
    logp = torch.log(torch.tensor([[c[1] for c in PPO_CASES]]))
    old = torch.zeros_like(logp)
    rows = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])  # two sequences sharing the five columns
    loss, _ = ppo_loss(logp.expand(2, 5), old.expand(2, 5), adv.expand(2, 5), rows.float(),
                       clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=aggregation)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
