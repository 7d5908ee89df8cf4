"""Shared fixtures: tiny random Qwen2 checkpoints written by transformers, the real Qwen2.5 tokenizer, and a
recorder of the sampler's draws (kept_draws); under pytest-xdist, each worker's share of the CPU threads.
pytest loads this file for every test under tests/; it runs nothing itself:

    PYTHONPATH=. TRITON_INTERPRET=1 python -m pytest -q -n auto --dist loadscope tests    # as make test
"""
import os

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nanoufo.tokenizer import load_tokenizer

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # an xdist worker: its share of the cores, for its subprocesses too
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)


# with vocab_size=len(qwen_tokenizer): the real tokenizer and chat template on a model that costs nothing
TINY_QWEN = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                 num_hidden_layers=1)


@pytest.fixture
def torch_paths(monkeypatch):
    """Run the kernels' PyTorch references (kernels/dispatch.py picks them when TRITON_INTERPRET is not 1),
    for tests whose point is the code around the kernels: the kernels have their own tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def kept_draws(monkeypatch) -> list[tuple[int, int]]:
    """Records the sampler's kept draws as (seed, noise id) while the test runs: a draw is the uniforms of
    its seed and id, so two equal pairs are one draw twice. Kept: a live row's (a row that ended since the
    last poll still draws, into a column nobody reads)."""
    import nanoufo.decode as decode
    draws, live_rows = [], []
    advance, sample = decode.Decoder.advance, decode.sample

    def recording_advance(self, rows, logits):
        live_rows.append(self.live[rows].clone())
        advance(self, rows, logits)

    def recording_sample(logits, temperature, top_p, seed, noise_ids):
        draws.extend((seed, i) for i in noise_ids[live_rows.pop()].tolist())
        return sample(logits, temperature, top_p, seed, noise_ids)

    monkeypatch.setattr(decode.Decoder, "advance", recording_advance)
    monkeypatch.setattr(decode, "sample", recording_sample)
    return draws


def make_hf_model(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A random transformers Qwen2ForCausalLM (fp32, eval mode) with TINY's shape and the overrides."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a tiny random HF Qwen2 model to a directory and return (dir, hf_model)."""
    def make(name: str = "ckpt", seed: int = 0, max_shard_size: str | None = None, **overrides):
        model = make_hf_model(seed, **overrides)
        path = tmp_path / name
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return path, model
    return make


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return load_tokenizer()
