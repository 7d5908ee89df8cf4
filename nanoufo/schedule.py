"""The learning-rate schedule: linear warm-up, then constant or cosine decay, as a pure function of the
training step, the same curve as Hugging Face's and verl's schedulers with warm-up (verl's
get_cosine_schedule_with_warmup and get_constant_schedule_with_warmup). train.py writes the rate into every
optimizer's param_groups before each step's update, so it works with any optimizer that has param_groups, and
a resumed run (whose checkpoint stores the step) continues the schedule exactly with no state of its own.

    from nanoufo.schedule import lr_at, set_learning_rates
    lr = lr_at(step, base_lr=3e-6, total_steps=58, warmup_steps=5, schedule="cosine")
    rates = set_learning_rates(optimizers, cfg, step)      # {"lr/actor": ..., "lr/critic": ...}

Tests: python -m pytest -q tests/test_schedule.py
"""
import math

SCHEDULES = ("constant", "cosine")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
          min_ratio: float = 0.0) -> float:
    """The rate for training step `step` (0-based). The warm-up rises linearly over warmup_steps steps from its
    floor at step 0 (0, or min_ratio * base_lr for "cosine", as verl's) towards base_lr, which step
    warmup_steps reaches; then "constant" stays there and "cosine" follows half a cosine from base_lr at step
    warmup_steps towards min_ratio * base_lr at total_steps, and stays at its end after that."""
    assert schedule in SCHEDULES, schedule
    floor = min_ratio if schedule == "cosine" else 0.0
    if step < warmup_steps:
        return base_lr * (floor + (1.0 - floor) * step / warmup_steps)
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(cfg) -> int:
    """The warm-up's steps: lr_warmup_ratio of the schedule's steps (lr_schedule_steps, else max_steps),
    truncated as verl's int(ratio * total) (10% of 58: 5; in floats 0.29 x 100 is 28.999999999999996: 28)."""
    return int(cfg.lr_warmup_ratio * (cfg.lr_schedule_steps or cfg.max_steps))


def set_learning_rates(optimizers: dict, cfg, step: int) -> dict[str, float]:
    """Set the actor's and critic's rates for training step `step` from cfg (actor_lr / critic_lr, lr_schedule
    over lr_schedule_steps or max_steps, warmup_steps(cfg), min_lr_ratio) in every param group; returns them
    for the log."""
    base = {"actor": cfg.actor_lr, "critic": cfg.critic_lr}
    total = cfg.lr_schedule_steps or cfg.max_steps
    rates = {}
    for name, optimizer in optimizers.items():
        lr = lr_at(step, base[name], total, warmup_steps(cfg), cfg.lr_schedule, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rates[f"lr/{name}"] = lr
    return rates
