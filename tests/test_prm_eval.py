"""Evaluation with a process reward model: Best-of-N (RM@N) next to Maj@N and Pass@N on a tiny random policy
with a fake PRM whose preferences are known, and sample.py's bon and processbench modes end to end with a
tiny random PRM (tests/prm_utils.py), bad input included. PyTorch paths (the kernels have their own tests).

    python -m pytest -q tests/test_prm_eval.py
"""
import json
from collections import Counter

import pytest

import nanoufo.env
import sample
from nanoufo.data import Problem
from nanoufo.env import UFOEnv
from nanoufo.evaluate import best_of_n
from nanoufo.options import EnvOptions, SamplingOptions
from nanoufo.weights import load_model
from conftest import TINY_QWEN
from prm_utils import write_prm_checkpoint

PROBLEMS = [Problem("What is 2 + 3?", "5", "p0"), Problem("What is 10 / 4?", "2.5", "p1"),
            Problem("What is 7 * 6?", "42", "p2")]


pytestmark = pytest.mark.usefixtures("torch_paths")  # the kernels' PyTorch references (tests/conftest.py)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, qwen_tokenizer):
    from conftest import make_hf_model
    path = tmp_path_factory.mktemp("policy")
    make_hf_model(seed=1, vocab_size=len(qwen_tokenizer), **TINY_QWEN).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    return write_prm_checkpoint(tmp_path_factory.mktemp("prm") / "ckpt")[0]


def majority(values: list) -> object:
    """The most frequent value, ties going to the value of the earliest sample."""
    counts = Counter(values)
    return next(v for v in values if counts[v] == max(counts.values()))


class LongestIsBest:
    """A fake PRM that prefers longer responses (and cannot score empty ones)."""

    def response_scores(self, questions, responses, how):
        return [float(len(r)) if r.strip() else None for r in responses]


def test_best_of_n_majority_and_pass_over_the_same_samples(policy_dir, qwen_tokenizer, monkeypatch, tmp_path):
    # answers and verdicts as known functions of the sampled text: the answer is len(text) % 3, "0" is right
    monkeypatch.setattr(nanoufo.env, "grade_batch", lambda answers, golds, timeout=5.0: [a == "0" for a in answers])
    env = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=1))
    env.extract = lambda text: str(len(text) % 3)  # the reader the env chose for its answer format
    out, n = tmp_path / "bon.jsonl", 4
    table = best_of_n(load_model(policy_dir).eval(), env, PROBLEMS, LongestIsBest(),
                      SamplingOptions(max_new_tokens=6, temperature=1.0), n=n, batch_size=8, out=out, progress=False)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [p.id for p in PROBLEMS for _ in range(n)]
    groups = [records[i:i + n] for i in range(0, len(records), n)]
    texts = [[r["responses"][0] for r in g] for g in groups]
    right = [[len(t) % 3 == 0 for t in ts] for ts in texts]
    longest = [max(range(n), key=lambda j: (len(ts[j]), -j)) for ts in texts]
    maj_right = [majority([len(t) % 3 for t in ts]) == 0 for ts in texts]
    assert table[f"pass@{n}"] == pytest.approx(sum(map(any, right)) / 3)
    assert table["pass@1"] == pytest.approx(sum(map(sum, right)) / (3 * n))
    assert table[f"rm@{n}"] == pytest.approx(sum(r[j] for r, j in zip(right, longest)) / 3)
    assert table[f"maj@{n}"] == pytest.approx(sum(maj_right) / 3)
    assert [r["prm_score"] for r in records] == [float(len(t)) if t.strip() else None for ts in texts for t in ts]
    assert len({len(t) for ts in texts for t in ts}) > 2  # the samples differ, so the picks mean something


# --- sample.py ---

