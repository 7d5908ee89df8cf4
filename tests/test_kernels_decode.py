"""The decode kernels (RoPE + KV append, fused add + RMSNorm, SiLU-multiply, flash-decoding attention,
sampling) against their PyTorch references; the sampling kernel's own token frequencies against the exact
top-p distribution on both sides of a boundary, and the independence of its noise streams; the CPU path's
two-level inverse CDF against a whole float64 running sum;
the bf16 decode attention only where the kernels are compiled (tests/kernel_device.py).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py               # CPU
    NANOUFO_TEST_DEVICE=cuda python -m pytest -q tests/test_kernels_decode.py         # GPU, bf16 too
"""
import pytest
import torch
import triton
import triton.language as tl

from kernel_device import DEVICE, gpu_only, needs_triton
from nanoufo.kernels.decode_attention import SPLIT_LEN, decode_attention_reference, decode_attention_triton
from nanoufo.kernels.rms_norm import add_rms_norm_reference, add_rms_norm_triton
from nanoufo.kernels.rope_kv_append import rope_kv_append_reference, rope_kv_append_triton
from nanoufo.kernels.silu_mul import silu_mul_reference, silu_mul_triton
from nanoufo.model import attention, rotary_cos_sin
from nanoufo.kernels.sampling import (inverse_cdf, row_uniforms, sample, sample_inverse_cdf, sample_reference,
                                      sample_triton, top_p_keep)

pytestmark = needs_triton
# fp32: IEEE dots, exact to rounding. bf16 (against the fp32 reference on the same bf16 inputs): the kernel
# rounds each softmax weight to bf16 before the PV dot (relative 2^-9, so up to 2^-9 * max|v| ~ 8e-3 for
# randn values) and its output to bf16 (half an ulp, relative 2^-9).
ATTN_TOL = {torch.float32: dict(atol=1e-5, rtol=0.0), torch.bfloat16: dict(atol=1e-2, rtol=4e-3)}


@pytest.mark.parametrize("Hq,Hkv,D", [(6, 3, 12), (4, 1, 16)], ids=["odd_heads_d12", "one_kv_head"])
def test_rope_kv_append_matches_reference(Hq, Hkv, D):
    g = torch.Generator().manual_seed(0)
    B_cache, S, B, T = 5, 23, 3, 18  # odd head count and head dim: masked lanes
    caches = [torch.randn(B_cache, S, Hkv, D, generator=g).to(DEVICE) for _ in range(2)]
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(DEVICE)
    rows = torch.tensor([3, 0, 4], device=DEVICE)
    pos = torch.stack([torch.arange(18), torch.arange(2, 20), torch.arange(6, 24)]).to(DEVICE)  # slot 23: past S
    cos, sin = rotary_cos_sin(pos, D, 1e4, torch.float32)
    q_ref = rope_kv_append_reference(qkv, cos, sin, *[c.clone() for c in caches], rows, pos.clamp(max=S - 1), Hq)
    ref = [c.clone() for c in caches]
    rope_kv_append_reference(qkv[:2], cos[:2], sin[:2], *ref, rows[:2], pos[:2], Hq)
    rope_kv_append_reference(qkv[2:, :-1], cos[2:, :-1], sin[2:, :-1], *ref, rows[2:], pos[2:, :-1], Hq)  # not slot 23
    q = rope_kv_append_triton(qkv, cos, sin, *caches, rows, pos, Hq)
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[0], ref[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(caches[1], ref[1])  # values are copied, not computed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_add", [True, False], ids=["add", "plain"])
def test_add_rms_norm_matches_reference(dtype, with_add):
    g = torch.Generator().manual_seed(2)
    x, add = (torch.randn(2, 3, 40, generator=g) * 3).to(DEVICE, dtype)  # H = 40: masked lanes
    weight = (1 + torch.randn(40, generator=g) / 4).to(DEVICE, dtype)
    add = add if with_add else None
    normed, residual = add_rms_norm_triton(x, weight, 1e-6, add)
    ref_normed, ref_residual = add_rms_norm_reference(x, weight, 1e-6, add)
    # bf16: an ulp per rounding (the interpreter's fp32 -> bf16 cast truncates where the GPU rounds to nearest)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(residual, ref_residual, **tol)
    torch.testing.assert_close(normed, ref_normed, **tol)
    if not with_add:  # the model's own RMSNorm is the reference
        from nanoufo.model import RMSNorm
        norm = RMSNorm(40, 1e-6).to(DEVICE, dtype)
        norm.weight.data.copy_(weight)
        torch.testing.assert_close(normed, norm(x), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_matches_reference(dtype):
    gate_up = (torch.randn(3, 2, 2 * 37, generator=torch.Generator().manual_seed(3)) * 4).to(DEVICE, dtype)
    out = silu_mul_triton(gate_up, block=16)  # I = 37: three blocks, the last one masked
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)  # 2 roundings
    torch.testing.assert_close(out, silu_mul_reference(gate_up), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=gpu_only)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Hq,Hkv,D,T", [(4, 2, 16, 1), (6, 2, 24, 1), (2, 2, 8, 2), (12, 2, 128, 1)],
                         ids=["gqa2", "gqa3_d24", "mha_t2", "qwen1.5b"])
