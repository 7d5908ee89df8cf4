"""Reliability (issue 8), train.py end to end on CPU with tiny settings: a soak of 200 demo steps whose memory
stays flat, SIGKILL at a random step and resume (no half-written checkpoint, at most ckpt_interval steps
lost, the same steps as the uninterrupted soak), non-finite losses and gradients that are skipped, logged
and abort the run, and a dataset with bad rows and overlong prompts that are skipped and counted.

    python -m pytest -q -s tests/test_soak.py        # -s prints the soak's RSS figures

The runs use the kernels' PyTorch references like tests/test_train_cli.py (CHILD_ENV).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoufo.checkpoint import latest_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "TRITON_INTERPRET": "0"}
TINY = ["--max_turns=2", "--problems_per_step=1", "--n_samples_per_problem=2", "--keep_groups=0",
        "--minibatch_size=2", "--ppo_epochs=1", "--max_new_tokens=3", "--warmup_steps=1", "--n_eval_problems=1",
        "--eval_k=1", "--tp=1", "--device=cpu"]  # one minibatch per step
TIMING_KEYS = {"tokens_per_s", "step_time_s", "peak_memory_mb"}
SOAK_STEPS, RSS_FROM_STEP, RSS_BOUND_MIB = 200, 20, 8.0
KILL_RUN_STEPS, KILL_CKPT_INTERVAL = 8, 2


def launch(out_dir: Path, *args: str, script: list[str] = ("train.py",)) -> subprocess.Popen:
    """Start train.py on out_dir; its output goes to files next to out_dir, so a full pipe never blocks it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out_dir}.stdout", "w") as stdout, open(f"{out_dir}.stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, *script, *args, f"--out_dir={out_dir}"], cwd=ROOT, env=CHILD_ENV,
                                stdout=stdout, stderr=stderr, text=True)


def finish(proc: subprocess.Popen, out_dir: Path, check: bool = True) -> tuple[str, str]:
    proc.wait(timeout=600)
    stdout, stderr = Path(f"{out_dir}.stdout").read_text(), Path(f"{out_dir}.stderr").read_text()
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return stdout, stderr


def train(out_dir: Path, *args: str, check: bool = True) -> tuple[str, str]:
    return finish(launch(out_dir, *args), out_dir, check)


def train_records(out_dir: Path, timing: bool = False) -> list[dict]:
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if timing or k not in TIMING_KEYS} for r in lines if r["kind"] == "train"]


def last_step(out_dir: Path) -> int:
    """The newest step in a running job's log (0 before the first); a line still being written is passed over."""
    log = out_dir / "log.jsonl"
    for line in reversed(log.read_text().splitlines() if log.is_file() else []):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            continue
    return 0


