"""The learning-rate schedule (nanoufo/schedule.py) against hand-computed rates, and its use on optimizers:
past the schedule's end and with a warm-up that is a fractional number of steps.

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
    assert rates.count(max(rates)) == 1 and rates[5] == 3e-6  # the peak once: the top of the cosine is step 5
    assert rates[6] == pytest.approx(3e-6 * 0.5 * (1 + math.cos(math.pi / 53)))  # 53 cosine steps from step 5
    assert rates[5 + 26] == pytest.approx(3e-6 * 0.5 * (1 + math.cos(math.pi * 26 / 53)))  # about half way
    assert all(a > b for a, b in zip(rates[5:], rates[6:])) and rates[-1] < 0.01 * 3e-6
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
    half = 0.5 * (1 + math.cos(math.pi * 4 / 7))  # step 5: 4 of the 7 cosine steps from the peak at step 1
    rates = set_learning_rates(optimizers, cfg, 5)
    assert rates == pytest.approx({"lr/actor": 1e-3 * half, "lr/critic": 1e-2 * half})
    assert optimizers["critic"].param_groups[0]["lr"] == pytest.approx(1e-2 * half)


def rates(step: int, **options) -> dict[str, float]:
    """set_learning_rates at a step for a config of rates 1 (actor) and 2 (critic) and these options."""
    cfg = TrainConfig(actor_lr=1.0, critic_lr=2.0, **options)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizers = {"actor": torch.optim.SGD(params[:1], lr=0.0), "critic": torch.optim.SGD(params[1:], lr=0.0)}
    return set_learning_rates(optimizers, cfg, step)


def test_a_run_extended_past_its_schedule_stays_at_the_schedules_end():
    """lr_schedule_steps=58 (10% warm-up: 6 steps) in a run extended to 100 steps: the cosine reaches
    min_lr_ratio at step 58 and stays there; the steps before are on the 58-step curve."""
    run = dict(lr_schedule="cosine", min_lr_ratio=0.1, lr_warmup_ratio=0.1, lr_schedule_steps=58, max_steps=100)
    for step in (58, 59, 70, 99):
        assert rates(step, **run) == pytest.approx({"lr/actor": 0.1, "lr/critic": 0.2}), step
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 52 / 53))  # step 57: 52 of the 53 cosine steps done
    assert rates(57, **run)["lr/actor"] == pytest.approx(cosine) and cosine > 0.1 + 1e-4
    spans_100 = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 91))  # 0: the schedule spans max_steps (peak at 9)
    assert rates(58, **{**run, "lr_schedule_steps": 0})["lr/actor"] == pytest.approx(spans_100)
    assert rates(99, **{**run, "lr_schedule": "constant"})["lr/actor"] == 1.0


@pytest.mark.parametrize("ratio, steps, warmup", [(0.1, 58, 6), (0.29, 100, 29), (0.3, 10, 3), (0.07, 100, 7)])
def test_a_fractional_warm_up_is_rounded_to_the_nearest_step(ratio, steps, warmup):
    """10% of 58 steps is 5.8: 6 warm-up steps. In floats 0.29 x 100 = 28.999999999999996 (truncation would
    give 28) and 0.3 x 10 = 3.0000000000000004 (rounding up would give 4)."""
    run = dict(lr_warmup_ratio=ratio, max_steps=steps)
    assert rates(0, **run)["lr/actor"] == pytest.approx(1 / warmup)  # the first step: 1 / warm-up of the rate
    assert rates(warmup - 2, **run)["lr/actor"] == pytest.approx((warmup - 1) / warmup)
    assert rates(warmup - 1, **run)["lr/actor"] == 1.0  # reached at the warm-up's last step