def test_decode_attention_matches_reference(Hq, Hkv, D, T, dtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    B_cache, S = 4, 70
    k_cache, v_cache = torch.randn(2, B_cache, S, Hkv, D, generator=g).to(DEVICE, dtype)
    q = torch.randn(3, T, Hq, D, generator=g).to(DEVICE, dtype)
    rows = torch.tensor([2, 0, 3], device=DEVICE)
    last = torch.tensor([0, 33, 69 - T], device=DEVICE)  # a one-slot row, a mid-split row, the full cache
    pos = last[:, None] + torch.arange(T, device=DEVICE)  # (B, T): T new tokens per row
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), pos, rows)  # fp32
    if dtype == torch.float32:  # the model's own SDPA path, which the kernel replaces for decode (on the CPU)
        with monkeypatch.context() as m:
            m.setenv("TRITON_INTERPRET", "0")
            cpu = [x.cpu() for x in (q, k_cache, v_cache, pos, rows)]
            assert (attention(*cpu) - ref.cpu()).abs().max() < 1e-5
    # five splits (some empty for short rows), one split, and the model's default blocks
    for split_len, block_s in ((16, 16), (256, 16), (SPLIT_LEN, None)):
        out = decode_attention_triton(q, k_cache, v_cache, pos, rows, split_len=split_len, block_s=block_s)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, **ATTN_TOL[dtype])


@triton.jit
def _philox_uniforms_kernel(noise_ids_ptr, out_ptr, numel, V, seed, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat (N * V) index
    mask = idx < numel
    noise_id = tl.load(noise_ids_ptr + idx // V, mask=mask, other=0)
    tl.store(out_ptr + idx, tl.rand(seed, noise_id * V + idx % V), mask=mask)


def philox_uniforms(seed: int, noise_ids: torch.Tensor, V: int, block: int = 4096) -> torch.Tensor:
    """(N, V): exactly the uniforms the sampling kernel draws for these rows (kernels/sampling.py's
    tl.rand(seed, noise_id * V + token)), so that sample_reference replays a kernel draw."""
    out = torch.empty(noise_ids.shape[0], V, device=noise_ids.device, dtype=torch.float32)
    _philox_uniforms_kernel[(triton.cdiv(out.numel(), block),)](noise_ids.to(torch.int64), out, out.numel(), V,
                                                               seed & (2**63 - 1), BLOCK=block)
    return out


def _logits(n: int, v: int, seed: int) -> torch.Tensor:
    return (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.8)])
