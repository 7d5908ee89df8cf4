"""End-to-end rollout benchmark: multi-turn episodes through nanoufo's KV-cached sampler against
transformers' generate re-prefilling the whole conversation every turn (the public UFO code's approach),
on the same random weights and the same workload (bench/common.py: every attempt wrong, all turns run,
max_new_tokens sampled per attempt, temperature 1).

    python bench/rollout.py --preset tiny                  # CPU, seconds: the harness only
    python bench/rollout.py --preset 1.5b --batch 64       # GPU, bf16
    python bench/rollout.py --preset 3b --batch 64 256

Per batch: sampled tokens/s of both engines and the speed-up; prefill tokens per episode of both; the
sampler's wall time per decode step (whole rollout / decode steps: prefills and host work included);
and one decode step timed alone (model forward on the cache, LM head, sampling kernel) at the episode's
mean context, against its roofline: (weight bytes + KV bytes read) / HBM bandwidth. Prints a table and a
final JSON line. Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_bench_e2e.py
"""
import torch

from common import (all_wrong, build_model, feedback_ids, free_memory, hbm_and_flops, hf_twin, kv_bytes_per_token,
                    parse_args, ratio, report, synthetic_prompts, timed)
from kernels.sampling import sample
from nanoufo.model import KVCache, Qwen2
from nanoufo.sampler import generate

COLUMNS = ["batch", "tokens_per_s", "hf_tokens_per_s", "speedup", "prefill_per_episode", "hf_prefill_per_episode",
           "sampler_ms_per_step", "decode_step_ms", "roofline_ms", "step_over_roofline"]


def run_nanoufo(model: Qwen2, prompts: list[list[int]], feedback: list[int], turns: int, max_new_tokens: int,
                seed: int) -> dict:
    rollout, seconds = timed(lambda: generate(model, prompts, all_wrong(feedback), max_turns=turns,
                                              max_new_tokens=max_new_tokens, stop_ids=[], temperature=1.0, seed=seed))
    return dict(seconds=seconds, sampled=int(rollout.loss_mask.sum()), prefill=rollout.n_prefill_tokens,
                decode_steps=rollout.n_decode_steps)


@torch.no_grad()
def run_transformers(hf, prompts: list[list[int]], feedback: list[int], turns: int, max_new_tokens: int,
                     seed: int) -> dict:
    """Each turn: left-pad the whole conversations, generate() from scratch, append the attempt and feedback."""
    torch.manual_seed(seed)
    device = hf.lm_head.weight.device
    conversations, prefill, sampled = [list(p) for p in prompts], 0, 0

    def all_turns():
        nonlocal conversations, prefill, sampled
        for turn in range(turns):
            if turn:
                conversations = [c + feedback for c in conversations]
            width = max(map(len, conversations))
            ids = torch.tensor([[0] * (width - len(c)) + c for c in conversations], device=device)  # (B, width)
            attention_mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in conversations],
                                          device=device)  # (B, width)
            out = hf.generate(input_ids=ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                              top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
            new = out[:, width:]  # (B, max_new_tokens)
            prefill += sum(map(len, conversations))
            sampled += new.numel()
            conversations = [c + row for c, row in zip(conversations, new.tolist())]

    _, seconds = timed(all_turns)
    return dict(seconds=seconds, sampled=sampled, prefill=prefill)


@torch.no_grad()
def decode_step_seconds(model: Qwen2, batch: int, context: int, steps: int, seed: int) -> float:
    """One decode step as the sampler runs it (forward on the cache, LM head, sampling), timed alone.

    The cache holds zeros: attention reads the same `context` slots per row whatever they hold."""
    weight = model.lm_head_weight
    cache = KVCache.allocate(model.config, batch, context + steps + 1, weight.device, weight.dtype)
    rows = torch.arange(batch, device=weight.device)
    tokens = torch.zeros(batch, dtype=torch.long, device=weight.device)

    def step(i: int) -> torch.Tensor:
        positions = torch.full((batch, 1), context + i, device=weight.device)  # (B, 1)
        logits = model.logits(model(tokens[:, None], positions, cache=cache, cache_rows=rows)[:, 0])  # (B, V)
        return sample(logits, 1.0, 1.0, seed, rows + i * batch)[0]

    tokens = step(0)  # warm-up: kernel compilation and autotuning

    def run():
        nonlocal tokens
        for i in range(1, steps + 1):
            tokens = step(i)
    return timed(run)[1] / steps


def decode_roofline_seconds(model: Qwen2, batch: int, context: int) -> float | None:
    """Every weight read once (the tied embedding once, as the LM head) plus each row's K and V up to `context`."""
    bandwidth, _ = hbm_and_flops()
    if bandwidth is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * (context + 1) * kv_bytes_per_token(model.config, model.lm_head_weight.dtype)
    return (weight_bytes + kv_bytes) / bandwidth


def bench_batch(model: Qwen2, preset, batch: int, seed: int, skip_transformers: bool, decode_steps: int) -> dict:
    prompts, feedback = synthetic_prompts(preset, batch, seed), feedback_ids(preset)
    work = (feedback, preset.turns, preset.max_new_tokens, seed)
    generate(model, prompts[:2], all_wrong(feedback), max_turns=2, max_new_tokens=2, stop_ids=[])  # warm-up
    ours = run_nanoufo(model, prompts, *work)
    free_memory()
    row = dict(batch=batch, sampled_tokens=ours["sampled"], tokens_per_s=ours["sampled"] / ours["seconds"],
               prefill_per_episode=ours["prefill"] / batch, decode_steps=ours["decode_steps"],
               sampler_ms_per_step=1e3 * ours["seconds"] / ours["decode_steps"], seconds=ours["seconds"])
    if not skip_transformers:
        hf = hf_twin(model)
        theirs = run_transformers(hf, prompts, *work)
        del hf
        free_memory()
        row |= dict(hf_sampled_tokens=theirs["sampled"], hf_tokens_per_s=theirs["sampled"] / theirs["seconds"],
                    hf_prefill_per_episode=theirs["prefill"] / batch, hf_seconds=theirs["seconds"])
        row["speedup"] = ratio(row["tokens_per_s"], row["hf_tokens_per_s"])
    mean_prompt = sum(map(len, prompts)) / batch
    context = round(mean_prompt + (preset.turns * preset.max_new_tokens + (preset.turns - 1) * len(feedback)) / 2)
    step = decode_step_seconds(model, batch, context, decode_steps, seed)
    roof = decode_roofline_seconds(model, batch, context)
    row |= dict(decode_context=context, decode_step_ms=1e3 * step, roofline_ms=None if roof is None else 1e3 * roof,
                step_over_roofline=ratio(step, roof))
    return row


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--skip-transformers", action="store_true", help="time nanoufo's sampler only")
        parser.add_argument("--decode-steps", type=int, default=None, help="steps in the alone-timed decode")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    preset = args.preset
    model = build_model(preset, args.seed).eval()
    steps = args.decode_steps or (20 if preset.device == "cuda" else 2)
    rows = [bench_batch(model, preset, b, args.seed, args.skip_transformers, steps) for b in args.batch]
    return report("rollout", preset, rows, COLUMNS, turns=preset.turns, max_new_tokens=preset.max_new_tokens,
                  feedback_len=len(feedback_ids(preset)), params=model.num_params())


if __name__ == "__main__":
    main()
