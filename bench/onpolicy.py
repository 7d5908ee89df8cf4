"""On-policy check: how far the sampler's log-probs of its own tokens are from the trainer's recomputation
(nanoufo.trainer.sequence_stats, the forward that gives PPO its old log-probs) on the rollout workload
(bench/common.py), in bf16 and, as a control, in fp32 (same seed, so the same random weights).

    python bench/onpolicy.py --preset tiny               # CPU, seconds
    python bench/onpolicy.py --preset 1.5b --batch 64    # GPU

Rows: "bf16" and "fp32" compare each precision's sampler with the trainer in the same precision on that
precision's own rollout; "bf16 sampler vs fp32 trainer" rescores the bf16 rollout with the fp32 trainer, which
tells the rounding of bf16 itself apart from a sampler/trainer mismatch. Over the sampled tokens: mean
and max |difference|. Prints a table and a final JSON line.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_bench_e2e.py
"""
import torch

from common import all_wrong, build_model, feedback_ids, free_memory, parse_args, report, synthetic_prompts
from nanoufo.model import Qwen2
from nanoufo.options import SamplingOptions
from nanoufo.sampler import Rollout, generate
from nanoufo.trainer import sequence_stats

COLUMNS = ["batch", "compare", "mean_abs_diff", "max_abs_diff", "tokens"]
TEMPERATURE = 1.0


def sample_rollout(model: Qwen2, preset, prompts: list[list[int]], seed: int) -> Rollout:
    sampling = SamplingOptions(max_new_tokens=preset.max_new_tokens, temperature=TEMPERATURE)
    return generate(model, prompts, all_wrong(feedback_ids(preset)), sampling, max_turns=preset.turns, stop_ids=[],
                    seed=seed)


@torch.no_grad()
def trainer_logprobs(model: Qwen2, rollout: Rollout) -> torch.Tensor:
    """The trainer's log-probs (B, T) of the rollout's tokens, on the CPU like the rollout."""
    T = int(rollout.lengths.max())
    tokens = rollout.tokens[:, :T].to(model.lm_head_weight.device)  # (B, T)
    return sequence_stats(model, tokens, TEMPERATURE)[0].float().cpu()


def gap(batch: int, compare: str, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    diff = (a - b).abs()[mask[:, :a.shape[1]] > 0]  # (sampled tokens,)
    return dict(batch=batch, compare=compare, mean_abs_diff=float(diff.mean()), max_abs_diff=float(diff.max()),
                tokens=diff.numel())


def bench_batch(preset, batch: int, seed: int) -> list[dict]:
    prompts = synthetic_prompts(preset, batch, seed)
    rows, rollouts = [], {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = build_model(preset, seed, dtype=dtype).eval()
        rollout = rollouts[name] = sample_rollout(model, preset, prompts, seed)
        T = int(rollout.lengths.max())
        rows.append(gap(batch, name, rollout.logprobs[:, :T], trainer_logprobs(model, rollout), rollout.loss_mask))
        if name == "fp32":
            bf16 = rollouts["bf16"]
            rows.append(gap(batch, "bf16 sampler vs fp32 trainer", trainer_logprobs(model, bf16),
                            bf16.logprobs[:, :int(bf16.lengths.max())], bf16.loss_mask))
        del model
        free_memory()
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, first_batch_only=True)
    rows = [row for b in args.batch for row in bench_batch(args.preset, b, args.seed)]
    return report("onpolicy", args.preset, rows, COLUMNS, temperature=TEMPERATURE, turns=args.preset.turns,
                  max_new_tokens=args.preset.max_new_tokens)


if __name__ == "__main__":
    main()
