"""End-to-end training benchmark: one PPO update (nanoufo.trainer's build_batch then ppo_update: actor,
critic and reference forwards for the old log-probs, values and KL, then one epoch of actor + critic
forward/backward and AdamW steps over minibatches) on the rollout workload's shapes (bench/common.py),
with random weights and synthetic rewards.

    python bench/train_step.py --preset tiny                         # CPU, seconds: the harness only
    python bench/train_step.py --preset 1.5b --batch 64              # GPU, bf16, all three paths
    python bench/train_step.py --preset 3b --batch 64 --impl fused --minibatch 2
    python bench/train_step.py --preset 3b --batch 64 --minibatch 64 --micro-batch-tokens 6144   # accumulation
    python bench/train_step.py --preset 1.5b --batch 64 --minibatch 64 --micro-batch-tokens 8192 --turn-mix

Paths (--impl): "fused" is the trainer as it runs (Triton LM-head statistics and PPO loss on CUDA);
"reference" swaps in the PyTorch references (the full (N, V) logits materialised, then the PyTorch token
statistics; the PyTorch PPO loss); "transformers" runs the same update with transformers'
Qwen2ForCausalLM trunks (same weights) and the reference losses: the eager baseline.

Per path: tokens/s (trajectory tokens, padding excluded, over the whole update), model FLOP utilisation
and peak memory. Model FLOPs: 2 * (matmul weights) per token per forward, the LM head for the actor and
reference only, plus causal attention 2 * layers * q_width * T^2 per sequence per forward; a backward
counts twice its forward; the update runs actor 1 + 3, reference 1, critic 1 + 3 forward-equivalents.
The fused head's backward recomputation is hardware work, not model FLOPs, so it is not counted.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_bench_e2e.py
"""
import math
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from common import (build_model, free_memory, hbm_and_flops, hf_twin, parse_args, peak_memory_gib, ratio, report,
                    reset_peak_memory, synthetic_rollout, timed)
from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss_reference
from nanoufo.kernels.linear_token_stats import linear_token_stats_reference
from nanoufo import trainer
from nanoufo.config import TrainConfig, validate
from nanoufo.model import QwenConfig
from nanoufo.parallel import SINGLE
from nanoufo.rollout import Graded

IMPLS = ("fused", "reference", "transformers")
COLUMNS = ["batch", "impl", "tokens_per_s", "mfu", "peak_GiB", "seconds", "loss", "error"]
REWARD_LEVELS = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.125, 0.0625])  # gamma^t for a solve at turn t, or 0


class HFPolicy(nn.Module):
    """A transformers Qwen2ForCausalLM behind the interface nanoufo.trainer calls: hidden states, the head
    weight, and the critic's value head."""

    def __init__(self, hf, value_head: nn.Linear | None = None):
        super().__init__()
        self.hf, self.value_head, self.par, self.vocab_start = hf, value_head, SINGLE, 0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.hf.lm_head.weight

    @property
    def config(self):  # the trainer reads config.vocab_size
        return self.hf.config

    def lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden).squeeze(-1).float()  # (B, T)


def with_rewards(rollout, seed: int) -> Graded:
    """The rollout with synthetic environment rewards, one per episode on its last attempt (as run_episodes
    returns them; the records are not read)."""
    g = torch.Generator().manual_seed(seed)
    scores = REWARD_LEVELS[torch.randint(len(REWARD_LEVELS), (rollout.tokens.shape[0],), generator=g)].tolist()
    return Graded(rollout, [None] * len(scores),
                  [[0.0] * (len(s) - 1) + [r] for s, r in zip(rollout.turn_spans, scores)], group_size=1)


def _unfused_head_and_loss(*args, vocab_start: int = 0, group=None, **options):
    """linear_ppo_loss's reference: full logits, the PyTorch statistics and PPO loss (one GPU, no TP here)."""
    return linear_ppo_loss_reference(*args, **options)


@contextmanager
def reference_losses():
    """The trainer with the PyTorch reference statistics and PPO loss in place of the fused kernels."""
    saved = trainer.linear_token_stats, trainer.linear_ppo_loss
    trainer.linear_token_stats, trainer.linear_ppo_loss = linear_token_stats_reference, _unfused_head_and_loss
    try:
        yield
    finally:
        trainer.linear_token_stats, trainer.linear_ppo_loss = saved


def build_models(preset, impl: str, seed: int):
    """(actor, critic, reference) with the same random trunk; transformers trunks for impl 'transformers'."""
    actor, critic, ref = (build_model(preset, seed), build_model(preset, seed, value_head=True),
                          build_model(preset, seed).requires_grad_(False))
    if impl != "transformers":
        return actor, critic, ref
    twins = HFPolicy(hf_twin(actor).train()), HFPolicy(hf_twin(critic).train(), critic.value_head), \
        HFPolicy(hf_twin(ref).requires_grad_(False))
    del actor, critic, ref
    free_memory()
    return twins


