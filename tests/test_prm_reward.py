"""The PRM as a training reward (nanoufo/prm.py PRMReward, rl.step_rewards, rl.place_rewards "per_step")
against hand-worked episodes, with a fake PRM and the demo's one-character-per-token tokenizer so every
step's last token is known by hand; and where steps end in real Qwen2.5 tokens.

    python -m pytest -q tests/test_prm_reward.py
"""
import pytest
import torch

from nanoufo import demo, rl
from nanoufo.data import Problem
from nanoufo.env import Episode
from nanoufo.prm import PRMReward, blend, step_last_tokens, step_spans
from nanoufo.rollout import Graded
from nanoufo.sampler import Rollout

STOP = 2  # <|im_end|> in the demo tokenizer


class DigitScorer:
    """A fake PRM: a step scores its last character as tenths ("s9" scores 0.9)."""

    def step_scores(self, questions, step_lists):
        return [torch.tensor([int(s[-1]) / 10 for s in steps]) if steps else None for steps in step_lists]


def rollout_of(tokenizer, episodes: list[Episode], gold: list[list[float]]) -> Graded:
    """Rows of a 3-token prompt, then each attempt's characters and a stop token, with a 2-token feedback
    turn in between; the spans are the attempts' sampled tokens (stop token included). As run_episodes
    returns it: the episodes, and the environment's reward of each attempt (gold)."""
    rows, spans = [], []
    for attempts in [e.responses for e in episodes]:
        ids, row_spans = [1, 1, 1], []
        for i, text in enumerate(attempts):
            ids += [1, 1] if i else []
            start = len(ids)
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [STOP]
            row_spans.append((start, len(ids)))
        rows.append(ids)
        spans.append(row_spans)
    width = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.zeros(tokens.shape)
    for b, row_spans in enumerate(spans):
        for start, end in row_spans:
            mask[b, start:end] = 1.0
    return Graded(Rollout(tokens, torch.tensor(list(map(len, rows))), mask, torch.zeros(tokens.shape), spans, 0, 0),
                  episodes, gold, group_size=1)


def test_blend_by_hand():
    # PRM scores 0.8 and 0.4 over two attempts (mean 0.6), gold 0 then 0.5; a quarter gold
    assert blend([0.8, 0.4], [0.0, 0.5], 0.25) == pytest.approx([0.75 * 0.4, 0.75 * 0.2 + 0.125])
    assert blend([0.8], [1.0], 0.0) == [0.8] and blend([0.8], [1.0], 1.0) == [1.0]


def test_prm_rewards_by_hand_for_every_placement():
    tokenizer = demo.build_tokenizer()
    episodes = [Episode(Problem("q0", "6", "e0"), ["s9\n\ns6"]),  # one attempt, steps 0.9 and 0.6
                Episode(Problem("q1", "2", "e1"), ["s5", "s8\n\n\n\ns2"]),  # 0.5; then 0.8 and 0.2
                Episode(Problem("q2", "1", "e2"), [" "])]  # no steps: the PRM cannot score it
    rollout = rollout_of(tokenizer, episodes, gold=[[1.0], [0.0, 0.5], [0.0]])
    out = PRMReward(DigitScorer(), tokenizer, "min", gold_weight=0.5)(rollout)
    # e0: min 0.6 -> 0.5 * 0.6 + 0.5 * 1.0 = 0.8; e1: mean(0.5, 0.2) / 2 ... -> 0.125 + (0.05 + 0.25) = 0.425
    assert out.scores.tolist() == pytest.approx([0.8, 0.425, 0.0])
    assert out.turn_rewards == [pytest.approx([0.8]), pytest.approx([0.125, 0.3]), [0.0]]
    assert out.unscored == 1 and out.prm_mean == pytest.approx((0.6 + 0.5 + 0.2 + 0.0) / 4)
    # per step, e0's attempt starts at token 3: "s9" ends at 4, "s6" at 8, its stop token is 9;
    # step rewards min-telescoped (0.9, -0.3) times (1 - 0.5) / 1 attempt; gold 0.5 * 1.0 on the stop token
    e0 = sorted(out.step_points[0])
    assert [i for i, _ in e0] == [4, 8, 9] and [v for _, v in e0] == pytest.approx([0.45, -0.15, 0.5])
    # e1: "s5" is tokens 3-4 (stop 5), feedback 6-7, "s8\n\n\n\ns2" from 8: "s8" ends at 9, "s2" at 15, stop 16
    e1 = sorted(out.step_points[1])
    assert [i for i, _ in e1] == [4, 9, 15, 16]
    assert [v for _, v in e1] == pytest.approx([0.25 * 0.5, 0.25 * 0.8, 0.25 * -0.6, 0.5 * 0.5])
    assert out.step_points[2] == []
    placed = rl.place_rewards(rollout.rollout.loss_mask, point_rewards=out.step_points)
    assert placed.sum(1).tolist() == pytest.approx(out.scores.tolist())  # every placement sums to the score
    per_turn = rl.place_rewards(rollout.rollout.loss_mask, turn_rewards=out.turn_rewards,
                                turn_spans=rollout.rollout.turn_spans)
    assert per_turn.sum(1).tolist() == pytest.approx(out.scores.tolist())


def test_product_aggregate_and_pure_prm():
    tokenizer = demo.build_tokenizer()
    episodes = [Episode(Problem("q0", "6", "e0"), ["s9\n\ns6"])]
    rollout = rollout_of(tokenizer, episodes, gold=[[1.0]])
    out = PRMReward(DigitScorer(), tokenizer, "product")(rollout)
    assert out.scores.tolist() == pytest.approx([0.54])
    assert sorted(out.step_points[0]) == [(4, pytest.approx(0.9)), (8, pytest.approx(-0.36))]
    with pytest.raises(AssertionError):  # the config's checks come first (test_config.py)
        PRMReward(DigitScorer(), tokenizer, "min", gold_weight=1.5)


def test_step_last_tokens_in_qwen_tokens(qwen_tokenizer):
    text = "We have 48 / 2 = 24 clips in May.\n\nIn all, 48 + 24 = 72.\n\nSo the answer is \\boxed{72}. 你好"
    ids = qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = [e for _, e in step_spans(text)]
    for end, i in zip(ends, step_last_tokens(qwen_tokenizer, ids, ends), strict=True):
        assert len(qwen_tokenizer.decode(ids[:i])) < end <= len(qwen_tokenizer.decode(ids[:i + 1]))
    assert step_last_tokens(qwen_tokenizer, ids, ends)[-1] == len(ids) - 1
