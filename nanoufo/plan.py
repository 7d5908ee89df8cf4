"""The memory plan: the peak memory per GPU of each phase of a training step (rollout, scoring, update),
predicted from the config, the model's shape and the GPU's memory before any weight is read. train.py
prints it at start and stops, naming the knob to change, when a phase cannot fit.

    python -m nanoufo.plan config/ufo_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80            # TP=2, as configured
    python -m nanoufo.plan config/ufo_qwen2.5_3b.py --gpus=1 --gpu_mem_gib=141 --tp=1     # one H200
    python -m nanoufo.plan config/ufo_qwen2.5_3b.py --model=Qwen2.5-7B --gpus=2 --gpu_mem_gib=80

The model's shape comes from --model (a checkpoint directory's config.json or a named Qwen2.5 shape,
SHAPES), else from the config's init_from (its config.json, or its name with any -Instruct suffix).
--key=value sets any training config key. Everything is per GPU (one TP rank; DP replicas each hold
the same), in bytes; what is counted:

- resident for the whole run: the weights of actor, critic and reference in the compute dtype, and per
  trained model two fp32 AdamW moments (8 B/param) plus fp32 master weights (4 B/param) when the dtype
  is not float32 (with float32 params the params are the masters); with CUDA graphs also the decoder (KV
  cache, its state, and its graphs' memory pool: one decode step's transients at the largest bucket, the
  logits among them), which nanoufo.sampler.Decoders keeps between rollouts so that the graphs are captured
  once;
- rollout: the sampler's KV cache at its max_len: the rows kv_budget_gb holds (an ended episode's row
  takes the next waiting one), else a row per episode of the step, plus the spare padding row, and the
  decoder's per-row state (nanoufo/decode.py's byte counts); the prompts' prefill through one layer (no
  grad) and, for PyTorch's SDPA (no flash-attn), one layer's K and V gathered for every row; the decode
  step's full-vocabulary fp32 logits (with their all-gather's buffers under TP), one layer's transients and
  the decode attention's split partials for every row;
- scoring (no-grad forwards): one micro-batch through one layer, the fused LM head's fp32 chunk, the
  batch's per-token arrays and GAE's (T, T) discount matrix;
- update: the gradients of actor and critic (fp32: summed over micro-batches in fp32, nanoufo/optim.py;
  for bf16 parameters also the largest parameter's bf16 gradient before its hook folds it in), the saved
  activations of the largest micro-batch (activation_bytes_per_token), one layer's backward transient and
  the LM head fused with the PPO loss (a row chunk's fp32 logits and their gradient, the head's fp32 weight
  gradient and its cast); the actor's backward runs before the critic's forward, so the larger model's
  activations count, not both. train.py frees the gradients after the update.

CUDA graphs: cuda_graphs="true" plans them; "auto" (a GPU run) plans them when they fit, else plans without
them and says so (train.py then decodes eagerly); "false" never. Lengths: an episode is at most
max_prompt_tokens + max_turns x max_new_tokens + a feedback turn between attempts (32 tokens here;
train.py passes its environment's longest), at most the model's context: the sampler's max_len
(nanoufo.sampler.run_max_len).
Not counted: a process reward model (reward="prm"), the CUDA context and allocator slack (RESERVE_GIB is
kept free for them), the optimizer step's foreach temporaries, and fragmentation.
Tests: python -m pytest -q tests/test_plan.py
"""
import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanoufo.config import TrainConfig, parse_args
from nanoufo.decode import kv_bytes_per_token, logits_bytes_per_row, state_bytes_per_row
from nanoufo.kernels.decode_attention import partial_bytes_per_query
from nanoufo.kernels.linear_ppo_loss import default_chunk_rows
from nanoufo.kernels.linear_token_stats import DEFAULT_CHUNK
from nanoufo.model import Qwen2, QwenConfig
from nanoufo.optim import MAIN_DTYPE
from nanoufo.parallel import ParallelContext
from nanoufo.sampler import FEEDBACK_TOKENS, budget_rows, run_max_len