def forward_flops(config: QwenConfig, lengths: torch.Tensor, lm_head: bool) -> float:
    """Model FLOPs of one forward over sequences of these lengths (see the module docstring)."""
    H, q_width, kv_width = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    per_layer = H * (q_width + 2 * kv_width) + q_width * H + 3 * H * config.intermediate_size
    matmul = config.num_hidden_layers * per_layer + (config.vocab_size * H if lm_head else H)
    lengths = lengths.double()
    attention = 2 * config.num_hidden_layers * q_width * float((lengths ** 2).sum())
    return 2 * matmul * float(lengths.sum()) + attention


def update_flops(config: QwenConfig, lengths: torch.Tensor) -> float:
    actor = forward_flops(config, lengths, lm_head=True)
    critic = forward_flops(config, lengths, lm_head=False)
    return (1 + 3) * actor + 1 * actor + (1 + 3) * critic


def train_config(batch: int, minibatch: int, micro_batch_tokens: int = 0, pack: bool = True) -> TrainConfig:
    """The update's config; transformers' trunks take padded micro-batches (pack=False): their SDPA path has
    no packed-sequence mask."""
    cfg = TrainConfig(algorithm="ufo_ppo", reward="gold", problems_per_step=batch, n_samples_per_problem=1,
                      keep_groups=0, ppo_epochs=1, minibatch_size=minibatch, actor_lr=1e-6, critic_lr=1e-5,
                      kl_coef=0.001, kl_in="reward", micro_batch_tokens=micro_batch_tokens,
                      pack_sequences=pack)
    validate(cfg)
    return cfg


def one_update(cfg: TrainConfig, models, optimizers, rollout, seed: int) -> dict:
    actor, critic, ref = models
    scored, _ = trainer.score_rollout(cfg, actor, with_rewards(rollout, seed))
    ppo_batch, _ = trainer.build_batch(cfg, actor, critic, ref, scored)
    return trainer.ppo_update(cfg, actor, critic, optimizers, ppo_batch, seed=seed)


def bench_impl(preset, impl: str, batch: int, minibatch: int, seed: int, micro_batch_tokens: int = 0,
               mixed: bool = False) -> dict:
    models = build_models(preset, impl, seed)
    pack = impl != "transformers"
    cfg = train_config(batch, minibatch, micro_batch_tokens, pack)
    optimizers = trainer.make_optimizers(models[0], models[1], actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
                                         weight_decay=cfg.weight_decay)
    rollout = synthetic_rollout(preset, batch, seed, mixed)
    with reference_losses() if impl != "fused" else nullcontext():
        one_update(train_config(minibatch, minibatch, micro_batch_tokens, pack), models, optimizers,
                   synthetic_rollout(preset, minibatch, seed + 1), seed)  # warm-up: kernels, optimizer state
        # a minibatch step at full length has run: it fits, even if the timed update is cut short
        print(f"{impl}: warm-up update done, peak GiB {peak_memory_gib()}", file=sys.stderr, flush=True)
        reset_peak_memory()
        metrics, seconds = timed(lambda: one_update(cfg, models, optimizers, rollout, seed))
    _, peak_flops = hbm_and_flops()
    tokens = int(rollout.lengths.sum())
    achieved = update_flops(preset.config, rollout.lengths) / seconds
    return dict(batch=batch, impl=impl, minibatch=minibatch, tokens=tokens, seconds=seconds,
                tokens_per_s=tokens / seconds, model_tflops_per_s=achieved / 1e12, mfu=ratio(achieved, peak_flops),
                peak_GiB=peak_memory_gib(), loss=metrics.get("loss", math.nan), updates=metrics["updates"])


def bench_row(preset, impl: str, batch: int, minibatch: int, seed: int, micro_batch_tokens: int = 0,
              mixed: bool = False) -> dict:
    """bench_impl, with a GPU out-of-memory reported as the row's error instead of ending the run."""
    try:
        return bench_impl(preset, impl, batch, minibatch, seed, micro_batch_tokens, mixed)
    except torch.OutOfMemoryError:
        return dict(batch=batch, impl=impl, minibatch=minibatch, error="OOM", peak_GiB=peak_memory_gib())
    finally:
        free_memory()


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
        parser.add_argument("--minibatch", type=int, default=None, help="episodes per optimizer step")
        parser.add_argument("--micro-batch-tokens", type=int, default=0,
                            help="tokens per forward/backward (gradient accumulation); 0 = a whole minibatch")
        parser.add_argument("--turn-mix", action="store_true",
                            help="episodes end at turns 1..5 drawn from common.TURN_MIX instead of all running 5")
    args = parse_args(__doc__.splitlines()[0], argv, extra, first_batch_only=True)
    preset = args.preset
    minibatch = args.minibatch or preset.minibatch
    rows = [bench_row(preset, impl, b, minibatch, args.seed, args.micro_batch_tokens, args.turn_mix)
            for b in args.batch for impl in args.impl]
    for row in rows:
        fused = next((r for r in rows if r["batch"] == row["batch"] and r["impl"] == "fused"), None)
        row["speedup_of_fused"] = ratio(fused and fused.get("tokens_per_s"), row.get("tokens_per_s"))
    return report("train_step", preset, rows, COLUMNS + ["speedup_of_fused"], minibatch=minibatch,
                  micro_batch_tokens=args.micro_batch_tokens, turn_mix=args.turn_mix,
                  turns=preset.turns, max_new_tokens=preset.max_new_tokens)


if __name__ == "__main__":
    main()
