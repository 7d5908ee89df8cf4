"""The decode kernels (KV append, flash-decoding attention, sampling) against their PyTorch references.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py
"""
import os

import pytest
import torch

from kernels.decode_attention import decode_attention_reference, decode_attention_triton
from kernels.kv_append import kv_append_reference, kv_append_triton
from nanoufo.model import attention
from kernels.sampling import philox_uniforms, sample, sample_reference, sample_triton, top_p_keep, torch_uniforms

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")


def test_kv_append_matches_reference():
    g = torch.Generator().manual_seed(0)
    B_cache, S, Hkv, D = 5, 23, 3, 12  # odd head count and head dim: masked lanes
    caches = [torch.randn(B_cache, S, Hkv, D, generator=g) for _ in range(2)]
    k, v = torch.randn(2, 3, 18, Hkv, D, generator=g)  # (B, T, Hkv, D) each: two blocks of tokens
    rows = torch.tensor([3, 0, 4])
    pos = torch.stack([torch.arange(18), torch.arange(2, 20), torch.arange(5, 23)])  # (B, T)
    ref = [c.clone() for c in caches]
    kv_append_reference(*ref, k, v, rows, pos)
    kv_append_triton(*caches, k, v, rows, pos)
    assert torch.equal(caches[0], ref[0]) and torch.equal(caches[1], ref[1])


@pytest.mark.parametrize("Hq,Hkv,D,T", [(4, 2, 16, 1), (6, 2, 24, 1), (2, 2, 8, 2)], ids=["gqa2", "gqa3_d24", "mha_t2"])
def test_decode_attention_matches_reference(Hq, Hkv, D, T, monkeypatch):
    g = torch.Generator().manual_seed(1)
    B_cache, S = 4, 70
    k_cache, v_cache = torch.randn(2, B_cache, S, Hkv, D, generator=g)
    q = torch.randn(3, T, Hq, D, generator=g)
    rows = torch.tensor([2, 0, 3])
    last = torch.tensor([0, 33, 69 - T])  # a one-slot row, a mid-split row, the full cache
    pos = last[:, None] + torch.arange(T)  # (B, T): T new tokens per row
    ref = decode_attention_reference(q, k_cache, v_cache, pos, rows)
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")  # the model's own SDPA path, which the kernel replaces for decode
        assert (attention(q, k_cache, v_cache, pos, rows) - ref).abs().max() < 1e-5
    for split_len in (16, 256):  # five splits (some empty for short rows), and one
        out = decode_attention_triton(q, k_cache, v_cache, pos, rows, split_len=split_len, block_s=16)
        assert (out - ref).abs().max() < 1e-5


def _logits(n: int, v: int, seed: int) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.8)])
def test_sampling_kernel_replays_reference_exactly(temperature, top_p):
    """Same uniforms, same token; log-probs of the tempered, untruncated softmax."""
    logits = _logits(4, 300, seed=2)
    noise_ids = torch.tensor([7, 0, 3, 12])
    tokens, logprobs = sample_triton(logits, temperature, top_p, seed=5, noise_ids=noise_ids, block_v=128)
    ref_tokens, ref_logprobs = sample_reference(logits, temperature, top_p, philox_uniforms(5, noise_ids, 300))
    assert torch.equal(tokens, ref_tokens)
    assert (logprobs - ref_logprobs).abs().max() < 1e-5
    z = logits / (temperature or 1.0)
    assert (logprobs - torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0]).abs().max() < 1e-5
    if temperature == 0:
        assert torch.equal(tokens, logits.argmax(-1))


def test_sampling_distribution_matches_truncated_softmax():
    """Many draws of one row: token frequencies follow the renormalized top-p distribution, for the
    kernel's Philox uniforms and for the torch generator ones."""
    temperature, top_p, n = 0.8, 0.85, 4000
    logits = _logits(1, 11, seed=3).expand(n, 11)
    z = logits[0] / temperature
    target = torch.softmax(z, -1) * top_p_keep(z[None], top_p)[0]
    target = target / target.sum()
    ids = torch.arange(n)
    for uniforms in (philox_uniforms(11, ids, 11), torch_uniforms(11, ids, 11, "cpu")):
        tokens, _ = sample_reference(logits, temperature, top_p, uniforms)
        freq = torch.bincount(tokens, minlength=11).float() / n
        sigma = (target * (1 - target) / n).sqrt()
        assert torch.all((freq - target).abs() <= 4.5 * sigma + 1e-9), (freq, target)


def test_top_p_keep_is_the_smallest_set_reaching_top_p():
    z = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    assert top_p_keep(z, 0.75).tolist() == [[True, False, True, False]]  # 0.5 + 0.3 >= 0.75
    assert top_p_keep(z, 0.5).tolist() == [[True, False, False, False]]


def test_noise_follows_the_row_not_its_place_in_the_batch():
    logits = _logits(4, 50, seed=4)
    for impl in ("triton", "torch"):
        tokens, _ = sample(logits, 1.0, 1.0, seed=9, noise_ids=torch.tensor([10, 11, 12, 13]), impl=impl)
        sub, _ = sample(logits[[3, 1]], 1.0, 1.0, seed=9, noise_ids=torch.tensor([13, 11]), impl=impl)
        assert torch.equal(sub, tokens[[3, 1]])


def test_sampling_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(1, 3), temperature=1.0, top_p=0.0)
