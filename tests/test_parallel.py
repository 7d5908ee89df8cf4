"""Tensor and data parallelism on CPU: 2 gloo processes launched inside pytest (tests/distributed_utils.py).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_parallel.py

Each launch costs a few seconds of process start-up, so one TP=2 launch runs every TP check. The children
re-import this module to find their function: heavy imports (transformers) stay inside the tests.
"""
import pytest
import torch

from distributed_utils import launch, run_ranks
from nanoufo.parallel import ParallelContext, init_parallel, split_range

TOL = 1e-5


def test_split_range_is_balanced_and_covers_everything():
    for n, size in [(101, 2), (7, 4), (151936, 8)]:
        ranges = [split_range(n, r, size) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_unsplittable_config_fails_before_any_weight_is_read(hf_checkpoint, monkeypatch):
    from nanoufo.weights import load_model
    path, _ = hf_checkpoint(num_attention_heads=4, num_key_value_heads=1)
    (path / "model.safetensors").unlink()  # had the loader touched weights, it would fail on this instead
    with pytest.raises(ValueError, match=r"config\.json: num_key_value_heads=1 is not divisible by tp=2"):
        load_model(path, tp=ParallelContext(tp_size=2))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"tp=2 does not divide the world size 3"):
        init_parallel(tp=2)


def _logits(model, ids):
    return model.logits(model(ids, torch.arange(ids.shape[1]).expand_as(ids)))  # (B, T, V_local)


def _full_logits(model, ids, ctx):
    from nanoufo.parallel import Shard, all_gather_shards
    V = model.config.vocab_size
    local = _logits(model, ids)
    return all_gather_shards(local, Shard(2, model.vocab_start, model.vocab_start + local.shape[2], V), ctx)


def _tp_checks(ckpts: list, out_dir: str) -> dict:
    """Runs on each of 2 ranks with tp=2; returns the largest differences against the TP=1 model."""
    from nanoufo.weights import load_model, save_model
    ctx = init_parallel(tp=2, timeout_s=60)
    errors = {}
    for i, ckpt in enumerate(ckpts):
        ref, model = load_model(ckpt).eval(), load_model(ckpt, tp=ctx).eval()
        assert model.num_params() < 0.6 * ref.num_params()  # each rank holds about half the weights
        ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            want = _logits(ref, ids)
            errors[f"logits_{i}"] = (_full_logits(model, ids, ctx) - want).abs().max().item()
        save_model(model, f"{out_dir}/saved_{i}")
    return errors


def test_tp2_matches_tp1(hf_checkpoint, tmp_path):
    untied = hf_checkpoint("untied")  # vocab 101: ranks hold 51 and 50 rows
    tied = hf_checkpoint("tied", tie_word_embeddings=True, num_key_value_heads=4, vocab_size=96)
    for errors in launch(_tp_checks, 2, args=([str(untied[0]), str(tied[0])], str(tmp_path))):
        assert all(e < TOL for e in errors.values()), errors
    from transformers import Qwen2ForCausalLM
    ids = torch.randint(0, 96, (2, 9))
    for i, (_, hf) in enumerate([untied, tied]):  # the TP=2 model saved one ordinary HF checkpoint
        saved = Qwen2ForCausalLM.from_pretrained(tmp_path / f"saved_{i}").eval()
        with torch.no_grad():
            assert (saved(ids).logits - hf(ids).logits).abs().max() < TOL
