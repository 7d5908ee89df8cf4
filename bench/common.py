"""What the end-to-end benchmarks (bench/rollout.py, bench/train_step.py, bench/onpolicy.py) share: the
shape presets, random-weight models built straight on the device, their transformers twin, the fixed
synthetic workload, timing and the printed table plus final JSON line.

    python bench/rollout.py --preset tiny      # CPU, seconds: checks the harness only
    python bench/rollout.py --preset 1.5b      # GPU, bf16, Qwen2.5-1.5B shapes
    python bench/onpolicy.py --preset 1.5b --turns 3 --max-new-tokens 128   # a shorter workload (in the JSON)

The workload (the same for every engine): B prompts of random token ids, lengths drawn uniformly from
preset.prompt_len (the range of GSM8K questions under the Qwen2.5 template: a short one is 83 tokens),
seeded. Feedback policy: every attempt is judged wrong, so all `turns` attempts run; no stop token is
honoured, so every attempt samples exactly max_new_tokens; the feedback turn is a fixed run of
FEEDBACK_LEN ids (the Qwen2.5 template's "Try again." turn after an attempt closed by <|im_end|> is 12).
Test (each benchmark on the tiny preset): python -m pytest -q tests/test_bench_e2e.py
"""
import argparse
import gc
import json
import math
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from hardware import roofline
from nanoufo.model import Qwen2, QwenConfig
from nanoufo.parallel import SINGLE, full_state_dict
from nanoufo.sampler import Rollout
from nanoufo.weights import hf_config_dict

FEEDBACK_LEN = 12
# An assumed UFO-like mix (not measured from a run): the share of episodes ending at turns 1..5, the last turn
# also holding the unsolved ones; mixed workloads draw each row's number of attempts from it.
TURN_MIX = (0.35, 0.2, 0.15, 0.1, 0.2)
QWEN_VOCAB = 151936


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict  # QwenConfig fields
    batches: tuple[int, ...]  # rollout rows (episodes) per run
    turns: int = 5
    max_new_tokens: int = 512
    prompt_len: tuple[int, int] = (64, 224)
    minibatch: int = 4  # episodes per optimizer step in the PPO update (default: no micro-batching)
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16

    @property
    def config(self) -> QwenConfig:
        return QwenConfig(**self.model)


