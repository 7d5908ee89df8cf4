"""Rotary embeddings applied inside the KV-cache append: from the merged q/k/v projection's output, one
Triton program per token rotates the query heads (written to q), rotates the key heads and writes them,
with the value heads, into the cache at row cache_rows[b], slot position_ids[b, t] (a token's position is
its cache slot). This replaces ~10 elementwise launches (rotating q and k) and the copy into the cache.

    from nanoufo.kernels.rope_kv_append import rope_kv_append
    q = rope_kv_append(qkv, cos, sin, k_cache, v_cache, cache_rows, position_ids, n_q_heads)  # (B, T, Hq, D)

qkv (B, T, (Hq + 2 Hkv) D) is [q heads | k heads | v heads]; cos, sin (B, T, 1, D) are
nanoufo.model.rotary_cos_sin's (whose two halves are equal, so only the first is read). A slot past the
cache is never written. The rotation is computed in fp32 and rounded once, where `apply_rotary` rounds
each product to the dtype: equal in fp32 up to rounding, within an ulp in bf16.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py
"""
import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import pick_impl


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated by cos, sin (B, T, 1, D): Qwen2's rotate-half RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def split_qkv(qkv: torch.Tensor, n_q_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """[q | k | v] (B, T, (Hq + 2 Hkv) D) -> q (B, T, Hq, D), k, v (B, T, Hkv, D), views."""
    heads = qkv.unflatten(-1, (-1, head_dim))  # (B, T, Hq + 2 Hkv, D)
    n_kv_heads = (heads.shape[2] - n_q_heads) // 2
    return heads.split([n_q_heads, n_kv_heads, n_kv_heads], dim=2)


def rope_kv_append_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, cache_rows: torch.Tensor, position_ids: torch.Tensor,
                             n_q_heads: int) -> torch.Tensor:
    """caches (B_cache, S, Hkv, D); cache_rows (B,); position_ids (B, T) -> rotated q (B, T, Hq, D)."""
    q, k, v = split_qkv(qkv, n_q_heads, k_cache.shape[-1])
    k_cache[cache_rows[:, None], position_ids] = apply_rotary(k, cos, sin).to(k_cache.dtype)
    v_cache[cache_rows[:, None], position_ids] = v.to(v_cache.dtype)
    return apply_rotary(q, cos, sin)


@triton.jit
def _rotate_store(src_ptr, dst_ptr, dst_head_stride, c, s, mask, heads, i, HALF: tl.constexpr):
    """Rotate heads (BLOCK_H, HALF) of one token at src (heads of D = 2 HALF, dense) into dst."""
    src = heads[:, None] * (2 * HALF) + i[None, :]
    x1 = tl.load(src_ptr + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = heads[:, None] * dst_head_stride + i[None, :]
    ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + dst, (x1 * c[None, :] - x2 * s[None, :]).to(ty), mask=mask)
    tl.store(dst_ptr + dst + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(ty), mask=mask)


@triton.jit
def _rope_kv_append_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, pos_ptr, T, S,
                           stride_qkv, stride_cs,  # qkv's token stride; cos and sin's token stride
                           stride_cb, stride_cslot, stride_ch,  # caches (B_cache, S, Hkv, D)
                           stride_pb,  # position_ids (B, T)
                           HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                           BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # the token, flat b * T + t
    b, t = n // T, n % T
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(cos_ptr + n * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + n * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)
    src = qkv_ptr + n * stride_qkv
    hq = tl.arange(0, BLOCK_HQ)
    _rotate_store(src, q_ptr + n * HQ * 2 * HALF, 2 * HALF, c, s, (hq < HQ)[:, None] & (i < HALF)[None, :],
                  hq, i, HALF)
    row = tl.load(rows_ptr + b).to(tl.int64)
    slot = tl.load(pos_ptr + b * stride_pb + t).to(tl.int64)
    hk = tl.arange(0, BLOCK_HKV)
    in_cache = tl.full([BLOCK_HKV, 1], 0, tl.int64) + slot < S  # a slot past the cache is never written
    mask = in_cache & (hk < HKV)[:, None] & (i < HALF)[None, :]
    dst = row * stride_cb + slot * stride_cslot
    _rotate_store(src + HQ * 2 * HALF, k_cache_ptr + dst, stride_ch, c, s, mask, hk, i, HALF)
    d = tl.arange(0, 2 * BLOCK_HALF)
    v_mask = in_cache & (hk < HKV)[:, None] & (d < 2 * HALF)[None, :]
    v = tl.load(src + (HQ + HKV) * 2 * HALF + hk[:, None] * 2 * HALF + d[None, :], mask=v_mask)
    tl.store(v_cache_ptr + dst + hk[:, None] * stride_ch + d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rope_kv_append_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, cache_rows: torch.Tensor, position_ids: torch.Tensor,
                          n_q_heads: int) -> torch.Tensor:
    B, T, width = qkv.shape
    _, S, Hkv, D = k_cache.shape
    assert width == (n_q_heads + 2 * Hkv) * D and D % 2 == 0, f"qkv width {width} != ({n_q_heads} + 2 * {Hkv}) * {D}"
    assert qkv.stride(-1) == 1 and qkv.stride(0) == T * qkv.stride(1), "qkv: tokens at one stride, features dense"
    assert cos.shape == sin.shape == (B, T, 1, D) and cos.is_contiguous() and sin.is_contiguous()
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and k_cache.stride(-1) == 1
    assert cache_rows.shape == (B,) and position_ids.shape == (B, T) and position_ids.stride(-1) == 1
    q = qkv.new_empty(B, T, n_q_heads, D)
    if B * T:
        _rope_kv_append_kernel[(B * T,)](
            qkv, cos, sin, q, k_cache, v_cache, cache_rows, position_ids, T, S, qkv.stride(1), D,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), position_ids.stride(0),
            HQ=n_q_heads, HKV=Hkv, HALF=D // 2, BLOCK_HQ=triton.next_power_of_2(n_q_heads),
            BLOCK_HKV=triton.next_power_of_2(Hkv), BLOCK_HALF=triton.next_power_of_2(D // 2))
    return q


def rope_kv_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, cache_rows: torch.Tensor, position_ids: torch.Tensor, n_q_heads: int,
                   impl: str = "auto") -> torch.Tensor:
    """Rotate q and k of qkv, write k and v into the caches; returns q (B, T, Hq, D). See the module docstring."""
    if pick_impl(impl, qkv) == "triton":
        return rope_kv_append_triton(qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache, cache_rows,
                                     position_ids.contiguous(), n_q_heads)
    return rope_kv_append_reference(qkv, cos, sin, k_cache, v_cache, cache_rows, position_ids, n_q_heads)
