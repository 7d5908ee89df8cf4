"""nanoufo against TRL's GRPOTrainer at equal work: the same GRPO step from one saved random Qwen2 checkpoint (the
real Qwen2.5 tokenizer), the same GSM8K prompts, samples per prompt, tokens per answer, temperature, loss and
optimizer; and, with --learn, the same training run on a small task that can be learned, curves side by side.

    pip install -e ".[peers]"                        # TRL (pinned in requirements-lock.txt)
    python bench/peers.py --preset tiny              # CPU, under a minute: the loss check, two steps each
    python bench/peers.py --preset 0.5b              # CPU, Qwen2.5-0.5B's width with 2 layers
    python bench/peers.py --preset 1.5b              # GPU, Qwen2.5-1.5B's shape, bf16
    python bench/peers.py --preset 0.5b --steps 2 --prompts-per-step 2 --profile out/peers/prof   # where time goes
    python bench/peers.py --learn --plot out/peers/learning.png

First the equal-work check (bench/peers_check.py): both losses and gradients on one fixed batch must agree, or
the script stops with exit status 1 before timing anything. Then each system runs --steps GRPO steps in its
own process (so each peak memory is its own: RSS on the CPU, allocated on the GPU), the workload's steps
identical for both (bench/peers_work.py; TRL's options: bench/peers_trl.py; nanoufo's: bench/peers_nanoufo.py).
Per phase, the median over the steps after the first (the first warms up): wall seconds, CPU seconds (the
process's, all threads: on a shared machine they move less with the other jobs) and tokens per second of
generation (sampled tokens), scoring (rewards, advantages, old log-probs when computed) and update (forward,
backward, AdamW), and of the whole step (trajectory tokens), with the ratios TRL / nanoufo (above 1: nanoufo
is faster or smaller); last the peak memory in GiB. Prints a table and a final JSON line.
Test: python -m pytest -q tests/test_peers.py
--profile DIR runs each system under cProfile and writes DIR/trl.txt and DIR/nanoufo.txt (functions by
cumulative time) beside the .prof files; its timings carry the profiler's overhead.

--learn: both systems train from the same random weights on tests/test_learning.py's fixed-answer task
("Guess my number from 0 to 2", gold 2, one attempt of one token, the demo's character tokenizer in which
\\boxed{2} is one token) with its settings (16 prompts x 4 samples, minibatches of 32, 2 epochs, lr 3e-3),
for --seeds; the plot shows each rollout's success (mean reward) for both, and the table the probability
of the right answer under each final policy.
"""
import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from common import ratio, report
from nanoufo import demo
from nanoufo.data import DEFAULT_EVAL_SETS, load_problems
from nanoufo.tokenizer import load_tokenizer
from peers_work import Workload

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."  # UFOEnv's default
PHASES = ("generation", "scoring", "update", "step")
COLUMNS = ["phase", "trl", "nanoufo", "ratio", "trl_cpu", "nanoufo_cpu", "cpu_ratio", "trl_tok_s", "nanoufo_tok_s",
           "tokens"]
SYSTEMS = ("trl", "nanoufo")


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict  # Qwen2Config fields
    prompts_per_step: int
    samples: int
    max_new_tokens: int
    steps: int
    device: str = "cpu"
    dtype: str = "float32"


