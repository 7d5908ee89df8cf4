"""The learning-rate schedule (nanoufo/schedule.py) against hand-computed rates (verl's
get_cosine_schedule_with_warmup worked by hand: Intuitor's run, warm-up int(0.1 x 58) = 5 steps from lr 0), and
its use on optimizers: past the schedule's end and with a warm-up that is a fractional number of steps.

    python -m pytest -q tests/test_schedule.py
"""
import math

import pytest
import torch

from nanoufo.config import TrainConfig
from nanoufo.schedule import lr_at, set_learning_rates, warmup_steps


def test_warmup_then_cosine_or_constant():
    # Intuitor's run: 58 steps, warm-up int(5.8) = 5 steps from 0, cosine to 0 (verl's torch_functional.py:556-561)
    rates = [lr_at(s, 3e-6, 58, 5, "cosine") for s in range(58)]
    assert rates[:6] == pytest.approx([0.0, 0.6e-6, 1.2e-6, 1.8e-6, 2.4e-6, 3e-6])  # update 0 at lr 0
    assert rates.count(max(rates)) == 1 and rates[5] == 3e-6  # the peak once, at the warm-up's end
    assert rates[6] == pytest.approx(3e-6 * 0.5 * (1 + math.cos(math.pi / 53)))  # 53 cosine steps from step 5
    assert rates[5 + 26] == pytest.approx(3e-6 * 0.5 * (1 + math.cos(math.pi * 26 / 53)))  # about half way
    assert all(a > b for a, b in zip(rates[5:], rates[6:])) and rates[-1] < 0.01 * 3e-6
    assert lr_at(58, 3e-6, 58, 5, "cosine") == pytest.approx(0.0, abs=1e-20)
    assert lr_at(58, 1.0, 58, 5, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert [lr_at(s, 1.0, 10, 2, "cosine", min_ratio=0.1) for s in range(2)] == pytest.approx([0.1, 0.55])  # verl's
    assert [lr_at(s, 1.0, 10, 2) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]  # warm-up from 0, then constant
    assert [lr_at(s, 1.0, 10) for s in (0, 9)] == [1.0, 1.0]  # the default: no schedule at all
    with pytest.raises(AssertionError):
        lr_at(0, 1.0, 10, schedule="linear")


def test_set_learning_rates_writes_every_param_group_of_actor_and_critic():
    cfg = TrainConfig(actor_lr=1e-3, critic_lr=1e-2, lr_schedule="cosine", lr_warmup_ratio=0.25, max_steps=8)
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    optimizers = {"actor": torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:2]}], lr=cfg.actor_lr),
                  "critic": torch.optim.AdamW(params[2:], lr=cfg.critic_lr)}
    assert set_learning_rates(optimizers, cfg, 1) == pytest.approx({"lr/actor": 5e-4, "lr/critic": 5e-3})
    assert [g["lr"] for g in optimizers["actor"].param_groups] == pytest.approx([5e-4, 5e-4])
    half = 0.5 * (1 + math.cos(math.pi * 3 / 6))  # step 5: 3 of the 6 cosine steps from the peak at step 2
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
    """lr_schedule_steps=58 (10% warm-up: 5 steps) in a run extended to 100 steps: the cosine reaches
    min_lr_ratio at step 58 and stays there; the steps before are on the 58-step curve."""
    run = dict(lr_schedule="cosine", min_lr_ratio=0.1, lr_warmup_ratio=0.1, lr_schedule_steps=58, max_steps=100)
    for step in (58, 59, 70, 99):
        assert rates(step, **run) == pytest.approx({"lr/actor": 0.1, "lr/critic": 0.2}), step
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 52 / 53))  # step 57: 52 of the 53 cosine steps done
    assert rates(57, **run)["lr/actor"] == pytest.approx(cosine) and cosine > 0.1 + 1e-4
    spans_100 = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 48 / 90))  # 0: the schedule spans max_steps (peak at 10)
    assert rates(58, **{**run, "lr_schedule_steps": 0})["lr/actor"] == pytest.approx(spans_100)
    assert rates(99, **{**run, "lr_schedule": "constant"})["lr/actor"] == 1.0


@pytest.mark.parametrize("ratio, steps, warmup", [(0.1, 58, 5), (0.29, 100, 28), (0.3, 10, 3), (0.07, 100, 7)])
def test_a_fractional_warm_up_is_truncated_as_verl_does(ratio, steps, warmup):
    """int(ratio x steps), verl's and Hugging Face's rule: 10% of 58 is 5.8, 5 steps; in floats 0.29 x 100 is
    28.999999999999996, 28 steps; 0.3 x 10 = 3.0000000000000004, 3."""
    run = dict(lr_warmup_ratio=ratio, max_steps=steps)
    assert warmup_steps(TrainConfig(**run)) == warmup
    assert rates(0, **run)["lr/actor"] == 0.0  # the first update at lr 0 (it still feeds Adam's moments)
    assert rates(warmup - 1, **run)["lr/actor"] == pytest.approx((warmup - 1) / warmup)
    assert rates(warmup, **run)["lr/actor"] == 1.0  # reached at the step after the warm-up's last
