"""End-to-end rollout benchmark: multi-turn episodes through nanoufo's KV-cached sampler against
transformers' generate re-prefilling the whole conversation every turn (the public UFO code's approach),
on the same random weights and the same workload (bench/common.py: every attempt wrong, all turns run,
max_new_tokens sampled per attempt, temperature 1).

    python bench/rollout.py --preset tiny                  # CPU, seconds: the harness only
    python bench/rollout.py --preset 1.5b --batch 64       # GPU, bf16
    python bench/rollout.py --preset 3b --batch 64 256

Per batch: sampled tokens/s of both engines and the speed-up; prefill tokens per episode of both; the
sampler's wall time per decode step (whole rollout / decode steps: prefills and host work included);
and one decode step of the sampler timed alone (nanoufo/decode.py: model forward on the cache, LM head,
sampling kernel, device-side bookkeeping; a CUDA graph replay with --cuda-graphs) at the episode's mean
context, against its roofline: (weight bytes + KV bytes read) / HBM bandwidth; batch_fill = decoded rows per
step / cache rows. With --cuda-graphs a row says what really ran: graph_replays of the rollout's decode_steps,
and decode_step_graph (the alone-timed step a replay); a failed capture ends the run (CaptureFailed) instead
of timing eager steps under the graphs' label. --random-turns ends each episode at a random turn (seeded)
instead of running all turns, the workload continuous batching is for; --kv-budget-gb bounds the sampler's
KV cache (rows are reused).
Prints a table and a final JSON line. Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_bench_e2e.py
"""
import torch

from common import (all_wrong, build_model, feedback_ids, free_memory, hbm_and_flops, hf_twin, kv_bytes_per_token,
                    mid_attempt_decoder, parse_args, ratio, report, synthetic_prompts, timed)
from nanoufo.model import Qwen2
from nanoufo.options import SamplingOptions
from nanoufo.sampler import generate

COLUMNS = ["batch", "tokens_per_s", "hf_tokens_per_s", "speedup", "prefill_per_episode", "hf_prefill_per_episode",
           "sampler_ms_per_step", "batch_fill", "graph_replays", "decode_step_ms", "decode_step_graph", "roofline_ms",
           "step_over_roofline"]


def random_turns(feedback: list[int], turns: int, batch: int, seed: int):
    """next_turn for the --random-turns workload: episode b ends after a seeded random number of attempts."""
    g = torch.Generator().manual_seed(seed + 2)
    last = torch.randint(1, turns + 1, (batch,), generator=g).tolist()
    seen = [0] * batch

    def next_turn(rows, responses, stopped):
        for b in rows:
            seen[b] += 1
        return [None if seen[b] >= last[b] else list(feedback) for b in rows]
    return next_turn


def run_nanoufo(model: Qwen2, prompts: list[list[int]], next_turn, turns: int, max_new_tokens: int, seed: int,
                cuda_graphs: bool, kv_budget_gb: float) -> dict:
    """A rollout on the sampler; with cuda_graphs on CUDA a failed capture ends the run ("true": no eager
    fallback), on the CPU (gpu_session.sh's dry run) the rollout decodes eagerly and its row says so."""
    graphs = ("true" if torch.cuda.is_available() else "auto") if cuda_graphs else "false"
    sampling = SamplingOptions(max_new_tokens=max_new_tokens, temperature=1.0, kv_budget_gb=kv_budget_gb,
                               cuda_graphs=graphs)
    rollout, seconds = timed(lambda: generate(model, prompts, next_turn, sampling, max_turns=turns, stop_ids=[],
                                              seed=seed))
    return dict(seconds=seconds, sampled=int(rollout.loss_mask.sum()), prefill=rollout.n_prefill_tokens,
                decode_steps=rollout.n_decode_steps, graph_replays=rollout.n_graph_replays,
                batch_fill=rollout.n_decode_rows / max(rollout.n_decode_steps * rollout.n_cache_rows, 1))


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
def decode_step_seconds(model: Qwen2, batch: int, context: int, steps: int, seed: int,
                        cuda_graphs: bool) -> tuple[float, bool]:
    """One decode step as the sampler runs it (bench/common.py mid_attempt_decoder), timed alone, and whether it
    was a CUDA graph replay."""
    step, replayed = mid_attempt_decoder(model, batch, context, steps + 1, seed, cuda_graphs)
    step()  # warm-up: kernel compilation and autotuning

    def run():
        for _ in range(steps):
            step()
    return timed(run)[1] / steps, replayed