def test_sampling_kernel_replays_reference_exactly(temperature, top_p):
    """Same uniforms, same token; log-probs of the tempered, untruncated softmax."""
    logits = _logits(4, 300, seed=2)
    noise_ids = torch.tensor([7, 0, 3, 12], device=DEVICE)
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
    kernel's Gumbel-max on its Philox uniforms and for the CPU path's inverse CDF on one uniform per row."""
    temperature, top_p, n = 0.8, 0.85, 4000
    logits = _logits(1, 11, seed=3).expand(n, 11)
    z = logits[0] / temperature
    target = torch.softmax(z, -1) * top_p_keep(z[None], top_p)[0]
    target = target / target.sum()
    ids = torch.arange(n, device=DEVICE)
    for tokens, _ in (sample_reference(logits, temperature, top_p, philox_uniforms(11, ids, 11)),
                      sample_inverse_cdf(logits, temperature, top_p, row_uniforms(11, ids, DEVICE))):
        freq = torch.bincount(tokens, minlength=11).float() / n
        sigma = (target * (1 - target) / n).sqrt()
        assert torch.all((freq - target).abs() <= 4.5 * sigma + 1e-9), (freq, target)


# Four tokens hold the mass (0.4, 0.3, 0.2, 0.1), the other 4 almost none (e^-1e4): sorted, the masses before
# them are 0, 0.4, 0.7, 0.9. top_p 0.69: the 0.3 token crosses p, the nucleus is (0.4, 0.3) -> (4/7, 3/7);
# top_p 0.71: the 0.2 token crosses it, the nucleus is (0.4, 0.3, 0.2) -> (4/9, 3/9, 2/9).
NUCLEUS_TOKENS = [5, 2, 7, 0]  # in decreasing probability, spread over the row
NUCLEUS = {0.69: [4 / 7, 3 / 7, 0.0, 0.0], 0.71: [4 / 9, 3 / 9, 2 / 9, 0.0]}


@pytest.mark.parametrize("top_p", sorted(NUCLEUS))
def test_the_kernel_keeps_the_token_that_crosses_top_p_at_its_exact_frequency(top_p):
    """Counted from the kernel's own draws (not the reference's), either side of the boundary at 0.7."""
    n, V, temperature = 150, 8, 0.7
    z = torch.full((V,), -1e4, dtype=torch.float64)
    z[NUCLEUS_TOKENS] = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    logits = (z * temperature).float().to(DEVICE).expand(n, V).contiguous()  # z = logits / temperature
    tokens, _ = sample_triton(logits, temperature, top_p, seed=21, noise_ids=torch.arange(n, device=DEVICE) + 2**20)
    freq = torch.bincount(tokens.cpu(), minlength=V)[NUCLEUS_TOKENS].double() / n
    target = torch.tensor(NUCLEUS[top_p], dtype=torch.float64)
    sigma = (target * (1 - target) / n).sqrt()
    assert torch.all((freq - target).abs() <= 4.5 * sigma + 1e-9), (freq, target)
    assert int(torch.isin(tokens.cpu(), torch.tensor(NUCLEUS_TOKENS)).sum()) == n  # never a token outside


def test_distinct_noise_ids_draw_independent_tokens():
    """Uniform logits: each row's token is its noise's argmax, so it is uniform over the V tokens and rows of
    consecutive ids are independent: a token repeats, or shifts by one, in about 1/V of the pairs (noise
    streams that overlap, one id's uniforms the next one's shifted by a token, shift it almost always)."""
    n, V = 200, 8
    ids = torch.arange(n, device=DEVICE) + 3 * 2**20
    tokens, _ = sample_triton(torch.zeros(n, V, device=DEVICE), 1.0, 1.0, seed=4, noise_ids=ids)
    tokens = tokens.cpu()
    again, _ = sample_triton(torch.zeros(2, V, device=DEVICE), 1.0, 1.0, seed=4, noise_ids=ids[[7, 3]])
    assert again.tolist() == tokens[[7, 3]].tolist()  # one id, one draw
    counts = torch.bincount(tokens, minlength=V).double()
    assert torch.all((counts - n / V).abs() <= 4.5 * (n / V * (1 - 1 / V)) ** 0.5), counts
    pairs, p = n - 1, 1 / V
    for shift in (0, 1, -1):
        same = int(((tokens[1:] - tokens[:-1] - shift) % V == 0).sum())
        assert abs(same - pairs * p) <= 4.5 * (pairs * p * (1 - p)) ** 0.5, (shift, same)


def whole_running_sum_draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The definition inverse_cdf computes in two levels: the first column whose float64 running sum over the
    whole row exceeds uniform x the row's total."""
    ends = weights.double().cumsum(-1)  # (N, V)
    return torch.searchsorted(ends, (uniforms.double() * ends[:, -1])[:, None], right=True)[:, 0]