GIB = 2**30
RESERVE_GIB = 2.0  # CUDA context, cuBLAS workspaces, allocator slack
PER_TOKEN_ARRAYS = 10  # (B, T) fp32 arrays build_batch keeps: logps, values, rewards, advantages, returns, ...
_QWEN = dict(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768)
SHAPES = {  # Qwen2.5 config.json figures
    "Qwen2.5-0.5B": dict(_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
    "Qwen2.5-1.5B": dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "Qwen2.5-3B": dict(_QWEN, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16),
    "Qwen2.5-7B": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def model_config(source: str) -> QwenConfig:
    """A checkpoint directory's config.json, or a named shape (SHAPES; '-Instruct' and any path prefix ignored)."""
    if (Path(source) / "config.json").is_file():
        return QwenConfig.from_json(Path(source) / "config.json")
    name = Path(source).name.removesuffix("-Instruct")
    if name not in SHAPES:
        raise ValueError(f"plan: {source!r} is neither a checkpoint directory with config.json nor a known shape "
                         f"({', '.join(SHAPES)})")
    return QwenConfig(**SHAPES[name])


def params_per_rank(config: QwenConfig, tp: int, value_head: bool = False) -> tuple[int, int]:
    """(parameters, the largest parameter's elements) on TP rank 0 (which holds the larger part of an uneven
    split), counted on the meta device."""
    with torch.device("meta"):
        model = Qwen2(config, value_head=value_head, par=ParallelContext(tp_size=tp))
    return model.num_params(), max(p.numel() for p in model.parameters())


def activation_bytes_per_token(config: QwenConfig, tp: int, itemsize: int) -> int:
    """Bytes that autograd saves per token per transformer block for the backward, on a TP rank, with H
    hidden, q = Hq * D / tp, kv = Hkv * D / tp, I = intermediate / tp and s the dtype's size:
      2 RMSNorms x (fp32 copy of x 4H + fp32 rsqrt 4 + x * rsqrt rounded to the dtype sH + the normed
                    output sH, the next matmuls' input)
      + s * 2q: rotated q and the attention output (o_proj reads it as a view)
      + s * kv: rotated k (the rotary multiplies save only cos and sin, shared by every block)
      + s * (q + 2kv): the merged q/k/v projection's output, which v (a view of it) keeps alive
      + 4 * Hq / tp: the attention's fp32 log-sum-exp (SDPA's flash / memory-efficient kernels and the
                     CPU's flash kernel save q, k, v, out and it, never the T x T scores)
      + s * 4I: the merged gate/up output (2I), silu(gate) and the product (down_proj's input).
    Qwen2.5-1.5B in bf16: 107,064 B per block, 3.00 MB per token over 28 blocks (bench/RESULTS.md, "One PPO update",
    measured about 3.1 MB per token for the whole update, peak over weights). tests/test_plan.py checks the formula
    exactly against the tensors a tiny fp32 block saves on the CPU (saved_tensors_hooks)."""
    H, D = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * D // tp, config.num_key_value_heads * D // tp
    intermediate = config.intermediate_size // tp
    norms = 2 * (4 * H + 4 + 2 * itemsize * H)
    return norms + itemsize * (3 * q + 3 * kv) + 4 * config.num_attention_heads // tp + itemsize * 4 * intermediate


def layer_transient_bytes_per_token(config: QwenConfig, tp: int, itemsize: int) -> int:
    """Bytes per token alive at once inside one block without saving anything (a no-grad forward, or one
    block's activation gradients in the backward): residual and normed input, q, k, v and output, gate,
    up and their product, and the norm's fp32 copy."""
    H, D = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * D // tp, config.num_key_value_heads * D // tp
    return 4 * H + itemsize * (2 * H + 2 * q + 2 * kv + 3 * (config.intermediate_size // tp))


def episode_tokens(cfg: TrainConfig, context: int, feedback_len: int = FEEDBACK_TOKENS) -> int:
    """The longest episode, the sampler's max_len: prompt, every attempt, a feedback turn between attempts."""
    return run_max_len(cfg.max_prompt_tokens, cfg.max_turns, cfg.max_new_tokens, feedback_len, context)


@dataclass
class Plan:
    phases: dict[str, dict[str, int]]  # phase -> {component: bytes}
    budget: int | None  # bytes usable per GPU (GPU memory - RESERVE_GIB); None: no check
    knobs: dict[str, str]  # phase -> what to change when it does not fit
    graphs: bool = False  # the rollout decodes with CUDA graphs (their decoder kept in every phase)
    note: str = ""  # why cuda_graphs=auto plans without them

    def peak(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    def over(self) -> list[str]:
        return [] if self.budget is None else [p for p in self.phases if self.peak(p) > self.budget]

    def format(self) -> str:
        lines = []
        for phase, parts in self.phases.items():
            detail = ", ".join(f"{name} {size / GIB:.2f}" for name, size in parts.items())
            lines.append(f"  {phase:>8}: {self.peak(phase) / GIB:7.2f} GiB  ({detail})")
        budget = "no limit (CPU)" if self.budget is None else f"{self.budget / GIB:.1f} GiB usable per GPU"
        graphs = "on (the decoder kept in every phase)" if self.graphs else f"off{self.note}"
        return f"memory plan per GPU, GiB ({budget}; CUDA graphs {graphs}):\n" + "\n".join(lines)

    def refusal(self) -> str | None:
        """One line naming the phases over budget and the knobs to change; None when everything fits."""
        over = self.over()
        if not over:
            return None
        worst = max(over, key=self.peak)
        return (f"memory plan: the {', '.join(over)} phase needs {self.peak(worst) / GIB:.1f} GiB per GPU, more than "
                f"the {self.budget / GIB:.1f} GiB usable; {'; '.join(self.knobs[p] for p in over)}")


def make_plan(cfg: TrainConfig, config: QwenConfig, tp: int, gpu_mem_gib: float | None,
              feedback_len: int = FEEDBACK_TOKENS, graphs: bool = True) -> Plan:
    """The per-GPU plan of one training step (see the module docstring for what each phase counts). graphs:
    whether the run may decode with CUDA graphs (False on the CPU); cfg.cuda_graphs says whether it will."""
    plan = _plan(cfg, config, tp, gpu_mem_gib, feedback_len, graphs and cfg.cuda_graphs != "false")
    if plan.graphs and cfg.cuda_graphs == "auto" and plan.refusal():
        eager = _plan(cfg, config, tp, gpu_mem_gib, feedback_len, False)
        if eager.refusal() is None:
            return replace(eager, note=" (cuda_graphs=auto: the decoder they keep does not fit beside scoring "
                                       "and the update)")
    return plan


def _plan(cfg: TrainConfig, config: QwenConfig, tp: int, gpu_mem_gib: float | None, feedback_len: int,
          graphs: bool) -> Plan:
    s = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    main = MAIN_DTYPE.itemsize
    actor, actor_largest = params_per_rank(config, tp)
    critic, critic_largest = params_per_rank(config, tp, value_head=True) if cfg.algorithm == "ufo_ppo" else (0, 0)
    ref = actor if cfg.kl_coef > 0 else 0
    trained = actor + critic
    lower = cfg.dtype != "float32"  # then the optimizer holds fp32 masters and the gradients are summed in fp32
    resident = {"weights": (trained + ref) * s, "optimizer": trained * (2 * main + (main if lower else 0))}

    length = episode_tokens(cfg, config.max_position_embeddings, feedback_len)
    episodes = cfg.problems_per_step * cfg.n_samples_per_problem
    kv = kv_bytes_per_token(config, tp, s)
    rows = budget_rows(int(cfg.kv_budget_gb * GIB), length * kv)  # too small for one: the sampler refuses it
    wave = min(max(rows, 1), episodes) if cfg.kv_budget_gb else episodes  # rows decoding at once
    layer = layer_transient_bytes_per_token(config, tp, s)
    vocab_local = math.ceil(config.vocab_size / tp)
    attention = partial_bytes_per_query(config.num_attention_heads // tp, length, config.head_dim)
    decoder = {"kv_cache": (wave + 1) * length * kv, "decoder_state": (wave + 1) * state_bytes_per_row(length),
               "decode_logits": wave * logits_bytes_per_row(config.vocab_size, tp),
               "decode_step": wave * (layer + attention)}  # with the logits: a graph pool's content
    prompt = min(cfg.max_prompt_tokens, length)
    rollout = resident | decoder | {"prefill": wave * prompt * layer,
                                    "prefill_kv_gather": wave * length * kv // config.num_hidden_layers}
    if graphs:  # the decoder and its graphs' pool stay allocated from rollout to rollout
        resident = resident | decoder

    kept = cfg.batch_episodes
    micro = cfg.micro_batch_tokens or cfg.minibatch_size * length  # 0: a whole (padded) minibatch at once
    score_micro = cfg.micro_batch_tokens or kept * length
    # the no-grad statistics: one (rows, DEFAULT_CHUNK) fp32 chunk of logits (kernels/linear_token_stats.py)
    scoring = resident | {"micro_batch": score_micro * layer,
                          "lm_head_chunk": score_micro * min(DEFAULT_CHUNK, vocab_local) * 4,
                          "batch_arrays": kept * length * 4 * PER_TOKEN_ARRAYS, "gae": 3 * length * length * 4}

    saved = activation_bytes_per_token(config, tp, s)
    blocks = config.num_hidden_layers
    per_token = (blocks * s * config.hidden_size + saved) if cfg.checkpoint_activations else blocks * saved
    per_token += 4 * config.hidden_size + 3 * s * config.hidden_size  # final norm, the head's input
    gradients = {"gradients": trained * main}
    if lower:  # a parameter's bf16 gradient until its hook adds it to the fp32 sum: the largest one at most
        gradients["gradient_transient"] = max(actor_largest, critic_largest) * s
    # the head fused with the PPO loss (kernels/linear_ppo_loss.py): a row chunk's fp32 logits and their gradient
    # in the compute dtype, the head's fp32 weight gradient (accumulated in place) and its cast to the weight's dtype
    chunk_rows = min(micro, default_chunk_rows(vocab_local))
    fused_head = {"lm_head_chunk": chunk_rows * vocab_local * (4 + s),
                  "lm_head_grad": vocab_local * config.hidden_size * (4 + s)}
    update = resident | gradients | fused_head | {"activations": micro * per_token,
                                                  "backward_transient": micro * layer,
                                                  "batch_arrays": kept * length * 4 * PER_TOKEN_ARRAYS}
    kept_cache = (f"; CUDA graphs keep the decoder ({sum(decoder.values()) / GIB:.2f} GiB): lower kv_budget_gb "
                  f"(now {cfg.kv_budget_gb or 'unset'}) or set cuda_graphs=false") if graphs else ""
    knobs = {
        "rollout": f"lower kv_budget_gb (now {cfg.kv_budget_gb or 'unset: a row per episode'}, {wave} of "
                   f"{episodes} episodes at once) or raise tp",
        "scoring": f"lower micro_batch_tokens (now {cfg.micro_batch_tokens or 'unset'}) or raise tp{kept_cache}",
        "update": f"lower micro_batch_tokens (now {cfg.micro_batch_tokens or 'unset: a whole minibatch'}, at least "
                  f"{length}), set checkpoint_activations=true (now {cfg.checkpoint_activations}) or raise tp "
                  f"(now {tp}){kept_cache}",
    }
    budget = None if not gpu_mem_gib else int((gpu_mem_gib - RESERVE_GIB) * GIB)
    return Plan({"rollout": rollout, "scoring": scoring, "update": update}, budget, knobs, graphs)


def main(argv: list[str]) -> int:
    """`python -m nanoufo.plan [config.py ...] [--key=value ...] --gpus=N --gpu_mem_gib=G [--model=...]`: prints
    the plan (of a GPU run: cuda_graphs=auto plans CUDA graphs where they fit); exit status 1 when it does not
    fit, 2 on a bad flag, key or model."""
    own = argparse.ArgumentParser(prog="python -m nanoufo.plan", allow_abbrev=False)
    own.add_argument("--gpus", type=int, default=1)
    own.add_argument("--model", default="")
    args, rest = own.parse_known_args(argv)  # the rest are training config files and keys (gpu_mem_gib among them)
    cfg = parse_args(rest, check_paths=False)
    tp = cfg.tp if args.gpus > 1 else 1
    if args.gpus % tp:
        raise ValueError(f"plan: tp={tp} does not divide --gpus={args.gpus}")
    config = model_config(args.model or cfg.init_from)
    plan = make_plan(cfg, config, tp, cfg.gpu_mem_gib or None)
    longest = episode_tokens(cfg, config.max_position_embeddings)
    print(f"{args.gpus} GPU(s) = DP {args.gpus // tp} x TP {tp}; longest episode {longest} tokens")
    print(plan.format())
    refusal = plan.refusal()
    print(refusal or "fits")
    return 1 if refusal else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:  # a user's mistake: one line, status 2
        print(e.args[0] if isinstance(e, KeyError) else e, file=sys.stderr)
        sys.exit(2)
