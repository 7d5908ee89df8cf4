"""The end-to-end benchmark scripts (bench/rollout.py, train_step.py, onpolicy.py, master_weights.py) run at their
tiny preset on the CPU: the final JSON line is printed, parses, and its figures are sane; the
transformers twin holds the same model; every engine and update path does the same work.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_bench_e2e.py

The scripts run on the PyTorch paths (the kernels are checked against them in tests/test_kernels_*.py):
that keeps this file fast, and the interpreter cannot run the bf16 rows anyway, since its tl.dot
multiplies the bit patterns of bfloat16 operands (triton-lang/triton#11584), which would turn the bf16
decode attention into noise.
"""
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the scripts import their siblings

common = importlib.import_module("common")
TINY = common.PRESETS["tiny"]


pytestmark = pytest.mark.usefixtures("torch_paths")  # the kernels' PyTorch references (tests/conftest.py)


def run_script(name: str, capsys, *args: str) -> dict:
    result = importlib.import_module(name).main(["--preset", "tiny", *args])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(result))
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["rows"]
    return result


def test_hf_twin_has_the_same_weights():
    model = common.build_model(TINY, seed=1).eval()
    hf = common.hf_twin(model)
    ids = torch.tensor([common.synthetic_prompts(TINY, 1, seed=2)[0]])  # (1, T)
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ours = model.logits(model(ids, positions))  # (1, T, V)
        theirs = hf(input_ids=ids, position_ids=positions).logits  # (1, T, V)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_synthetic_rollout_has_the_workload_layout():
    rollout = common.synthetic_rollout(TINY, batch=3, seed=0)
    prompts = common.synthetic_prompts(TINY, 3, seed=0)
    for b, prompt in enumerate(prompts):
        spans = rollout.turn_spans[b]
        assert len(spans) == TINY.turns and spans[0][0] == len(prompt)
        assert all(end - start == TINY.max_new_tokens for start, end in spans)
        assert int(rollout.loss_mask[b].sum()) == TINY.turns * TINY.max_new_tokens
        assert rollout.tokens[b, :len(prompt)].tolist() == prompt
        assert int(rollout.lengths[b]) == spans[-1][1]


def test_mixed_rollout_ends_rows_at_different_turns():
    rollout = common.synthetic_rollout(TINY, batch=12, seed=0, mixed=True)
    turns = [len(spans) for spans in rollout.turn_spans]
    assert len(set(turns)) > 1 and all(1 <= n <= TINY.turns for n in turns)
    assert rollout.loss_mask.sum(1).tolist() == [n * TINY.max_new_tokens for n in turns]
    assert rollout.lengths.tolist() == [spans[-1][1] for spans in rollout.turn_spans]


def test_rollout_script(capsys):
    result = run_script("rollout", capsys)
    (row,) = result["rows"]
    sampled = row["batch"] * TINY.turns * TINY.max_new_tokens
    assert row["sampled_tokens"] == row["hf_sampled_tokens"] == sampled  # the same workload in both engines
    assert row["tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["speedup"] > 0
    assert row["hf_prefill_per_episode"] > row["prefill_per_episode"] > 0  # the history is re-prefilled
    assert row["decode_steps"] == TINY.turns * (TINY.max_new_tokens - 1)  # each first token comes from a prefill
    assert row["decode_step_ms"] > 0 and row["roofline_ms"] is None  # no roofline on the CPU
    assert row["batch_fill"] == 1.0  # every episode runs every turn: the batch never thins


def test_rollout_script_random_turns_under_a_kv_budget(capsys):
    """Episodes end at random turns and share 2 cache rows (the budget holds 3 rows of 170 slots, spare included)."""
    result = run_script("rollout", capsys, "--random-turns", "--kv-budget-gb", "2.5e-4", "--skip-transformers")
    (row,) = result["rows"]
    assert result["random_turns"] and 0 < row["sampled_tokens"] < row["batch"] * TINY.turns * TINY.max_new_tokens
    assert 0.5 < row["batch_fill"] <= 1.0


def test_train_step_script(capsys):
    result = run_script("train_step", capsys)
    rows = {row["impl"]: row for row in result["rows"]}
    assert set(rows) == {"fused", "reference", "transformers"}
    for row in rows.values():
        assert "error" not in row and row["tokens_per_s"] > 0 and row["mfu"] is None
        assert row["updates"] == row["batch"] // result["minibatch"] and math.isfinite(row["loss"])
    # the same weights, data and update, whichever kernels and trunk: the same loss
    assert rows["reference"]["loss"] == pytest.approx(rows["fused"]["loss"], rel=1e-3, abs=1e-6)
    assert rows["transformers"]["loss"] == pytest.approx(rows["fused"]["loss"], rel=1e-3, abs=1e-6)


def test_onpolicy_script(capsys):
    """Also with a shorter workload than the preset's (--turns, --max-new-tokens), recorded in the JSON."""
    result = run_script("onpolicy", capsys, "--turns", "3", "--max-new-tokens", "4")
    assert (result["turns"], result["max_new_tokens"]) == (3, 4)
    rows = {row["compare"]: row for row in result["rows"]}
    assert set(rows) == {"bf16", "fp32", "bf16 sampler vs fp32 trainer"}
    assert rows["fp32"]["max_abs_diff"] < 1e-4
    for row in rows.values():
        assert row["tokens"] == row["batch"] * 3 * 4
        assert 0 <= row["mean_abs_diff"] <= row["max_abs_diff"] < 0.5  # bf16 rounding, not a different policy


def test_master_weights_script(capsys):
    rows = {(r["run"], r["model"]): r for r in run_script("master_weights", capsys)["rows"]}
    masters, direct = rows["bf16 + fp32 masters", "actor"], rows["bf16 parameters in AdamW", "actor"]
    assert masters["cosine_vs_fp32"] > 0.99 and masters["norm_ratio_vs_fp32"] == pytest.approx(1, rel=0.01)
    assert masters["moved_share"] > 0.99 and direct["moved_share"] < 0.1  # lr 1e-6 rounds away in bf16


def test_demo_eval_script(tmp_path, capsys):
    from nanoufo import demo
    from nanoufo.weights import save_model
    save_model(demo.build_model(len(demo.build_tokenizer()), seed=0), tmp_path / "m")
    rows = importlib.import_module("demo_eval").main([str(tmp_path / "m"), "--seeds=1,2", "--n_problems=6"])
    assert len(rows) == 1 and len(rows[0]["per_seed"]) == 2
    succ = [table["succ@5"] for table in rows[0]["per_seed"]]
    assert rows[0]["succ@5"] == pytest.approx(sum(succ) / 2)
    assert rows[0]["succ@5_sd"] == pytest.approx(abs(succ[0] - succ[1]) / 2 ** 0.5)
    assert 0.0 <= rows[0]["invalid_rate"] <= 1.0 and 0.0 <= rows[0]["non_repetitive_ratio"] <= 1.0
    assert "Succ@5" in capsys.readouterr().out