def _qwen(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    """Qwen2.5's real vocabulary and attention layout (2 KV heads, tied embeddings below 3B)."""
    return dict(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)


PRESETS = {
    "tiny": Preset("tiny", _qwen(64, 128, 2, 4), prompts_per_step=1, samples=2, max_new_tokens=4, steps=2),
    "small": Preset("small", _qwen(64, 128, 2, 4), prompts_per_step=8, samples=8, max_new_tokens=64, steps=5),
    "0.5b": Preset("0.5b", _qwen(896, 4864, 2, 14), prompts_per_step=8, samples=8, max_new_tokens=64, steps=3),
    "1.5b": Preset("1.5b", _qwen(1536, 8960, 28, 12), prompts_per_step=8, samples=8, max_new_tokens=256, steps=4,
                   device="cuda", dtype="bfloat16"),
}
LEARN_TASK = dict(content="Guess my number from 0 to 2", answer="2")  # tests/test_learning.py's "fixed" task


def write_checkpoint(path: Path, model: dict, tokenizer, seed: int) -> str:
    """A random transformers Qwen2 (its own initialisation, fp32) and the tokenizer, saved as one directory."""
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(**model)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def gsm8k_prompts(n: int) -> list[dict]:
    problems, _ = load_problems(DEFAULT_EVAL_SETS["gsm8k"])
    return [dict(content=f"{p.question} {INSTRUCTION}", answer=p.answer) for p in problems[:n]]


def run_in_process(system: str, work: Workload, threads: int, tmp: Path, profile_dir: Path | None = None) -> dict:
    """Run one system's worker (or the check) in a fresh Python process; its JSON answer. With profile_dir, the
    worker runs under cProfile and leaves there SYSTEM.prof and SYSTEM.txt (the functions by cumulative time)."""
    work_file, out_file = tmp / f"{system}-work.json", tmp / f"{system}-out.json"
    work.save(work_file)
    # the CPU runs the kernels' PyTorch paths (TRITON_INTERPRET=1, as under make test, would interpret Triton)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TRITON_INTERPRET="0", TOKENIZERS_PARALLELISM="false")
    profile = ["--profile", str(profile_dir)] if profile_dir else []
    done = subprocess.run([sys.executable, __file__, "--worker", system, "--work", str(work_file), "--out",
                           str(out_file), *profile], env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench/peers.py: the {system} worker failed (exit status {done.returncode}); its output "
                         "is above")
    return json.loads(out_file.read_text())


def worker(system: str, work_file: str, out_file: str, profile_dir: Path | None) -> None:
    work = Workload.load(work_file)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if system == "check":
        from peers_check import check_loss
        Path(out_file).write_text(json.dumps(check_loss(work)))
        return
    if system == "trl":
        from peers_trl import run_worker
    else:
        from peers_nanoufo import run_worker
    if profile_dir is None:
        return run_worker(work, out_file)
    profiler = cProfile.Profile()
    profiler.runcall(run_worker, work, out_file)
    profile_dir.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(profile_dir / f"{system}.prof")
    with open(profile_dir / f"{system}.txt", "w") as f:
        pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(60)


def phase_rows(results: dict[str, dict]) -> list[dict]:
    """Per phase, each system's median over the steps after the first: wall seconds (trl, nanoufo), CPU seconds
    (trl_cpu, nanoufo_cpu), tokens/s (wall) and the tokens; the ratios TRL / nanoufo. Last, the peak GiB."""
    rows = []
    for phase in PHASES:
        row = dict(phase=phase)
        tokens = "sampled_tokens" if phase == "generation" else "tokens"
        for system in SYSTEMS:
            steps = results[system]["steps"]
            timed = steps[1:] or steps
            row[system] = statistics.median(s[phase] for s in timed)
            row[f"{system}_cpu"] = statistics.median(s[f"{phase}_cpu"] for s in timed)
            row[f"{system}_tok_s"] = statistics.median(s[tokens] / s[phase] for s in timed) if row[system] else None
            row[f"{system}_tokens"] = statistics.median(s[tokens] for s in timed)
        row["ratio"], row["cpu_ratio"] = ratio(row["trl"], row["nanoufo"]), ratio(row["trl_cpu"], row["nanoufo_cpu"])
        row["tokens"] = f"{row['trl_tokens']:.0f} / {row['nanoufo_tokens']:.0f}"
        rows.append(row)
    memory = {s: results[s]["peak_gib"] for s in SYSTEMS}
    return rows + [dict(phase="peak GiB", **memory, ratio=ratio(memory["trl"], memory["nanoufo"]))]


def facts(threads: int) -> dict:
    """Where and with what the figures were measured."""
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"
    return dict(date=time.strftime("%Y-%m-%d"), commit=commit, device_name=device, threads=threads,
                load_before=os.getloadavg(),
                versions={n: pkg(n) for n in ("torch", "transformers", "trl", "accelerate")})


def timing(args, preset: Preset, tmp: Path) -> dict:
    checkpoint = write_checkpoint(tmp / "ckpt", preset.model, load_tokenizer(), args.seed)
    steps = args.steps or preset.steps
    prompts, samples = args.prompts_per_step or preset.prompts_per_step, args.samples or preset.samples
    work = Workload(checkpoint, gsm8k_prompts(steps * prompts), prompts, samples,
                    args.max_new_tokens or preset.max_new_tokens, steps, minibatch=prompts * samples,
                    seed=args.seed, device=preset.device, dtype=preset.dtype)
    info = facts(args.threads)
    check = run_in_process("check", replace(work), args.threads, tmp)
    print(f"loss check: TRL {check['trl_loss']:.6g}, nanoufo {check['nanoufo_loss']:.6g}, relative difference of "
          f"the loss {check['loss_rel_diff']:.2g} and of the gradients {check['grad_rel_diff']:.2g} "
          f"({check['clipped_share']:.0%} of the tokens clipped)", flush=True)
    if not check["equal"]:
        print(json.dumps(dict(bench="peers", preset=preset.name, check=check)))
        raise SystemExit(1)
    results = {system: run_in_process(system, work, args.threads, tmp, args.profile) for system in SYSTEMS}
    info["load_after"] = os.getloadavg()
    return report("peers", preset, phase_rows(results), COLUMNS, check=check, workload=dict(
        prompts_per_step=work.prompts_per_step, samples=work.samples, max_new_tokens=work.max_new_tokens,
        steps=steps, temperature=work.temperature, clip=(work.clip_low, work.clip_high), lr=work.lr),
        model=preset.model, per_step={s: results[s]["steps"] for s in SYSTEMS}, **info)


def p_correct(checkpoint: str, tokenizer_dir: str) -> float:
    """The probability of the one-token right answer under the policy (temperature 1), by transformers."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = Qwen2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": LEARN_TASK["content"]}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    return float(probs[tokenizer.convert_tokens_to_ids(f"\\boxed{{{LEARN_TASK['answer']}}}")])


def learning(args, tmp: Path) -> dict:
    tokenizer = demo.build_tokenizer(demo.WORDS + [f"\\boxed{{{d}}}" for d in "012"])
    model = dict(demo.TINY_MODEL, vocab_size=len(tokenizer))
    starts = []  # per seed; the rest per system and seed
    curves, finals, seconds = ({s: [] for s in SYSTEMS} for _ in range(3))
    for seed in args.seeds:
        checkpoint = write_checkpoint(tmp / f"start{seed}", model, tokenizer, seed)
        starts.append(p_correct(checkpoint, checkpoint))
        for system in SYSTEMS:
            work = Workload(checkpoint, [LEARN_TASK] * 16, prompts_per_step=16, samples=4, max_new_tokens=1,
                            steps=args.steps or 30, minibatch=32, epochs=2, lr=3e-3, reward="boxed", seed=seed,
                            save_to=str(tmp / f"{system}{seed}"))
            steps = run_in_process(system, work, args.threads, tmp, args.profile)["steps"]
            curves[system].append([s["reward"] for s in steps])
            seconds[system].append(statistics.median(s["step"] for s in steps))
            finals[system].append(p_correct(work.save_to, checkpoint))
    plot_curves(curves, args.plot)
    rows = [dict(system=s, seed=seed, start_p_correct=start, final_p_correct=final, first_success=curve[0],
                 last5_success=statistics.mean(curve[-5:]), s_per_rollout=sec)
            for s in SYSTEMS
            for seed, start, final, curve, sec in zip(args.seeds, starts, finals[s], curves[s], seconds[s])]
    learn = Preset("learn", model, 16, 4, 1, args.steps or 30)
    return report("peers-learning", learn, rows, ["system", "seed", "start_p_correct", "final_p_correct",
                                                 "first_success", "last5_success", "s_per_rollout"],
                  curves=curves, plot=str(args.plot), **facts(args.threads))


def plot_curves(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for system, color in zip(SYSTEMS, ("tab:orange", "tab:blue")):
        for i, curve in enumerate(curves[system]):
            ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.35, lw=1)
        mean = [statistics.mean(c) for c in zip(*curves[system])]
        ax.plot(range(1, len(mean) + 1), mean, color=color, lw=2.2, label=f"{system} (mean of {len(curves[system])})")
    ax.set(xlabel="rollout (16 prompts x 4 samples, 4 optimizer steps)", ylabel="success of the rollout",
           ylim=(-0.02, 1.02), title="GRPO on the fixed-answer task, same weights and settings")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=0, help="GRPO steps (rollouts) per system; 0: the preset's")
    for name, what in (("prompts-per-step", "prompts per step"), ("samples", "completions per prompt"),
                       ("max-new-tokens", "tokens per completion")):
        parser.add_argument(f"--{name}", type=int, default=0, help=f"{what}; 0: the preset's (in the JSON line)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each system's process")
    parser.add_argument("--learn", action="store_true", help="the learning comparison instead of the timing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--learn: the runs' seeds")
    parser.add_argument("--plot", type=Path, default=Path("out/peers/learning.png"), help="--learn: the figure")
    parser.add_argument("--profile", type=Path, help="run each system under cProfile, writing its profile here")
    for hidden in ("--worker", "--work", "--out"):  # how the script runs a system in its own process
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.steps, args.prompts_per_step, args.samples, args.max_new_tokens) < 0 or args.threads < 1:
        parser.error("--steps, --prompts-per-step, --samples and --max-new-tokens must be >= 0, --threads >= 1")
    if args.samples == 1:
        parser.error("--samples must be at least 2: GRPO's advantage is a reward against its group's")
    if PRESETS[args.preset].device == "cuda" and not torch.cuda.is_available() and not args.learn:
        parser.error(f"--preset {args.preset} needs a CUDA GPU; use --preset tiny, small or 0.5b on the CPU")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench/peers.py needs TRL: pip install -e '.[peers]'", file=sys.stderr)
        raise SystemExit(2) from None
    with TemporaryDirectory() as tmp:
        return learning(args, Path(tmp)) if args.learn else timing(args, PRESETS[args.preset], Path(tmp))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        parsed = parse_args(None)
        worker(parsed.worker, parsed.work, parsed.out, parsed.profile)
    else:
        main()
