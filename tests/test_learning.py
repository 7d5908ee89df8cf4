"""End-to-end learning: RL from a random tiny model on a task whose optimal policy is known must climb to it.

The task: "Guess my number from 0 to 2", three attempts of one token each, the gold drawn at random. Every
answer is one token (\\boxed{0}, \\boxed{1}, \\boxed{2} are single tokens of the test's tokenizer), so each
attempt's one sampled token is the decision the reward is about. The optimal policy answers in range and
never repeats itself: it solves every episode within 3 attempts (Succ@3 = 1), while a policy that ignores
its earlier attempts solves at most 1 - (2/3)^3 = 0.70 of them. A random model starts near 0.

This is the check for what the unit tests of each piece cannot see: the advantage's sign, the reward on the
token it is about, credit across turns. tests/mutation.py plants a flipped advantage and a reward one token
early; both make this test fail.

    python -m pytest -q tests/test_learning.py
"""

import pytest
import torch

from nanoufo import demo
from nanoufo.config import TrainConfig
from nanoufo.data import Problem
from nanoufo.env import UFOEnv
from nanoufo.evaluate import evaluate
from nanoufo.rollout import run_episodes
from nanoufo.trainer import build_batch, make_optimizers, ppo_update, score_rollout

DIGITS = "012"
TURNS = 3


def task(n: int, seed: int) -> list[Problem]:
    g = torch.Generator().manual_seed(seed)
    golds = torch.randint(len(DIGITS), (n,), generator=g).tolist()
    return [Problem(f"Guess my number from 0 to {DIGITS[-1]}", DIGITS[d], f"learn:{i}") for i, d in enumerate(golds)]


def train(algorithm: str, steps: int, seed: int = 0) -> tuple[list[float], float]:
    """(training-batch Succ@3 per step, held-out Succ@3 at temperature 0.5 after the last step)."""
    tokenizer = demo.build_tokenizer(demo.WORDS + [f"\\boxed{{{d}}}" for d in DIGITS])
    env = UFOEnv(tokenizer, max_turns=TURNS, instruction="", turn_decay=1.0, repetition_penalty=0.0)
    cfg = TrainConfig(algorithm=algorithm, max_turns=TURNS, max_new_tokens=1, problems_per_step=16,
                      n_samples_per_problem=4, minibatch_size=32, actor_lr=3e-3, critic_lr=3e-3, kl_coef=0.0,
                      entropy_coef=0.0)
    torch.manual_seed(seed)
    actor = demo.build_model(len(tokenizer), seed)
    critic = demo.build_model(len(tokenizer), seed, value_head=True) if algorithm == "ufo_ppo" else None
    optimizers = make_optimizers(cfg, actor, critic)
    curve = []
    for step in range(steps):
        rollout = run_episodes(actor, env, task(cfg.problems_per_step, seed * 1000 + step),
                               n_samples_per_problem=cfg.n_samples_per_problem, max_new_tokens=1, temperature=1.0,
                               seed=seed * 1000 + step)
        scored, _ = score_rollout(cfg, actor, rollout)
        batch, _ = build_batch(cfg, actor, critic, None, scored)
        ppo_update(cfg, actor, critic, optimizers, batch, seed=step)
        curve.append(sum(e.solved for e in rollout.episodes) / len(rollout.episodes))
    table = evaluate(actor, env, task(200, seed + 1), k=TURNS, max_new_tokens=1, temperature=0.5, seed=seed,
                     progress=False)
    return curve, table[f"succ@{TURNS}"]


@pytest.mark.parametrize("algorithm", ["ufo_ppo", "grpo"])
def test_rl_learns_the_optimal_policy(torch_paths, algorithm):
    curve, held_out = train(algorithm, steps=60)
    print(algorithm, [round(c, 2) for c in curve], held_out)
    assert curve[0] < 0.3 and held_out > 0.9
