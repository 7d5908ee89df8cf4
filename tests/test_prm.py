"""Process reward models (nanoufo/prm.py and the PRM head in nanoufo/model.py) on a tiny random PRM written
in Qwen2.5-Math-PRM's Hugging Face layout (tests/prm_utils.py): step scores against transformers'
Qwen2Model plus the same head, single, batched and packed, and under TP=2 on gloo; saving; ProcessBench
metrics on a hand-made file; an input exactly as long as the context; and the errors for bad checkpoints,
tokenizers and rows.

    python -m pytest -q tests/test_prm.py
"""
import importlib
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed_utils import launch
from nanoufo.model import param_shapes
from nanoufo.parallel import init_parallel
from nanoufo.prm import (PRMScorer, aggregate, evaluate_processbench, first_flagged, load_processbench, mean_f1,
                         pack, processbench_files, processbench_metrics, split_steps, step_spans)
from nanoufo.weights import load_model, save_model
from prm_utils import write_prm_checkpoint, write_prm_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
launches = importlib.import_module("launches")

TOL = 1e-5
QUESTIONS = ["What is 2 + 3?", "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "Solve x^2 = 4 for x > 0."]
STEPS = [["2 + 3 = 5.\nSo \\boxed{5}."],
         ["In May she sold 48 / 2 = 24 clips.", "In all: 48 + 24 = 72.", "The answer is \\boxed{72}."],
         ["x^2 = 4.", "So x = 2 or x = -2.", "x > 0 leaves 2.", "Check: 2^2 = 4.", "\\boxed{2}"]]


pytestmark = pytest.mark.usefixtures("torch_paths")  # the kernels' PyTorch references (tests/conftest.py)


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    return write_prm_checkpoint(tmp_path_factory.mktemp("prm") / "ckpt")


def test_steps_are_split_on_blank_lines():
    text = "  Step one.\n\nStep two,\nstill two.\n \t\n\nStep three.\n"
    assert split_steps(text) == ["Step one.", "Step two,\nstill two.", "Step three."]
    assert [text[a:b] for a, b in step_spans(text)] == split_steps(text)
    assert step_spans(text)[0] == (2, 11)
    assert split_steps("") == split_steps(" \n\n \n") == []


def test_pack_first_fit_longest_first():
    assert pack([5, 3, 8, 2, 9], capacity=10) == [[4], [2, 3], [0, 1]]
    assert pack([12, 1], capacity=10) == [[0], [1]]  # an item longer than a row gets a row of its own


def test_step_scores_equal_the_transformers_reference(prm):
    path, reference = prm
    scorer = PRMScorer.load(path)
    want = [reference(scorer.input_ids(q, s)) for q, s in zip(QUESTIONS, STEPS)]
    assert [len(w) for w in want] == [1, 3, 5]
    single = scorer.step_scores(QUESTIONS[1:2], STEPS[1:2])[0]
    assert (single - want[1]).abs().max() < TOL
    lengths = [len(scorer.input_ids(q, s)) for q, s in zip(QUESTIONS, STEPS)]
    for tokens_per_row, rows_per_call in [(4096, 4), (max(lengths), 1), (lengths[0] + lengths[1], 2)]:
        scorer.tokens_per_row, scorer.rows_per_call = tokens_per_row, rows_per_call  # packed 3, 1 and 2 to a row
        got = scorer.step_scores(QUESTIONS, STEPS)
        assert all((g - w).abs().max() < TOL for g, w in zip(got, want)), (tokens_per_row, got, want)
    assert max(w.max() for w in want) - min(w.min() for w in want) > 0.01  # the scores are not all alike
    assert scorer.response_scores(QUESTIONS[1:2], ["\n\n".join(STEPS[1])], "min") == [
        pytest.approx(float(want[1].min()), abs=TOL)]
    assert aggregate(torch.tensor([0.5, 0.2, 0.9]), "product") == pytest.approx(0.09)


@pytest.mark.parametrize("flash", [False, True], ids=["sdpa", "flash_attn"])
def test_a_scoring_call_reads_back_only_its_scores(prm, flash):
    """The call's inputs go to the device pinned and non-blocking, and the model gets their lengths from the
    host: no host sync finds the packed sequences, with SDPA and with flash-attn (bench/launches.py's
    stand-in); the one read is the scores coming back."""
    scorer = PRMScorer.load(prm[0])
    rows = [[scorer.input_ids(q, s) for q, s in zip(QUESTIONS[:2], STEPS[:2])], [scorer.input_ids(QUESTIONS[2],
                                                                                                  STEPS[2])]]
    with launches.fake_flash_attn() if flash else nullcontext() as fake:
        counter = launches.count_launches(lambda: scorer._score_rows(rows), layers=[])
    assert counter.copies == 0 and counter.syncs == 1 and all(site.startswith("nanoufo/prm.py") for site in
                                                              counter.sites), counter.sites
    assert not flash or [name for name, _, _ in fake.calls] == ["varlen"] * 2  # one call per layer


def test_items_without_steps_or_too_long_score_none(prm):
    path, _ = prm
    scorer = PRMScorer.load(path)
    scorer.model.config.max_position_embeddings = 60
    got = scorer.step_scores(["q", "q", "q " * 100], [[], ["a."], ["a."]])
    assert got[0] is None and got[1].shape == (1,) and got[2] is None
    assert scorer.response_scores(["q"], [" \n\n "], "min") == [None]


def test_an_input_exactly_as_long_as_the_context_is_scored_and_one_token_more_is_not(prm):
    path, reference = prm
    scorer = PRMScorer.load(path)
    n = len(scorer.input_ids(QUESTIONS[1], STEPS[1]))
    scorer.model.config.max_position_embeddings = n
    got = scorer.step_scores(QUESTIONS[1:2], STEPS[1:2])[0]
    assert got is not None and (got - reference(scorer.input_ids(QUESTIONS[1], STEPS[1]))).abs().max() < TOL
    scorer.model.config.max_position_embeddings = n - 1
    assert scorer.step_scores(QUESTIONS[1:2], STEPS[1:2]) == [None]


def test_prm_checkpoint_round_trips(prm, tmp_path):
    path, reference = prm
    model = load_model(path)
    assert model.lm_head is None and model.config.is_prm
    save_model(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == [
        "Qwen2ForProcessRewardModel"]
    saved, original = load_file(tmp_path / "saved" / "model.safetensors"), load_file(path / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    with pytest.raises(ValueError, match="no LM head"):
        model.lm_head_weight


def _tp_scores(ckpt: str) -> list[list[float]]:
    par = init_parallel(tp=2, timeout_s=60)
    scorer = PRMScorer.load(ckpt, par=par, tokens_per_row=64, rows_per_call=1)
    full = sum(shape.numel() for shape in param_shapes(scorer.model.config).values())
    assert scorer.model.num_params() < 0.6 * full  # the trunk is split, the head replicated
    assert scorer.model.score[2].weight.shape == (2, scorer.model.config.hidden_size)
    return [s.tolist() for s in scorer.step_scores(QUESTIONS, STEPS)]


def test_step_scores_under_tp2_equal_the_reference(prm):
    path, reference = prm
    scorer = PRMScorer.load(path)
    want = [reference(scorer.input_ids(q, s)) for q, s in zip(QUESTIONS, STEPS)]
    for scores in launch(_tp_scores, 2, args=(str(path),)):
        assert all((torch.tensor(g) - w).abs().max() < TOL for g, w in zip(scores, want))


# --- bad checkpoints: the error names the file and the problem ---

def test_a_head_of_the_wrong_shape_is_named(tmp_path):
    path, _ = write_prm_checkpoint(tmp_path / "prm")
    tensors = load_file(path / "model.safetensors")
    tensors["score.2.weight"] = torch.zeros(3, 16)  # three labels, not two
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'score\.2\.weight' has shape \[3, 16\] but "
                                         r"config\.json implies \[2, 16\]"):
        PRMScorer.load(path)


def test_a_missing_head_or_an_lm_head_is_named(tmp_path):
    path, _ = write_prm_checkpoint(tmp_path / "prm")
    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("score.")}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'score\.0\.weight' missing from the checkpoint \(and 3 more\)"):
        load_model(path)
    save_file(tensors | {"lm_head.weight": torch.zeros(151665, 16)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'lm_head\.weight'"):
        load_model(path)


def test_a_tokenizer_without_the_separator_is_refused_before_the_weights(tmp_path, qwen_tokenizer):
    path, _ = write_prm_checkpoint(tmp_path / "prm", tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"prm: a PRM checkpoint needs its own tokenizer"):
        PRMScorer.load(path)
    qwen_tokenizer.save_pretrained(path)  # the general Qwen2.5 tokenizer: id 151651 is <|quad_end|>
    (path / "model.safetensors").unlink()  # had the loader read weights, it would fail on this instead
    with pytest.raises(ValueError, match=r"prm: the tokenizer has no <extra_0> token"):
        PRMScorer.load(path)


def test_a_causal_lm_is_not_a_prm(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint()
    write_prm_tokenizer(path)
    with pytest.raises(ValueError, match=r"is a Qwen2ForCausalLM, not a Qwen2ForProcessRewardModel"):
        PRMScorer.load(path)


# --- ProcessBench ---

def test_processbench_metrics_by_hand():
    # labels: two erroneous rows (found at 1, missed), two correct rows (one flagged by mistake)
    table = processbench_metrics(predicted=[1, -1, -1, 0], labels=[1, 2, -1, -1])
    assert (table["acc_erroneous"], table["acc_correct"], table["f1"]) == (0.5, 0.5, 0.5)
    table = processbench_metrics(predicted=[1, 2, -1], labels=[1, 2, -1])
    assert table["f1"] == 1.0 and table["erroneous"] == 2.0
    only_correct = processbench_metrics(predicted=[-1, 0], labels=[-1, -1])  # no erroneous sample: F1 undefined
    assert math.isnan(only_correct["acc_erroneous"]) and only_correct["acc_correct"] == 0.5
    assert math.isnan(only_correct["f1"])
    assert processbench_metrics(predicted=[0, 1], labels=[1, -1])["f1"] == 0.0  # both accuracies 0
    assert first_flagged(torch.tensor([0.9, 0.6, 0.3, 0.1]), 0.5) == 2
    assert first_flagged(torch.tensor([0.9, 0.6]), 0.5) == -1


class FakeScorer:
    """Scores each step by the number written in it: "0.3" scores 0.3."""

    def step_scores(self, questions, step_lists):
        return [torch.tensor([float(s.split()[-1]) for s in steps]) for steps in step_lists]


def test_processbench_file_rows_metrics_and_skipped_rows(tmp_path):
    rows = [{"problem": "p0", "steps": ["a 0.9", "b 0.2", "c 0.1"], "label": 1},  # found: first below 0.5
            {"problem": "p1", "steps": ["a 0.9", "b 0.8"], "label": 0},  # missed: nothing flagged
            {"problem": "p2", "steps": ["a 0.7", "b 0.6"], "label": -1},  # right
            {"problem": "p3", "steps": ["a 0.4"], "label": -1},  # wrongly flagged at 0
            {"problem": "p4", "steps": ["a 0.4"], "label": 1},  # out of range: skipped
            {"problem": "p5", "steps": [], "label": -1},  # no steps: skipped
            {"problem": "p6", "steps": ["a 0.4"], "label": "0"},  # not an int: skipped
            {"steps": ["a 0.4"], "label": 0}]  # no problem: skipped
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    good, skipped = load_processbench(path)
    assert [r.problem for r in good] == ["p0", "p1", "p2", "p3"]
    assert skipped == [f"{path}:5: label 1 is out of range for 1 steps (-1, or 0 to 0)", f"{path}:6: no steps",
                       f"{path}:7: label '0' is out of range for 1 steps (-1, or 0 to 0)",
                       f"{path}:8: no 'problem' text"]
    table, records = evaluate_processbench(FakeScorer(), good, threshold=0.5)
    assert [r["predicted"] for r in records] == [1, -1, -1, 0]
    assert (table["acc_erroneous"], table["acc_correct"], table["f1"], table["unscored"]) == (0.5, 0.5, 0.5, 0.0)
    table, _ = evaluate_processbench(FakeScorer(), good, threshold=0.95)  # everything flagged at step 0
    assert (table["acc_erroneous"], table["acc_correct"], table["f1"]) == (0.5, 0.0, 0.0)


class TooLongScorer(FakeScorer):
    """FakeScorer, except that it cannot read a row with a step saying "long" (as a PRM a row past its context)."""

    def step_scores(self, questions, step_lists):
        scores = super().step_scores(questions, step_lists)
        return [None if any("long" in s for s in steps) else x for steps, x in zip(step_lists, scores)]


def test_processbench_rows_too_long_for_the_prm_are_wrong_and_counted(tmp_path):
    """As ProcessBench's code counts a critique without a readable verdict (code/run_eval.py:90-112, 117-129):
    in the denominator, never a match, whatever its label."""
    rows = [{"problem": "p0", "steps": ["a 0.9", "b 0.2"], "label": 1},  # found
            {"problem": "p1", "steps": ["long 0.9"], "label": -1},  # unscored: wrong although nothing is flagged
            {"problem": "p2", "steps": ["long 0.1"], "label": 0}]  # unscored: wrong although step 0 is low
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    table, records = evaluate_processbench(TooLongScorer(), load_processbench(path)[0], threshold=0.5)
    assert [(r["predicted"], r["scores"]) for r in records] == [(1, pytest.approx([0.9, 0.2])), (None, None),
                                                                (None, None)]
    assert (table["samples"], table["unscored"], table["acc_erroneous"], table["acc_correct"], table["f1"]) == (
        3.0, 2.0, 0.5, 0.0, 0.0)
    assert mean_f1([table, {"f1": 0.5}, {"f1": 0.7}]) == pytest.approx(0.4)  # the paper's "Avg." over subsets


def test_processbench_files_a_directory_of_the_four_subsets_a_list_or_one_file(tmp_path):
    for name in ("gsm8k.jsonl", "math.jsonl", "olympiadbench.json", "omnimath.jsonl", "other.jsonl"):
        (tmp_path / name).write_text("")
    assert processbench_files(str(tmp_path)) == [(n, tmp_path / f) for n, f in (
        ("gsm8k", "gsm8k.jsonl"), ("math", "math.jsonl"), ("olympiadbench", "olympiadbench.json"),
        ("omnimath", "omnimath.jsonl"))]  # the data set's order; other files are not subsets
    listed = f"{tmp_path / 'math.jsonl'}, {tmp_path / 'other.jsonl'}"
    assert processbench_files(listed) == [("math", tmp_path / "math.jsonl"), ("other", tmp_path / "other.jsonl")]
    assert processbench_files(str(tmp_path / "gsm8k.jsonl")) == [("gsm8k", tmp_path / "gsm8k.jsonl")]
    (tmp_path / "omnimath.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="no omnimath.jsonl .*the four subsets gsm8k, math, olympiadbench"):
        processbench_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="omnimath.jsonl: ProcessBench file not found"):
        processbench_files(f"{tmp_path / 'math.jsonl'},{tmp_path / 'omnimath.jsonl'}")


def test_a_processbench_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"problem": "p", "steps": ["a"], "label": -1}\n{broken\n')
    with pytest.raises(ValueError, match=r"bench\.jsonl: line 2: not JSON"):
        load_processbench(path)
    listed = tmp_path / "bench.json"  # the .json form holds a list; its rows are named by index
    listed.write_text('[{"problem": "p", "steps": ["a"], "label": -1}, {"problem": "p", "steps": ["a"], "label": 1}]')
    rows, skipped = load_processbench(listed)
    assert [r.id for r in rows] == [f"{listed}:0"] and skipped == [f"{listed}:1: label 1 is out of range for 1 "
                                                                  "steps (-1, or 0 to 0)"]
    listed.write_text('{"problem": "p"}')
    with pytest.raises(ValueError, match=r"bench\.json: a \.json ProcessBench file must hold a list of rows"):
        load_processbench(listed)
