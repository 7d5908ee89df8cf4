"""The learning-rate schedule: linear warm-up, then constant or cosine decay, as a pure function of the
training step. train.py writes the rate into every optimizer's param_groups before each step's update, so
it works with any optimizer that has param_groups, and a resumed run (whose checkpoint stores the step)
continues the schedule exactly with no state of its own.

    from nanoufo.schedule import lr_at, set_learning_rates
    lr = lr_at(step, base_lr=3e-6, total_steps=58, warmup_steps=6, schedule="cosine")
    rates = set_learning_rates(optimizers, cfg, step)      # {"lr/actor": ..., "lr/critic": ...}

Tests: python -m pytest -q tests/test_schedule.py
"""
import math

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
          min_ratio: float = 0.0) -> float:
    """The rate for training step `step` (0-based). Warm-up rises linearly to base_lr, reaching it at step
    warmup_steps - 1 (it starts at base_lr / warmup_steps, not 0, so no step is spent at a zero rate); then
    "constant" stays there and "cosine" follows half a cosine from base_lr towards min_ratio * base_lr at
    total_steps. The warm-up's last step is the cosine's first, so the peak rate is used once (Hugging Face's
    and verl's cosine-with-warm-up, shifted one step earlier)."""
    assert schedule in SCHEDULES, schedule
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    peak = max(warmup_steps - 1, 0)  # the step at base_lr
    progress = min(1.0, (step - peak) / max(1, total_steps - peak))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_learning_rates(optimizers: dict, cfg, step: int) -> dict[str, float]:
    """Set the actor's and critic's rates for training step `step` from cfg (actor_lr / critic_lr, lr_schedule
    over lr_schedule_steps or max_steps, lr_warmup_ratio of those rounded to the nearest step, min_lr_ratio)
    in every param group; returns them for the log. Past the schedule's last step the rate stays at its end."""
    base = {"actor": cfg.actor_lr, "critic": cfg.critic_lr}
    total = cfg.lr_schedule_steps or cfg.max_steps
    warmup = round(cfg.lr_warmup_ratio * total)
    rates = {}
    for name, optimizer in optimizers.items():
        lr = lr_at(step, base[name], total, warmup, cfg.lr_schedule, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rates[f"lr/{name}"] = lr
    return rates