def rss_mib(pid: int) -> float | None:
    """Resident memory of a running process; None once it has exited (a zombie has no VmRSS line)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)


# ------------------------------------------------------------------------------------------- soak
@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    """The uninterrupted demo run: (out_dir, [(step, RSS MiB) sampled while the loop runs], wall seconds)."""
    out = tmp_path_factory.mktemp("soak") / "run"
    start = time.monotonic()
    proc = launch(out, *TINY, f"--max_steps={SOAK_STEPS}", "--ckpt_interval=50")
    samples = []
    while proc.poll() is None:
        step, rss = last_step(out), rss_mib(proc.pid)
        if rss is not None and 0 < step < SOAK_STEPS:  # the end (save, eval, plot) is not the loop
            samples.append((step, rss))
        time.sleep(0.2)
    finish(proc, out)
    return out, samples, time.monotonic() - start


def test_a_long_run_keeps_its_memory_flat(soak):
    out, samples, wall = soak
    records = train_records(out, timing=True)
    assert [r["step"] for r in records] == list(range(1, SOAK_STEPS + 1))
    (first_step, first), (last_step_seen, last) = next(s for s in samples if s[0] >= RSS_FROM_STEP), samples[-1]
    peak_from, peak_to = records[RSS_FROM_STEP - 1]["peak_memory_mb"], records[-1]["peak_memory_mb"]
    print(f"\nsoak: {SOAK_STEPS} demo steps in {wall:.0f} s ({len(samples)} RSS samples); RSS {first:.1f} MiB at "
          f"step {first_step} -> {last:.1f} MiB at step {last_step_seen} ({last - first:+.2f} MiB); peak RSS "
          f"(ru_maxrss) {peak_from:.1f} -> {peak_to:.1f} MiB from step {RSS_FROM_STEP} to {SOAK_STEPS}")
    assert last_step_seen - first_step >= SOAK_STEPS // 2  # the samples span most of the run
    assert last - first < RSS_BOUND_MIB and peak_to - peak_from < RSS_BOUND_MIB
    assert sorted(p.name for p in out.glob("ckpt-*")) == [f"ckpt-{SOAK_STEPS}"]  # older checkpoints removed


# ------------------------------------------------------------------------------------------- SIGKILL, resume
def test_sigkill_at_a_random_step_then_resume_repeats_the_soaks_steps(soak, tmp_path):
    """The soak is the uninterrupted reference: checkpoints and max_steps do not change a step's numbers."""
    # a checkpoint step, chosen at random: its log line is written just before its save, so the kill races the save
    kill_at = KILL_CKPT_INTERVAL * random.Random(20).randint(1, (KILL_RUN_STEPS - 1) // KILL_CKPT_INTERVAL)
    out = tmp_path / "run"
    args = (*TINY, f"--max_steps={KILL_RUN_STEPS}", f"--ckpt_interval={KILL_CKPT_INTERVAL}")
    proc = launch(out, *args)
    deadline = time.monotonic() + 300
    while last_step(out) < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    finish(proc, out, check=False)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill landed ({proc.returncode})"
    killed = train_records(out)  # read before the resume drops the steps past the checkpoint
    ckpt = latest_checkpoint(out)  # raises if `latest` names anything but a whole checkpoint
    if ckpt is not None:
        verify_checkpoint(ckpt, ["actor", "critic", "optimizers.pt", "state.pt"])
    saved = torch.load(ckpt / "state.pt", weights_only=False)["step"] if ckpt is not None else 0
    leftovers = sorted(p.name for p in out.glob("*.tmp"))
    print(f"\nkilled at step {killed[-1]['step']} (aimed at {kill_at}); checkpoint at step {saved}; "
          f"left over: {leftovers or 'nothing'}")
    assert saved % KILL_CKPT_INTERVAL == 0 and 0 <= killed[-1]["step"] - saved <= KILL_CKPT_INTERVAL
    train(out, *args, "--resume")
    reference = train_records(soak[0])[:KILL_RUN_STEPS]
    assert killed == reference[:len(killed)]
    assert train_records(out) == reference  # the lost steps are redone exactly, and the rest follows
    assert sorted(p.name for p in out.glob("ckpt-*")) == [f"ckpt-{KILL_RUN_STEPS}"] and not list(out.glob("*.tmp"))


# ------------------------------------------------------------------------------------------- non-finite steps
POISON = """
import runpy, sys
from nanoufo import trainer
real, calls = trainer.policy_loss, []

def poisoned(cfg, actor, rows):  # one micro-batch per step: step 2's loss is NaN, step 3's gradient inf
    loss, metrics = real(cfg, actor, rows)
    calls.append(len(calls) + 1)
    if calls[-1] == 2:
        loss = loss * float("nan")
    if calls[-1] == 3:
        next(actor.parameters()).register_hook(lambda grad: grad * float("inf"))
    return loss, metrics

trainer.policy_loss = poisoned
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_non_finite_steps_are_skipped_logged_and_abort_the_run(tmp_path):
    out = tmp_path / "run"
    stdout, stderr = finish(launch(out, *TINY, "--max_steps=10", "--ckpt_interval=1", "--max_bad_steps=2",
                                   script=["-c", POISON]), out, check=False)
    assert "aborting: 2 consecutive steps with non-finite loss or gradients (max_bad_steps=2)" in stderr
    assert "step 2: 1 updates skipped" in stdout and "step 3: 1 updates skipped" in stdout
    assert [(r["step"], r["updates"], r["skipped_updates"]) for r in train_records(out)] == [(1, 1, 0), (2, 0, 1),
                                                                                            (3, 0, 1)]
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "ckpt-2"  # saved after the skipped step 2 (weights untouched); none after the abort
    tensors = [*load_file(ckpt / "actor" / "model.safetensors").values(),
               *load_file(ckpt / "critic" / "model.safetensors").values()]
    moments = torch.load(ckpt / "optimizers.pt", weights_only=False)
    tensors += [t for opt in moments.values() for s in opt["state"].values() for t in s.values() if t.numel() > 1]
    assert all(torch.isfinite(t).all() for t in tensors)


# ------------------------------------------------------------------------------------------- bad data
def test_bad_rows_and_overlong_prompts_are_skipped_and_counted(tmp_path, hf_checkpoint):
    """A dataset run on a checkpoint with a 64-token context: broken rows are skipped at load, a prompt that
    leaves no room for an attempt is skipped before sampling, the counts are printed, and training runs."""
    ckpt, _ = hf_checkpoint(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                            max_position_embeddings=64)
    rows = [{"question": "What is 2+3?", "answer": "5"}, {"question": "What is 4*4?", "answer": "16"},
            {"question": "No answer field"}, {"question": "   ", "answer": "1"},
            {"question": "Blank answer", "answer": " "}, {"question": ["not", "text"], "answer": "2"},
            {"question": "What is 1+1? " * 40, "answer": "2"}]  # 4 broken rows, then a 324-token prompt
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = [*TINY, f"--init_from={ckpt}", f"--train_data={data}", f"--eval_data={data}", "--train_format=generic",
               "--eval_format=generic", "--n_eval_problems=0", "--dtype=float32", "--ckpt_interval=0"]
    stdout, _ = train(tmp_path / "run", *dataset, "--max_steps=1")
    assert f"{data}: 3 train problems (4 rows skipped)" in stdout
    assert f"{data}: 3 eval problems (4 rows skipped)" in stdout
    assert stdout.count("skipped 1 problems whose prompt is longer than 61 tokens") == 2
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1]

    data.write_text("".join(json.dumps(row) + "\n" for row in rows[2:6]))
    _, stderr = train(tmp_path / "none", *dataset, check=False)
    assert f"{data}: no usable problems" in stderr and "Traceback" not in stderr
