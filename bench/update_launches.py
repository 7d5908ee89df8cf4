"""Launches and host syncs of one PPO update on the CPU (a proxy for GPU launch and sync overhead): every
op dispatched by build_batch and ppo_update, counted with a TorchDispatchMode, on a tiny model and a
UFO-like length mix (episodes ending at turns 1-5, common.TURN_MIX). Not a timed test: counts only.

    python bench/update_launches.py                    # this checkout
    PYTHONPATH=<older checkout> python bench/update_launches.py    # the same counts for another commit

launches: dispatched ops that compute (views and detach are left out; on a GPU most are one kernel each).
syncs: ops that make the host wait for the device: reading a value (.item(), float(), bool(), int():
aten._local_scalar_dense), data-dependent shapes (nonzero, boolean-mask indexing, masked_select), and
Tensor.tolist() / cpu() / numpy() calls (counted by wrapping them: on the CPU they dispatch no op).
blocking copies: torch.tensor(..., device=) and Tensor.to(device) without non_blocking, host syncs on a GPU
(bench/launches.py says how they are counted). The optimizer step
(AdamW) is counted apart. The PyTorch reference
paths run (no TRITON_INTERPRET), where a GPU would run one Triton kernel for the LM-head statistics and
one for the PPO loss: their launch counts here are the references'.
"""
import argparse
import dataclasses
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import launches
from common import TURN_MIX
from nanoufo import parallel, rl, trainer
from nanoufo.config import TrainConfig
from nanoufo.model import Qwen2, QwenConfig
from nanoufo.rollout import Graded
from nanoufo.sampler import Rollout

SHAPE = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")


class OpCounter(TorchDispatchMode):
    """Counts launches and syncs; ops run while `bucket` is set (the optimizer step) count under its name."""

    def __init__(self):
        super().__init__()
        self.counts, self.bucket = Counter(), ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if not func.is_view and name != "aten.detach":
            self.counts[self.bucket + "launches"] += 1
        bool_index = name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                   for i in (args[1] if len(args) > 1 else ()) if i is not None)
        if name in SYNC_OPS or bool_index:
            self.counts[self.bucket + "syncs"] += 1
        return func(*args, **(kwargs or {}))


def step_counted_apart(optimizer, counter: OpCounter, host: launches.LaunchCounter) -> None:
    """Count the optimizer's step under "optimizer_" (AdamW is another issue's: fused AdamW); its host calls
    are not counted."""
    step = optimizer.step

    def counted(*args, **kwargs):
        counter.bucket, host.outside = "optimizer_", True
        try:
            return step(*args, **kwargs)
        finally:
            counter.bucket, host.outside = "", False
    optimizer.step = counted


def ufo_rollout(batch: int, max_new_tokens: int, seed: int) -> Rollout:
    """Prompt of 40 tokens, then attempts of max_new_tokens with a 12-token feedback turn between them; the
    number of attempts drawn from common.TURN_MIX."""
    g = torch.Generator().manual_seed(seed)
    turns = torch.multinomial(torch.tensor(TURN_MIX), batch, replacement=True, generator=g) + 1
    rows, masks, spans = [], [], []
    for n in turns.tolist():
        tokens, mask, row_spans = [1] * 40, [0.0] * 40, []
        for t in range(n):
            if t:
                tokens, mask = tokens + [2] * 12, mask + [0.0] * 12
            row_spans.append((len(tokens), len(tokens) + max_new_tokens))
            tokens += torch.randint(3, SHAPE.vocab_size, (max_new_tokens,), generator=g).tolist()
            mask += [1.0] * max_new_tokens
        rows.append(tokens), masks.append(mask), spans.append(row_spans)
    T = max(map(len, rows))
    pad = lambda r: r + [0] * (T - len(r))
    mask = torch.tensor([pad(m) for m in masks])
    return Rollout(torch.tensor([pad(r) for r in rows]), torch.tensor([len(r) for r in rows]), mask,
                   torch.zeros_like(mask), spans, 0, 0)


