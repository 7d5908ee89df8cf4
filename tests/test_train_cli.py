"""train.py end to end on CPU with tiny settings: resume exactness (N steps = N/2 + resume + N/2), the
paper configs on a tiny random HF checkpoint with a local jsonl, and SIGTERM saving a checkpoint.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_train_cli.py
"""
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY_DEMO = ["--warmup_steps=3", "--max_turns=2", "--problems_per_step=4", "--n_samples_per_problem=2",
             "--keep_groups=2", "--minibatch_size=2", "--max_new_tokens=4", "--n_eval_problems=2", "--eval_k=2",
             "--ppo_epochs=2", "--ckpt_interval=0", "--tp=1", "--device=cpu"]
TIMING_KEYS = {"tokens_per_s", "step_time_s", "peak_memory_mb"}
# The runs use the kernels' PyTorch references (tests/test_kernels_* check the Triton kernels against them):
# under the interpreter one tiny run takes minutes.
CHILD_ENV = {**os.environ, "TRITON_INTERPRET": "0"}


def train(*args, check=True):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=CHILD_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_records(out_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in lines if r["kind"] == "train"]


def final_actor(out_dir: Path) -> dict:
    ckpt = out_dir / (out_dir / "latest").read_text().strip()
    return load_file(ckpt / "actor" / "model.safetensors")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: fp32 masters restored, not re-rounded
def test_resume_gives_the_same_run(tmp_path, dtype):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    run = [*TINY_DEMO, f"--dtype={dtype}", "--actor_lr=1e-3", "--lr_schedule=cosine", "--lr_warmup_ratio=0.25",
           "--lr_schedule_steps=4"]  # the schedule spans the whole run, resumed at step 2
    train(*run, f"--out_dir={whole}", "--max_steps=4")
    train(*run, f"--out_dir={halves}", "--max_steps=2")
    train(*run, f"--out_dir={halves}", "--max_steps=4", "--resume")
    a, b = train_records(whole), train_records(halves)
    assert [r["step"] for r in a] == [1, 2, 3, 4] and a == b
    cosine = [0.0] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]  # the peak at step 1
    assert [r["lr/actor"] for r in a] == pytest.approx(cosine)  # a warm-up of int(0.25 x 4) = 1 step, from 0
    wa, wb = final_actor(whole), final_actor(halves)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (halves / "log.png").is_file() and json.loads((halves / "config.json").read_text())["resume"]


LAYOUTS = {  # one small file per data layout a user may bring (.json for MetaMathQA, as it ships)
    "metamath.json": [{"query": "What is 2+3?", "response": "2+3=5. The answer is: 5", "type": "MATH_AnsAug"},
                      {"query": "What is 4*4?", "response": "The answer is 16.\nThe answer is: 16", "type": "MATH_SV"},
                      {"query": "GSM row", "response": "The answer is: 1", "type": "GSM_AnsAug"}],
    "math.jsonl": [{"problem": "What is 2+3?", "solution": r"$2+3=\boxed{5}$", "level": "Level 1", "type": "Algebra"},
                   {"problem": "What is 4*4?", "solution": r"\boxed{16}", "level": "Level 1", "type": "Algebra"}],
    "unlabeled.jsonl": [{"question": "What is 2+3?"}, {"question": "What is 4*4?"}],
    "renamed.jsonl": [{"prompt": "What is 2+3?", "gold": "5"}, {"prompt": "What is 4*4?", "gold": "16"}],
}


@pytest.fixture
def tiny_qwen_run(tmp_path, hf_checkpoint):
    """A tiny random HF checkpoint with the real Qwen2.5 vocabulary, and a small file of each data layout."""
    ckpt, _ = hf_checkpoint(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    for name, rows in LAYOUTS.items():
        text = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
        (tmp_path / name).write_text(text)
    return ckpt, tmp_path


TINY_RUN = ["--n_eval_problems=2", "--dtype=float32", "--device=cpu", "--tp=1", "--max_steps=2",
            "--problems_per_step=2", "--n_samples_per_problem=2", "--minibatch_size=2", "--max_new_tokens=3",
            "--eval_k=2", "--eval_interval=1"]


@pytest.mark.parametrize("config, train_data, groups", [("config/ufo_qwen2.5_3b.py", "metamath.json", 2),
                                                        ("config/intuitor_qwen2.5_3b.py", "unlabeled.jsonl", 0)])
def test_paper_config_starts_on_a_tiny_random_checkpoint(tmp_path, tiny_qwen_run, config, train_data, groups):
    """Each paper config on its own training layout (Intuitor's label-free), evaluated on two sets at once: a
    MATH-layout file and one whose fields have other names (given per set on the command line)."""
    ckpt, data = tiny_qwen_run
    out = tmp_path / "run"
    proc = train(config, f"--init_from={ckpt}", f"--train_data={data / train_data}",
                 f"--eval_data={data / 'math.jsonl'},{data / 'renamed.jsonl'}", "--eval_format=auto,generic",
                 "--eval_question_key=,prompt", "--eval_answer_key=,gold", f"--out_dir={out}", *TINY_RUN,
                 f"--keep_groups={groups}", "--max_turns=2" if "ufo" in config else "--max_turns=1")
    assert f"{data / train_data}: 2 train problems" in proc.stdout
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2]
    # a minibatch is a different batch shape than the old-log-prob pass, so equal only up to float rounding
    assert all(r["first_ratio_dev"] < 1e-5 and r["logp_diff_sampler"] < 1e-4 for r in records)
    assert all(r["padding_frac"] == 0.0 for r in records)  # the configs pack micro-batches: no padding computed
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert len(evals) == 3 and all(r["eval/math/episodes"] == r["eval/renamed/episodes"] == 2 for r in evals)
    assert (out / "latest").is_file() and (out / "log.png").is_file()


