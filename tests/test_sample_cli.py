"""sample.py end to end on a tiny random checkpoint with the real Qwen2.5 vocabulary: multi-turn evaluation
with a JSONL file (as a subprocess), the Pass@k baseline, and the chat (nanoufo/chat.py) driven through
stdin (in process, which saves the interpreter start-up). The printed metrics are compared with evaluate()
called directly. PyTorch paths: the kernels have their own tests.

    python -m pytest -q tests/test_sample_cli.py
"""
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import sample
from conftest import TINY_QWEN
from nanoufo.data import DEFAULT_EVAL_SETS, load_problems
from nanoufo.env import UFOEnv
from nanoufo.evaluate import evaluate
from nanoufo.options import EnvOptions, SamplingOptions
from nanoufo.weights import load_model

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("torch_paths")  # the kernels' PyTorch references (tests/conftest.py)


@pytest.fixture
def ckpt(hf_checkpoint, qwen_tokenizer):
    path, _ = hf_checkpoint(vocab_size=len(qwen_tokenizer), **TINY_QWEN)
    return path


def printed_table(stdout: str, names) -> dict[str, float]:
    """The value printed after each metric name (n/a: NaN)."""
    rows = {line.split()[0]: line.split()[1] for line in stdout.splitlines() if len(line.split()) == 2}
    return {name: math.nan if rows[name] == "n/a" else float(rows[name]) for name in names}


def evaluate_directly(ckpt, tokenizer, mode: str, k: int, max_new_tokens: int, limit: int) -> dict[str, float]:
    """evaluate() on what sample.py's defaults name: bundled GSM8K, the bundled tokenizer, temperature 0.5, seed 0."""
    problems, _ = load_problems(DEFAULT_EVAL_SETS["gsm8k"], limit=limit)
    return evaluate(load_model(ckpt).eval(), UFOEnv(tokenizer, EnvOptions(max_turns=k)), problems,
                    SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.5), k=k, mode=mode, seed=0,
                    tokenizer=tokenizer, progress=False)


def assert_same_table(printed: dict[str, float], expected: dict[str, float]) -> None:
    assert printed.keys() == expected.keys()
    for name, value in expected.items():
        assert printed[name] == pytest.approx(value, abs=5e-5, nan_ok=True), name  # printed to 4 decimals


def chat(args: list[str], stdin: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    sample.main(["--mode", "chat", *args])
    return capsys.readouterr().out


def test_eval_prints_the_table_and_writes_jsonl(ckpt, qwen_tokenizer, tmp_path):
    out = tmp_path / "eval.jsonl"
    args = ["--ckpt", str(ckpt), "--limit", "2", "--k", "2", "--max-new-tokens", "4", "--out", str(out)]
    done = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    stdout = done.stdout
    assert "gsm8k/test.jsonl: 2 eval problems" in stdout
    expected = evaluate_directly(ckpt, qwen_tokenizer, "succ", k=2, max_new_tokens=4, limit=2)
    assert {"succ@1", "succ@2", "mean_turns", "non_repetitive_ratio", "tokens_per_episode"} <= expected.keys()
    assert_same_table(printed_table(stdout, expected), expected)
    assert expected["mean_turns"] == 2 and expected["tokens_per_episode"] > 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["gsm8k/test.jsonl:0", "gsm8k/test.jsonl:1"]
    assert all(r["turns"] == 2 and len(r["responses"]) == 2 for r in records)  # a random model never solves


def test_passk_mode(ckpt, qwen_tokenizer, capsys):
    sample.main(["--ckpt", str(ckpt), "--mode", "passk", "--limit", "2", "--k", "3", "--max-new-tokens", "2"])
    stdout = capsys.readouterr().out
    expected = evaluate_directly(ckpt, qwen_tokenizer, "pass", k=3, max_new_tokens=2, limit=2)
    assert {"problems", "pass@1", "pass@3", "tokens_per_episode"} <= expected.keys()
    assert_same_table(printed_table(stdout, expected), expected)
    assert expected["problems"] == 2 and expected["tokens_per_episode"] == 2.0  # 3 one-attempt samples each


def test_chat_reads_feedback_and_commands_from_stdin(ckpt, qwen_tokenizer, monkeypatch, capsys):
    qwen_tokenizer.save_pretrained(ckpt)  # the checkpoint's own tokenizer is used when present
    stdin = "What is 1 + 1?\nTry again.\n\n/new What is 2 + 2?\n/quit\n"
    stdout = chat(["--ckpt", str(ckpt), "--max-new-tokens", "3", "--temperature", "1.0"], stdin, monkeypatch, capsys)
    assert stdout.count("model> ") == 4  # three answers to the first question, one to the second
    assert "you> /new What is 2 + 2?" in stdout and stdout.rstrip().endswith("you> /quit")


def test_chat_ends_at_the_context_limit(ckpt, monkeypatch, capsys):
    stdout = chat(["--ckpt", str(ckpt), "--max-new-tokens", "4", "--max-len", "60"],
                  "What is 1 + 1?\nTry again.\nTry again.\nTry again.\n", monkeypatch, capsys)
    assert "filled --max-len=60 tokens" in stdout


def test_a_users_own_field_names_and_a_clear_error_without_them(ckpt, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "What is 2+3?", "gold": "5"}\n{"prompt": "What is 4*4?", "gold": "16"}\n')
    sample.main(["--ckpt", str(ckpt), f"--data={data}", "--question_key=prompt", "--answer_key=gold", "--k=1",
                 "--max_new_tokens=2"])
    assert f"{data}: 2 eval problems" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        sample.main(["--ckpt", str(ckpt), f"--data={data}", "--format=generic", "--question_key=prompt"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"--data: {data}: no answer column 'answer'") and "columns found: gold, prompt" in err
    assert err.endswith("set --answer_key=...")
