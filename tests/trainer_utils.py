"""The one-shot PPO minibatch loss the tests hold nanoufo.trainer.accumulate_gradients to: the whole minibatch
in one padded forward per model, with the same per-token weights, so its gradients are what the
micro-batches must add up to.

    loss, metrics, ratio_dev = minibatch_losses(cfg, actor, critic, batch)
    loss.backward()
    loss, metrics = policy_loss(cfg, actor, update_rows(batch, weights))   # one loss on every row
    optimizers = optimizers_of(cfg, actor, critic)                           # make_optimizers with cfg's rates

Not a test file; its users: python -m pytest -q tests/test_micro_batches.py tests/test_trainer.py
tests/test_parallel.py
"""
from nanoufo.config import TrainConfig
from nanoufo.packing import one_forward
from nanoufo.trainer import Batch, UpdateRows, critic_loss, make_optimizers, minibatch_weights, policy_loss


def optimizers_of(cfg: TrainConfig, actor, critic) -> dict:
    return make_optimizers(actor, critic, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr, weight_decay=cfg.weight_decay)


def update_rows(mb: Batch, weights, lengths: list[int] | None = None) -> UpdateRows:
    """Every row of mb in one forward (packed when lengths are given, else padded), as the update reads it."""
    return UpdateRows.of(mb, weights, one_forward(mb.tokens, lengths)[0])


def minibatch_losses(cfg: TrainConfig, actor, critic, mb: Batch):
    """(total loss, metrics as floats, max |logp - old|) for one minibatch, unpacked and unsplit."""
    weights = minibatch_weights(mb.mask, cfg.aggregation, actor.par, cfg.chunk_rows)
    rows = update_rows(mb, weights)
    loss, metrics = policy_loss(cfg, actor, rows)
    if critic is not None:
        v_loss, v_metrics = critic_loss(cfg, critic, rows)
        loss, metrics = loss + v_loss, metrics | v_metrics
    metrics = {k: float(v) for k, v in metrics.items()}
    return loss, metrics, metrics.pop("ratio_dev")