def test_a_run_captures_its_decode_graphs_once_while_its_prompts_grow(tmp_path, tiny_qwen_run, torch_paths,
                                                                      monkeypatch):
    """train.py itself (in this process) with a stand-in CUDA graph (tests/test_batching.py: a replay runs the
    step eagerly, so the CPU can play the device): four steps of one problem each, whose prompts are four
    lengths, capture each bucket's graph once in the first rollout and replay them in every decode step after,
    as the log says (issue 38; the sampler's max_len used to follow each batch's longest prompt)."""
    from test_batching import stand_in_graphs, EagerGraph
    graphs = stand_in_graphs(monkeypatch, EagerGraph)
    ckpt, data = tiny_qwen_run
    order = torch.randperm(4, generator=torch.Generator().manual_seed(1337)).tolist()  # train.py's first epoch
    repeats = [0] * 4
    for step, row in enumerate(order):  # step i's question repeated 1, 4, 9, 16 times: each prompt longer
        repeats[row] = (step + 1) ** 2
    rows = [dict(problem=" ".join(["What is 2+3?"] * k), solution=r"\boxed{5}", level="Level 1", type="Algebra")
            for k in repeats]
    (tmp_path / "growing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # train.py's Ctrl-C handler stays out of pytest
    monkeypatch.setattr(sys, "argv", ["train.py", "config/ufo_qwen2.5_3b.py", f"--init_from={ckpt}",
                                      f"--train_data={tmp_path / 'growing.jsonl'}", "--train_format=math",
                                      f"--eval_data={data / 'math.jsonl'}", "--eval_format=math", f"--out_dir={out}",
                                      *TINY_RUN, "--max_steps=4", "--problems_per_step=1", "--keep_groups=1",
                                      "--eval_interval=0", "--max_turns=2", "--max_prompt_tokens=256", "--seed=1337"])
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    records = train_records(out)
    assert [r["graph_captures"] for r in records] == [len(graphs)] * 4 and len(graphs) == 2  # buckets 1 and 2
    assert all(r["graph_capture_failures"] == 0 and r["decode_graph_replays"] == r["decode_steps"] > 0
               for r in records)


def test_a_prm_reward_run_places_step_rewards(tmp_path, tiny_qwen_run):
    from prm_utils import write_prm_checkpoint
    ckpt, data = tiny_qwen_run
    prm, _ = write_prm_checkpoint(tmp_path / "prm")
    out = tmp_path / "run"
    math = data / "math.jsonl"
    train("config/ufo_qwen2.5_3b.py", f"--init_from={ckpt}", f"--train_data={math}", "--train_format=math",
          f"--eval_data={math}", "--eval_format=math", "--n_eval_problems=2", f"--out_dir={out}", "--device=cpu",
          "--dtype=float32", "--tp=1", "--max_steps=1", "--problems_per_step=2", "--n_samples_per_problem=2",
          "--keep_groups=0", "--minibatch_size=2", "--max_new_tokens=6", "--max_turns=2", "--eval_k=1",
          "--reward=prm", f"--prm={prm}", "--reward_placement=per_step", "--prm_gold_weight=0.5",
          "--temperature=1.0")
    record = train_records(out)[0]
    assert 0.0 <= record["prm_score"] <= 1.0 and record["updates"] >= 1
    assert record["prm_unscored_attempts"] < 8  # a random model's 6 tokens mostly hold a step


@pytest.mark.parametrize("args, expected", [
    (["--train_data={d}/renamed.jsonl"],
     "--train_data: {d}/renamed.jsonl: cannot detect the format .* columns found: gold, prompt; "
     "set --train_format=..."),
    (["--train_data={d}/renamed.jsonl", "--train_question_key=prompt", "--train_format=generic"],
     "--train_data: {d}/renamed.jsonl: no answer column 'answer' .* columns found: gold, prompt; "
     "set --train_answer_key="),
    (["--train_data={d}/math.jsonl", "--eval_data={d}/unlabeled.jsonl"],
     "--eval_data: {d}/unlabeled.jsonl: cannot detect the format .* columns found: question; set --eval_format="),
])
def test_a_data_file_that_does_not_fit_is_one_line_and_exit_status_2(tiny_qwen_run, args, expected):
    ckpt, data = tiny_qwen_run
    args = [a.format(d=data) for a in args]
    proc = train(f"--init_from={ckpt}", f"--eval_data={data / 'math.jsonl'}", *args, "--tp=1", "--device=cpu",
                 check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.match(expected.format(d=re.escape(str(data))), proc.stderr.strip()), proc.stderr


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_DEMO, f"--out_dir={out}", "--max_steps=1000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and '"train"' in log.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "continue with --resume" in err
    step = json.loads(log.read_text().splitlines()[-1])["step"]
    assert (out / "latest").read_text().strip() == f"ckpt-{step}"
