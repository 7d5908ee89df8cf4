"""sample.py end to end on a tiny random checkpoint with the real Qwen2.5 vocabulary: multi-turn evaluation
with a JSONL file (as a subprocess), the Pass@k baseline, and a chat driven through stdin (in process,
which saves the interpreter start-up). PyTorch paths: the kernels have their own tests.

    python -m pytest -q tests/test_sample_cli.py
"""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sample

ROOT = Path(__file__).resolve().parent.parent
TINY_QWEN = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                 num_hidden_layers=1)


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels/dispatch.py then picks the PyTorch references


@pytest.fixture
def ckpt(hf_checkpoint, qwen_tokenizer):
    path, _ = hf_checkpoint(vocab_size=len(qwen_tokenizer), **TINY_QWEN)
    return path


def chat(args: list[str], stdin: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    sample.main(["--mode", "chat", *args])
    return capsys.readouterr().out


def test_eval_prints_the_table_and_writes_jsonl(ckpt, tmp_path):
    out = tmp_path / "eval.jsonl"
    args = ["--ckpt", str(ckpt), "--limit", "2", "--k", "2", "--max-new-tokens", "4", "--out", str(out)]
    done = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stdout = done.stdout
    assert "gsm8k/test.jsonl: 2 problems" in stdout
    for metric in ("succ@1", "succ@2", "mean_turns", "non_repetitive_ratio", "tokens_per_episode"):
        assert metric in stdout
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["gsm8k/test.jsonl:0", "gsm8k/test.jsonl:1"]
    assert all(r["turns"] == 2 and len(r["responses"]) == 2 for r in records)  # a random model never solves


def test_passk_mode(ckpt, capsys):
    sample.main(["--ckpt", str(ckpt), "--mode", "passk", "--limit", "2", "--k", "3", "--max-new-tokens", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["problems", "2"] for line in lines)
    assert any(line.split() == ["tokens_per_episode", "2.0000"] for line in lines)  # 3 one-attempt samples each
    assert any(line.startswith("pass@3") for line in lines)


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
    assert f"{data}: 2 problems" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        sample.main(["--ckpt", str(ckpt), f"--data={data}", "--format=generic", "--question_key=prompt"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"--data: {data}: no answer column 'answer'") and "columns found: gold, prompt" in err
    assert err.endswith("set --answer_key=...")