def test_sample_bon_prints_rm_maj_pass_for_each_set(policy_dir, prm_dir, capsys, tmp_path):
    sample.main(["--ckpt", str(policy_dir), "--mode", "bon", "--prm", str(prm_dir), "--data", "gsm8k,math500",
                 "--limit", "2", "--k", "3", "--max-new-tokens", "8", "--temperature", "1.0",
                 "--out", str(tmp_path / "bon")])
    out = capsys.readouterr().out
    assert "gsm8k/test.jsonl: 2 eval problems" in out and "math500/test.jsonl: 2 eval problems" in out
    for metric in ("pass@1", "pass@3", "maj@3", "rm@3", "unscored"):
        assert out.count(metric) == 2
    records = [json.loads(line) for line in (tmp_path / "bon.math500.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all("prm_score" in r for r in records)
    assert any(isinstance(r["prm_score"], float) for r in records)  # the tiny PRM scored real responses


def test_sample_processbench_reports_accuracies_and_skipped_rows(prm_dir, capsys, tmp_path):
    rows = [{"problem": "What is 2 + 3?", "steps": ["2 + 3 = 5.", "\\boxed{5}"], "label": -1},
            {"problem": "What is 2 + 3?", "steps": ["2 + 3 = 6.", "\\boxed{6}"], "label": 0},
            {"problem": "What is 2 + 3?", "steps": ["2 + 3 = 5."], "label": 3}]
    data = tmp_path / "bench.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    base = ["--mode", "processbench", "--prm", str(prm_dir), "--data", str(data), "--out", str(tmp_path / "s.jsonl")]
    sample.main([*base, "--threshold", "0.0"])  # nothing scores below 0: every row is predicted correct
    out = capsys.readouterr().out
    assert f"skipped {data}:3: label 3 is out of range for 1 steps" in out and "2 rows, 1 skipped" in out
    assert ("bench error acc: 0.0, correct acc: 100.0, f1: 0.0 (2 rows, 1 erroneous; 0 too long for the PRM, "
            "counted wrong)") in out
    assert "mean f1 over 1 subsets (bench): 0.0" in out
    sample.main([*base, "--threshold", "1.0"])  # every first step is flagged
    assert "bench error acc: 100.0, correct acc: 0.0, f1: 0.0" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["label"], r["predicted"], len(r["scores"])) for r in records] == [(-1, 0, 2), (0, 0, 2)]


def test_sample_processbench_on_the_four_subsets_counts_rows_too_long_for_the_prm(capsys, tmp_path):
    """A directory of the four subsets, as ProcessBench's splits: per subset its accuracies and F1 (rows longer
    than the PRM's 64-token context counted wrong, and counted), then their mean F1, the paper's "Avg."."""
    prm = write_prm_checkpoint(tmp_path / "prm", max_position_embeddings=64)[0]
    short = {"problem": "What is 2 + 3?", "steps": ["2 + 3 = 5.", "\\boxed{5}"], "label": -1}
    long = {"problem": "What is 2 + 3? " * 20, "steps": ["2 + 3 = 5."], "label": -1}
    bench = tmp_path / "ProcessBench"
    bench.mkdir()
    wrong = dict(short, label=1)
    for name, rows in (("gsm8k", [short, wrong]), ("math", [short, long, wrong]), ("olympiadbench", [wrong]),
                       ("omnimath", [long, wrong])):
        (bench / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample.main(["--mode", "processbench", "--prm", str(prm), "--data", str(bench), "--threshold", "0.0",
                 "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    # threshold 0: every scored row is predicted -1, so correct rows are right, erroneous ones wrong
    assert "gsm8k error acc: 0.0, correct acc: 100.0, f1: 0.0 (2 rows, 1 erroneous; 0 too long" in out
    assert "math error acc: 0.0, correct acc: 50.0, f1: 0.0 (3 rows, 1 erroneous; 1 too long for the PRM" in out
    assert "olympiadbench error acc: 0.0, correct acc: n/a, f1: n/a (1 rows, 1 erroneous; 0 too long" in out
    assert "omnimath error acc: 0.0, correct acc: 0.0, f1: 0.0 (2 rows, 1 erroneous; 1 too long" in out
    assert "mean f1 over 4 subsets (gsm8k, math, olympiadbench, omnimath): n/a" in out  # F1 undefined in one
    records = [json.loads(line) for line in (tmp_path / "s.math.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in records] == [-1, None, -1]
    sample.main(["--mode", "processbench", "--prm", str(prm), "--threshold", "0.0",
                 "--data", f"{bench / 'gsm8k.jsonl'},{bench / 'math.jsonl'}"])  # two files: their mean
    assert "mean f1 over 2 subsets (gsm8k, math): 0.0" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--mode", "processbench", "--data", "x.jsonl"], "--mode=processbench needs --prm=DIR"),
    (["--mode", "processbench", "--prm", "nowhere"], "reads local ProcessBench files"),
])
def test_sample_prm_mode_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sample_a_bad_prm_or_file_is_one_line_and_exit_2(policy_dir, prm_dir, capsys, tmp_path):
    data = tmp_path / "bench.jsonl"
    data.write_text('{"problem": "p", "steps": ["a"], "label": -1}\n')
    with pytest.raises(SystemExit) as exit_info:  # a causal LM with no tokenizer of its own is no PRM
        sample.main(["--mode", "processbench", "--prm", str(policy_dir), "--data", str(data)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "needs its own tokenizer" in err
    data.write_text("{broken\n")
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--mode", "processbench", "--prm", str(prm_dir), "--data", str(data)])
    assert exit_info.value.code == 2 and "bench.jsonl: line 1: not JSON" in capsys.readouterr().err