def _qwen(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return dict(vocab_size=QWEN_VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2, tie_word_embeddings=True)


PRESETS = {
    "tiny": Preset("tiny", dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                   batches=(4,), max_new_tokens=6, prompt_len=(5, 12), minibatch=2, device="cpu",
                   dtype=torch.float32),
    "1.5b": Preset("1.5b", _qwen(1536, 8960, 28, 12), batches=(64, 256), minibatch=4),
    "3b": Preset("3b", _qwen(2048, 11008, 36, 16), batches=(64, 256), minibatch=2),
}


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def parse_args(description: str, argv: list[str] | None, extra: Callable | None = None,
               first_batch_only: bool = False) -> argparse.Namespace:
    """--preset, --batch (default: the preset's batches, or the first one), --seed, --turns and --max-new-tokens
    (default: the preset's workload) and the script's extra flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", help="rollout rows (default: the preset's list)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--turns", type=positive_int, help="attempts per episode (default: the preset's, 5)")
    parser.add_argument("--max-new-tokens", type=positive_int,
                        help="tokens per attempt (default: the preset's, 512; tiny 6)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    workload = {k: v for k, v in (("turns", args.turns), ("max_new_tokens", args.max_new_tokens)) if v is not None}
    args.preset = replace(PRESETS[args.preset], **workload)
    args.batch = args.batch or list(args.preset.batches[:1] if first_batch_only else args.preset.batches)
    if args.preset.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--preset {args.preset.name} needs a CUDA GPU; use --preset tiny on the CPU")
    return args


def build_model(preset: Preset, seed: int, value_head: bool = False, dtype: torch.dtype | None = None) -> Qwen2:
    """A random-weight Qwen2 built on the meta device and initialised on the target device (no fp32 host copy).

    The same seed gives the same trunk with or without the value head (the head is drawn last)."""
    with torch.device("meta"):
        model = Qwen2(preset.config, value_head=value_head).to(dtype or preset.dtype)
    model.to_empty(device=preset.device)
    model.init_weights(torch.Generator(preset.device).manual_seed(seed))
    return model


def hf_twin(model: Qwen2) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM holding a copy of model's weights (the value head, if any, is left out)."""
    dtype, device = model.lm_head_weight.dtype, model.lm_head_weight.device
    with torch.device(device):
        hf = Qwen2ForCausalLM._from_config(Qwen2Config(**hf_config_dict(model.config, dtype)), dtype=dtype)
    state = {k: v for k, v in full_state_dict(model, SINGLE).items() if not k.startswith("value_head.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"hf_twin: names differ from Qwen2ForCausalLM: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None  # the workload ignores stop tokens: every attempt runs to the limit
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def synthetic_prompts(preset: Preset, batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    low, high = preset.prompt_len
    lengths = torch.randint(low, high + 1, (batch,), generator=g)
    return [torch.randint(0, preset.config.vocab_size, (int(n),), generator=g).tolist() for n in lengths]


def feedback_ids(preset: Preset) -> list[int]:
    return [(7 * i + 3) % preset.config.vocab_size for i in range(FEEDBACK_LEN)]


def all_wrong(feedback: list[int]):
    """The sampler's next_turn for the workload: every attempt is wrong and gets the same feedback turn."""
    return lambda rows, responses, stopped: [list(feedback)] * len(rows)


def synthetic_rollout(preset: Preset, batch: int, seed: int, mixed: bool = False) -> Rollout:
    """The workload's trajectories as the sampler lays them out (prompt, attempt, feedback, ..., attempt),
    with random sampled ids: the shapes of a real rollout without running one. mixed: each row runs
    1..preset.turns attempts drawn from TURN_MIX (its first preset.turns shares), else all of them."""
    g = torch.Generator().manual_seed(seed + 1)
    shares = torch.tensor(TURN_MIX[:preset.turns] if preset.turns <= len(TURN_MIX) else [1.0] * preset.turns)
    turns = torch.multinomial(shares, batch, replacement=True, generator=g) + 1 if mixed \
        else torch.full((batch,), preset.turns)
    feedback, rows, masks, spans = feedback_ids(preset), [], [], []
    for prompt, n_turns in zip(synthetic_prompts(preset, batch, seed), turns.tolist()):
        tokens, mask, row_spans = list(prompt), [0.0] * len(prompt), []
        for turn in range(n_turns):
            if turn:
                tokens, mask = tokens + feedback, mask + [0.0] * len(feedback)
            sampled = torch.randint(0, preset.config.vocab_size, (preset.max_new_tokens,), generator=g).tolist()
            row_spans.append((len(tokens), len(tokens) + len(sampled)))
            tokens, mask = tokens + sampled, mask + [1.0] * len(sampled)
        rows.append(tokens)
        masks.append(mask)
        spans.append(row_spans)
    width = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (B, T)
    loss_mask = torch.tensor([m + [0.0] * (width - len(m)) for m in masks])  # (B, T)
    lengths = torch.tensor([len(r) for r in rows])
    return Rollout(tokens, lengths, loss_mask, torch.zeros_like(loss_mask), spans, 0, 0)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mid_attempt_decoder(model: Qwen2, batch: int, context: int, steps: int, seed: int = 0,
                        cuda_graphs: bool = False) -> tuple[Callable[[], None], bool]:
    """The sampler's decode step (nanoufo/decode.py) for `batch` rows in the middle of an attempt at `context`
    tokens, runnable `steps` times, and whether it is a CUDA graph replay: with cuda_graphs on a GPU it is
    (captured before any row is live, as the sampler does; a failed capture raises CaptureFailed), else the
    eager step. The cache holds zeros: attention reads the same slots anyway."""
    from nanoufo.cuda_graphs import DecodeGraphs
    from nanoufo.decode import Decoder, Sampling
    max_len = context + steps + 2
    decoder = Decoder(model, batch, max_len, Sampling(1.0, 1.0, seed), stop_ids=[], max_new_tokens=max_len)
    graphs = DecodeGraphs.capture(decoder.step, [batch], decoder.batch.device) if cuda_graphs else None
    rows = torch.arange(batch, device=decoder.batch.device)
    decoder.length[rows], decoder.live[rows] = context, True
    decoder.set_batch(list(range(batch)), batch)
    if graphs is not None:
        return (lambda: graphs.replay(batch)), True
    return (lambda: decoder.step(batch)), False


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), wall seconds) with the GPU drained before and after."""
    synchronize()
    start = perf_counter()
    out = fn()
    synchronize()
    return out, perf_counter() - start


def free_memory() -> None:
    """Return what dropped models and caches held, so the next engine starts from the same floor."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def device_name(preset: Preset) -> str:
    return torch.cuda.get_device_name() if preset.device == "cuda" else "cpu"


def hbm_and_flops() -> tuple[float | None, float | None]:
    """This GPU's (HBM bytes/s, bf16 FLOP/s), (None, None) on the CPU or an unlisted GPU."""
    return roofline() or (None, None)


def kv_bytes_per_token(config: QwenConfig, dtype: torch.dtype) -> int:
    """K and V of every layer: 2 * layers * kv_heads * head_dim * element size (36,864 for 3B in bf16)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def report(bench: str, preset: Preset, rows: list[dict], columns: list[str], **info) -> dict:
    """Print the rows as a table and then one JSON line (the last line of the output); return that dict."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r.get(c)).rjust(w) for c, w in zip(columns, widths)))
    result = dict(bench=bench, preset=preset.name, device=device_name(preset), dtype=str(preset.dtype), **info,
                  rows=rows)
    print(json.dumps(result))
    return result
