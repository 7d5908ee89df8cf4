"""The learning-rate schedule (nanoufo/schedule.py) against hand-computed rates, and its use on optimizers.

    python -m pytest -q tests/test_schedule.py
"""
import math

import pytest
import torch

from nanoufo.config import TrainConfig
from nanoufo.schedule import lr_at, set_learning_rates


def test_warmup_then_cosine_or_constant():
    # Intuitor's shape: 58 steps, 10% warm-up (6 steps), cosine to 0
    rates = [lr_at(s, 3e-6, 58, 6, "cosine") for s in range(58)]
    assert rates[:6] == pytest.approx([3e-6 * (s + 1) / 6 for s in range(6)])  # never a zero-rate step
    assert rates[6] == pytest.approx(3e-6)  # the top of the cosine
    assert rates[6 + 26] == pytest.approx(3e-6 * 0.5 * (1 + math.cos(math.pi * 26 / 52)))  # half way: 1.5e-6
    assert all(a > b for a, b in zip(rates[6:], rates[7:])) and rates[-1] < 0.01 * 3e-6
    assert lr_at(58, 3e-6, 58, 6, "cosine") == pytest.approx(0.0, abs=1e-20)
    assert lr_at(58, 1.0, 58, 6, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert [lr_at(s, 1.0, 10, 2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]  # warm-up, then constant
    assert [lr_at(s, 1.0, 10) for s in (0, 9)] == [1.0, 1.0]  # the default: no schedule at all
    with pytest.raises(AssertionError):
        lr_at(0, 1.0, 10, schedule="linear")


def test_set_learning_rates_writes_every_param_group_of_actor_and_critic():
    cfg = TrainConfig(actor_lr=1e-3, critic_lr=1e-2, lr_schedule="cosine", lr_warmup_ratio=0.25, max_steps=8)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    optimizers = {"actor": torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:2]}], lr=cfg.actor_lr),
                  "critic": torch.optim.AdamW(params[2:], lr=cfg.critic_lr)}
    assert set_learning_rates(optimizers, cfg, 0) == pytest.approx({"lr/actor": 5e-4, "lr/critic": 5e-3})
    assert [g["lr"] for g in optimizers["actor"].param_groups] == pytest.approx([5e-4, 5e-4])
    rates = set_learning_rates(optimizers, cfg, 5)  # 3 of the 6 cosine steps done: half the base rate
    assert rates == pytest.approx({"lr/actor": 5e-4, "lr/critic": 5e-3})
    assert optimizers["critic"].param_groups[0]["lr"] == pytest.approx(5e-3)