def decode_roofline_seconds(model: Qwen2, batch: int, context: int) -> float | None:
    """Every weight read once (the tied embedding once, as the LM head) plus each row's K and V up to `context`."""
    bandwidth, _ = hbm_and_flops()
    if bandwidth is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * (context + 1) * kv_bytes_per_token(model.config, model.lm_head_weight.dtype)
    return (weight_bytes + kv_bytes) / bandwidth


def bench_batch(model: Qwen2, preset, batch: int, seed: int, args) -> dict:
    prompts, feedback = synthetic_prompts(preset, batch, seed), feedback_ids(preset)
    options = dict(cuda_graphs=args.cuda_graphs, kv_budget_gb=args.kv_budget_gb or 0.0)
    next_turn = random_turns(feedback, preset.turns, batch, seed) if args.random_turns else all_wrong(feedback)
    generate(model, prompts[:2], all_wrong(feedback), SamplingOptions(max_new_tokens=2), max_turns=2,
             stop_ids=[])  # warm-up
    ours = run_nanoufo(model, prompts, next_turn, preset.turns, preset.max_new_tokens, seed, **options)
    free_memory()
    row = dict(batch=batch, sampled_tokens=ours["sampled"], tokens_per_s=ours["sampled"] / ours["seconds"],
               prefill_per_episode=ours["prefill"] / batch, decode_steps=ours["decode_steps"],
               sampler_ms_per_step=1e3 * ours["seconds"] / ours["decode_steps"], seconds=ours["seconds"],
               batch_fill=ours["batch_fill"], graph_replays=ours["graph_replays"])
    if not args.skip_transformers:
        hf = hf_twin(model)
        theirs = run_transformers(hf, prompts, feedback, preset.turns, preset.max_new_tokens, seed)
        del hf
        free_memory()
        row |= dict(hf_sampled_tokens=theirs["sampled"], hf_tokens_per_s=theirs["sampled"] / theirs["seconds"],
                    hf_prefill_per_episode=theirs["prefill"] / batch, hf_seconds=theirs["seconds"])
        row["speedup"] = ratio(row["tokens_per_s"], row["hf_tokens_per_s"])
    mean_prompt = sum(map(len, prompts)) / batch
    context = round(mean_prompt + (preset.turns * preset.max_new_tokens + (preset.turns - 1) * len(feedback)) / 2)
    step, replayed = decode_step_seconds(model, batch, context, args.decode_steps, seed, args.cuda_graphs)
    roof = decode_roofline_seconds(model, batch, context)
    row |= dict(decode_context=context, decode_step_ms=1e3 * step, decode_step_graph=replayed,
                roofline_ms=None if roof is None else 1e3 * roof, step_over_roofline=ratio(step, roof))
    return row


def main(argv: list[str] | None = None) -> dict:
    def extra(parser):
        parser.add_argument("--skip-transformers", action="store_true", help="time nanoufo's sampler only")
        parser.add_argument("--decode-steps", type=int, default=None, help="steps in the alone-timed decode")
        parser.add_argument("--cuda-graphs", action="store_true", help="decode steps as CUDA graph replays")
        parser.add_argument("--kv-budget-gb", type=float, default=0.0, help="the sampler's KV cache (0: a row each)")
        parser.add_argument("--random-turns", action="store_true", help="episodes end at a random turn (seeded)")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    preset = args.preset
    model = build_model(preset, args.seed).eval()
    args.decode_steps = args.decode_steps or (20 if preset.device == "cuda" else 2)
    rows = [bench_batch(model, preset, b, args.seed, args) for b in args.batch]
    return report("rollout", preset, rows, COLUMNS, turns=preset.turns, max_new_tokens=preset.max_new_tokens,
                  feedback_len=len(feedback_ids(preset)), params=model.num_params(), cuda_graphs=args.cuda_graphs,
                  kv_budget_gb=args.kv_budget_gb, random_turns=args.random_turns)


if __name__ == "__main__":
    main()