@pytest.mark.parametrize("V,block", [(3000, 64), (1024, 64), (50, 64), (151936, 1024)])
def test_inverse_cdf_equals_the_whole_running_sum(V, block):
    """Rows with a quarter of their weights 0 (as top-p leaves them) and uniforms at both ends of [0, 1): the
    same column as one float64 running sum over the row, never a column of weight 0, with the row's end
    past a whole number of blocks or not."""
    g = torch.Generator().manual_seed(V)
    weights = torch.exp(torch.randn(64, V, generator=g) * 3) * (torch.rand(64, V, generator=g) > 0.25)
    uniforms = torch.cat([torch.rand(60, generator=g), torch.tensor([0.0, 1e-9, 1 - 2**-24, 1 - 2**-23])])
    tokens = inverse_cdf(weights, uniforms, block)
    assert torch.equal(tokens, whole_running_sum_draw(weights, uniforms))
    assert bool((weights.gather(1, tokens[:, None]) > 0).all())


def test_inverse_cdf_past_the_running_sum_takes_the_last_column_with_weight():
    """Where the target reaches the block's running sum (a uniform of 1 here; in use, the rounding between the
    block sums and the running sum inside the block), the last column with weight of the row, never one past
    its end. Whole-number weights: both levels' sums exact, so the target meets the sum exactly."""
    weights = torch.tensor([[0.0, 3, 1, 0, 2] * 9 + [1, 0, 0, 2, 1], [2.0, 0, 1, 3, 0] * 10])  # V = 50: one block
    tokens = inverse_cdf(weights, torch.ones(2), block=64)
    assert tokens.tolist() == [49, 48]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 1.0), (0.7, 0.8)])
def test_cpu_sampling_draws_by_the_inverse_cdf_with_exact_logprobs(temperature, top_p):
    """sample's CPU path: the token of the tempered (top-p renormalised) distribution's inverse CDF at the
    row's uniform; log-probs of the tempered, untruncated softmax (float64) at the vocabulary's size; greedy
    at temperature 0."""
    logits, ids = _logits(8, 151936, seed=6), torch.arange(8) + 40
    tokens, logprobs = sample(logits, temperature, top_p, seed=13, noise_ids=ids, impl="torch")
    z = logits.double() / (temperature or 1.0)
    want = z.argmax(-1) if temperature == 0 else whole_running_sum_draw(
        torch.softmax(z, -1) * top_p_keep(z, top_p), row_uniforms(13, ids, DEVICE))
    assert torch.equal(tokens, want)
    assert (logprobs.double() - torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0]).abs().max() < 1e-5
    assert sample(logits[:0], temperature, top_p, seed=13, noise_ids=ids[:0], impl="torch")[0].shape == (0,)


def test_top_p_keep_is_the_smallest_set_reaching_top_p():
    z = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    assert top_p_keep(z, 0.75).tolist() == [[True, False, True, False]]  # 0.5 + 0.3 >= 0.75
    assert top_p_keep(z, 0.5).tolist() == [[True, False, False, False]]


def test_noise_follows_the_row_not_its_place_in_the_batch():
    logits = _logits(4, 50, seed=4)
    for impl in ("triton", "torch"):
        tokens, _ = sample(logits, 1.0, 1.0, seed=9, noise_ids=torch.tensor([10, 11, 12, 13], device=DEVICE),
                           impl=impl)
        sub, _ = sample(logits[[3, 1]], 1.0, 1.0, seed=9, noise_ids=torch.tensor([13, 11], device=DEVICE), impl=impl)
        assert torch.equal(sub, tokens[[3, 1]])


def test_sampling_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(1, 3), temperature=1.0, top_p=0.0)
