"""A dress rehearsal of the paper path on the CPU: README.md's commands for a real Qwen2.5 checkpoint, run as
they are written with only their sizes changed, each step's output checked. The checkpoint has the Qwen2.5
architecture, the real tokenizer and the real vocabulary (151,936 rows) with random weights, 2 layers of width
64; the data are small files in the real layouts (MetaMathQA, MATH, ProcessBench); the process reward model is
tests/prm_utils.py's tiny one.

    make rehearsal                            # = TRITON_INTERPRET=1 python tests/rehearsal.py (CI runs it)
    python tests/rehearsal.py --keep=/tmp/r   # keep the checkpoints, data and runs there

The commands are the lines of the code block between `<!-- rehearsal -->` and `<!-- /rehearsal -->` in README.md
(a trailing backslash continues a line; `#` starts a comment): the README shows exactly what runs here. Names
in them stand for files written here (PLACEHOLDERS); each train.py command gets its config's SIZES appended,
max_steps counting 2 steps and --resume one more; a sample.py command on a plain checkpoint gets SAMPLE_SIZES,
one on a run's checkpoint none, so it evaluates with the run's saved config. Checks: every command exits 0;
each run logged its steps and wrote its checkpoints; a resumed run continued where it stopped; sample.py's
table on a run's checkpoint equals the run's last logged evaluation; TensorBoard's event file holds the logged
metrics; Best-of-N, ProcessBench and the chat print their results.
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # prm_utils

from prm_utils import write_prm_checkpoint  # noqa: E402

VOCAB = 151936  # Qwen2.5's embedding rows (151,665 tokens used by the tokenizer)
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
RUN = ["--max_new_tokens=8", "--n_eval_problems=3", "--eval_interval=0", "--problems_per_step=2",
       "--n_samples_per_problem=2"]
SIZES = {"config/ufo_qwen2.5_3b.py": RUN + ["--keep_groups=1", "--minibatch_size=2"],
         "config/intuitor_qwen2.5_3b.py": RUN + ["--minibatch_size=4"]}
SAMPLE_SIZES = ["--limit=3", "--max_new_tokens=8"]
CHAT_INPUT = "What is 1 + 1?\nTry again.\n/quit\n"


def readme_commands(readme: Path) -> list[str]:
    """The commands of README.md's rehearsal block, comments and continuation lines joined."""
    text = readme.read_text()
    match = re.search(r"<!-- rehearsal -->\s*```\w*\n(.*?)```\s*<!-- /rehearsal -->", text, re.DOTALL)
    if not match:
        raise SystemExit(f"{readme}: no code block between <!-- rehearsal --> and <!-- /rehearsal -->")
    commands, current = [], ""
    for line in match.group(1).splitlines():
        line = re.sub(r"\s+#.*$", "", line).rstrip()
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\") and current.strip():
            commands.append(current.strip())
            current = ""
    return commands


def write_inputs(work: Path) -> dict[str, str]:
    """The stand-ins the README's names map to: the checkpoints, the data files, the output folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nanoufo.tokenizer import load_tokenizer
    torch.manual_seed(0)
    policy = work / "Qwen2.5-tiny"
    Qwen2ForCausalLM(Qwen2Config(**TINY)).to(torch.bfloat16).save_pretrained(policy)
    load_tokenizer().save_pretrained(policy)
    prm, _ = write_prm_checkpoint(work / "PRM-tiny")
    gsm8k = [json.loads(line) for line in (ROOT / "data/gsm8k/test.jsonl").read_text().splitlines()[:8]]
    math500 = [json.loads(line) for line in (ROOT / "data/math500/test.jsonl").read_text().splitlines()[:8]]
    metamath = [{"query": row["question"], "type": "MATH_Rephrased",
                 "response": row["answer"].split("####")[0] + "The answer is: " + row["answer"].split("#### ")[-1]}
                for row in gsm8k]
    (work / "metamath.json").write_text(json.dumps(metamath))
    (work / "math_train.jsonl").write_text("".join(json.dumps({"problem": r["problem"], "solution": r["solution"]})
                                                   + "\n" for r in math500))
    bench = [{"problem": r["question"], "steps": r["answer"].split("\n")[:-1] or [r["answer"]],
              "label": -1 if i % 2 else 0} for i, r in enumerate(gsm8k)]
    (work / "processbench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench))
    return {"Qwen2.5-3B-Instruct": str(policy), "Qwen2.5-Math-1.5B-Instruct": str(policy), "Qwen2.5-3B": str(policy),
            "Qwen2.5-Math-PRM-7B": str(prm), "MetaMathQA-395K.json": str(work / "metamath.json"),
            "MATH/train.jsonl": str(work / "math_train.jsonl"),
            "processbench_gsm8k.jsonl": str(work / "processbench.jsonl"), "out/": str(work / "out") + "/"}


def as_run(command: str, names: dict[str, str]) -> list[str]:
    """The command with the README's names replaced, this interpreter, and the sizes of SIZES."""
    def stand_in(value: str) -> str:
        for name, path in names.items():
            if value == name or (name.endswith("/") and value.startswith(name)):
                return path + value[len(name):]
        return value

    argv = [f"{a.split('=')[0]}={stand_in(a.split('=', 1)[1])}" if a.startswith("--") and "=" in a else a
            for a in shlex.split(command)]
    launcher = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[argv[0]]
    script_at = next(i for i, arg in enumerate(argv) if arg.endswith(".py"))
    script, args = argv[script_at], argv[script_at + 1:]
    if script == "train.py":
        config = next(a for a in args if a.endswith(".py"))
        steps = 3 if "--resume" in args else 2
        args = [str(ROOT / a) if a == config else a for a in args] + SIZES[config] + [f"--max_steps={steps}"]
    elif script == "sample.py" and not any(a.startswith("--ckpt=" + names["out/"]) for a in args):
        args = args + (SAMPLE_SIZES if "--mode=processbench" not in args else [])
    return launcher + argv[1:script_at] + [str(ROOT / script)] + args