def with_rewards(rollout: Rollout) -> Graded:
    """The rollout with an episode reward on its last attempt, as run_episodes returns it (records not read)."""
    return Graded(rollout, [None] * len(rollout.turn_spans),
                  [[0.0] * (len(s) - 1) + [0.5 ** (len(s) - 1) if len(s) < 5 else 0.0] for s in rollout.turn_spans],
                  group_size=1)


def count(batch: int, minibatch: int, micro_batch_tokens: int, max_new_tokens: int, seed: int = 0) -> dict:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    options = dict(problems_per_step=batch, n_samples_per_problem=1, minibatch_size=minibatch, ppo_epochs=1,
                   kl_coef=0.001, micro_batch_tokens=micro_batch_tokens)
    known_options = {k: v for k, v in options.items() if k in known}  # an older checkout lacks new keys
    cfg = TrainConfig(**known_options)
    torch.manual_seed(seed)
    actor, critic = Qwen2(SHAPE), Qwen2(SHAPE, value_head=True)
    ref = Qwen2(SHAPE).requires_grad_(False)
    optimizers = trainer.make_optimizers(actor, critic, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
                                         weight_decay=cfg.weight_decay)
    rollout = ufo_rollout(batch, max_new_tokens, seed)
    host = launches.LaunchCounter()  # Tensor.tolist / cpu / numpy calls and blocking copies to the device
    with launches.watching_host(host), OpCounter() as scoring:
        scored, _ = trainer.score_rollout(cfg, actor, with_rewards(rollout))
        batch_, _ = trainer.build_batch(cfg, actor, critic, ref, scored)
    scoring_host, scoring_copies = host.syncs, host.copies
    host = launches.LaunchCounter()
    update = OpCounter()
    for opt in optimizers.values():
        step_counted_apart(opt, update, host)
    with launches.watching_host(host), update:
        trainer.ppo_update(cfg, actor, critic, optimizers, batch_, seed=seed)
    n_minibatches = batch // minibatch
    return dict(batch=batch, minibatch=minibatch, micro_batch_tokens=micro_batch_tokens if "micro_batch_tokens" in known
                else None, tokens=int(rollout.lengths.sum()), T=rollout.tokens.shape[1],
                scoring_launches=scoring.counts["launches"], scoring_syncs=scoring.counts["syncs"] + scoring_host,
                scoring_blocking_copies=scoring_copies,
                launches_per_minibatch=update.counts["launches"] / n_minibatches,
                syncs_per_minibatch=(update.counts["syncs"] + host.syncs) / n_minibatches,
                blocking_copies_per_minibatch=host.copies / n_minibatches,
                optimizer_launches_per_minibatch=update.counts["optimizer_launches"] / n_minibatches,
                optimizer_syncs_per_minibatch=update.counts["optimizer_syncs"] / n_minibatches)


def count_parts(layers: int = 28, rows: int = 64, T: int = 2832) -> dict:
    """Launches of gradient clipping on a model with the 1.5B shape's parameter count (28 blocks, narrow) and
    of GAE on a (rows, T) batch: the two loops the issue names."""
    shape = dataclasses.replace(SHAPE, num_hidden_layers=layers)
    model = Qwen2(shape, value_head=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with OpCounter() as clip:
        parallel.clip_grad_norm_(model, 1.0, parallel.SINGLE)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(rows, T, generator=g) > 0.2).float()
    with OpCounter() as gae:
        rl.gae(torch.randn(rows, T, generator=g), torch.randn(rows, T, generator=g), mask, 1.0, 1.0)
    return dict(parameters=len(list(model.parameters())), clip_launches=clip.counts["launches"], gae_rows=rows,
                gae_T=T, gae_launches=gae.counts["launches"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[0, 1024])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    for budget in args.micro_batch_tokens:
        print(json.dumps(count(args.batch, args.minibatch, budget, args.max_new_tokens)))
    print(json.dumps(count_parts()))


if __name__ == "__main__":
    main()