def flag(argv: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{key}=")), None)


def log_records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def printed_tables(stdout: str) -> dict[str, dict[str, float]]:
    """sample.py's tables: {set: {metric: value}} from its `<set>:` headers and `<metric>  <value>` rows."""
    tables, current = {}, None
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 1 and line.endswith(":"):
            current = tables.setdefault(line[:-1], {})
        elif current is not None and len(parts) == 2 and not line.startswith(" "):
            current[parts[0]] = math.nan if parts[1] == "n/a" else float(parts[1])
    return tables


def check(argv: list[str], stdout: str, runs: dict[str, Path], work: Path) -> str:
    """Check one command's output; returns what was checked, in a few words."""
    script = Path(next(a for a in argv if a.endswith(("train.py", "sample.py")))).name
    if script == "train.py":
        from nanoufo.config import parse_args
        out = work / parse_args([a for a in argv if a.endswith(".py") and "/config/" in a] +
                                [a for a in argv if a.startswith("--out_dir=")], check_paths=False).out_dir
        records = log_records(out)
        steps = [r["step"] for r in records if r["kind"] == "train"]
        want = list(range(1, int(flag(argv, "max_steps")) + 1))
        assert steps == want, f"{out}/log.jsonl: train steps {steps}, expected {want}"
        assert (out / "latest").is_file() and (out / (out / "latest").read_text().strip() / "run_config.json").is_file()
        if "--resume" in argv:
            assert re.search(r"^resumed from \S+ at step 2$", stdout, re.M), "the run did not resume from step 2"
        if "tensorboard" in (flag(argv, "log_to") or ""):
            check_tensorboard(out, records)
        if flag(argv, "reward") == "prm":
            assert all(0.0 <= r["prm_score"] <= 1.0 for r in records if r["kind"] == "train")
        runs[str(out)] = out
        return f"steps {steps} logged, checkpoint {(out / 'latest').read_text().strip()}"
    mode = flag(argv, "mode") or "eval"
    ckpt = str(work / flag(argv, "ckpt")) if flag(argv, "ckpt") else None
    if mode == "chat":
        assert stdout.count("model> ") == 2, "the chat did not answer twice"
        return "two answers"
    if mode == "processbench":
        assert re.search(r"^\S+ error acc: .*, f1: .* too long for the PRM, counted wrong\)$", stdout, re.M), \
            "no subset's F1 printed"
        assert re.search(r"^mean f1 over 1 subsets \(", stdout, re.M), "no mean F1 printed"
        return "F1 printed"
    tables = printed_tables(stdout)
    if mode == "bon":
        assert len(tables) == len(flag(argv, "data").split(",")) and all("rm@8" in t for t in tables.values())
        return f"rm@8 on {', '.join(tables)}"
    assert tables and all("succ@5" in t or "succ@1" in t for t in tables.values()), "no Succ@k table printed"
    if ckpt in runs:  # a run's checkpoint: the table train.py logged at the run's end, to the printed digits
        last = [r for r in log_records(runs[ckpt]) if r["kind"] == "eval"][-1]
        for name, table in tables.items():
            for key, value in table.items():
                logged = last[f"eval/{name}/{key}"]
                logged = math.nan if logged is None else logged
                assert (math.isnan(value) and math.isnan(logged)) or abs(value - logged) < 5e-5, \
                    f"{name}/{key}: sample.py {value}, train.py logged {logged}"
        return f"table equals the run's logged one ({len(tables)} set(s), {sum(map(len, tables.values()))} values)"
    return f"table printed for {', '.join(tables)}"


def check_tensorboard(out: Path, records: list[dict]) -> None:
    """The event file holds each logged training metric at each step, as log.jsonl has it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for key in ("reward", "succ_at_k", "loss"):
        logged = {r["step"]: r[key] for r in records if r["kind"] == "train"}
        read = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert read.keys() == logged.keys() and all(abs(read[s] - v) < 1e-5 * max(1, abs(v)) for s, v in
                                                    logged.items()), f"TensorBoard train/{key}: {read} != {logged}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="write everything here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="nanoufo-rehearsal-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = write_inputs(work)
    runs: dict[str, Path] = {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}
    started = time.time()
    for command in readme_commands(ROOT / "README.md"):
        argv = as_run(command, names)
        t0 = time.time()
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900,
                              input=CHAT_INPUT if "--mode=chat" in argv else None)
        if done.returncode != 0:
            raise SystemExit(f"FAILED ({done.returncode}): {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        try:
            checked = check(argv, done.stdout, runs, work)
        except AssertionError as error:
            raise SystemExit(f"FAILED check: {command}\n{error}\n{done.stdout[-3000:]}") from None
        print(f"ok {time.time() - t0:5.1f}s  {command}\n           {checked}", flush=True)
    print(f"rehearsal passed: {len(runs)} runs, {time.time() - started:.0f} s (in {work})")


if __name__ == "__main__":
    main()
