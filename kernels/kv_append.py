"""Append new keys and values to the KV cache: token t of batch item b goes to cache row cache_rows[b],
slot position_ids[b, t] (a token's position is its cache slot). One Triton program copies K and V, all
heads, of 16 tokens (a decode step's rows, or a prompt's tokens).

    from kernels.kv_append import kv_append
    kv_append(k_cache, v_cache, k, v, cache_rows, position_ids)  # in place

Triton on CUDA or under TRITON_INTERPRET=1 (kernels/dispatch.py), else the PyTorch reference
`kv_append_reference`.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py
"""
import torch
import triton
import triton.language as tl

from kernels.dispatch import pick_impl


def kv_append_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cache_rows: torch.Tensor, position_ids: torch.Tensor) -> None:
    """k_cache, v_cache (B_cache, S, Hkv, D); k, v (B, T, Hkv, D); cache_rows (B,); position_ids (B, T)."""
    k_cache[cache_rows[:, None], position_ids] = k.to(k_cache.dtype)
    v_cache[cache_rows[:, None], position_ids] = v.to(v_cache.dtype)


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, pos_ptr, N, T, S,
                      stride_nb, stride_nt, stride_nh,  # new k and v (B, T, Hkv, D)
                      stride_cb, stride_cs, stride_ch,  # caches (B_cache, S, Hkv, D)
                      stride_pb,  # position_ids (B, T)
                      HKV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # this program's tokens, flat b * T + t
    in_range = n < N
    b, t = n // T, n % T
    row = tl.load(rows_ptr + b, mask=in_range, other=0).to(tl.int64)
    slot = tl.load(pos_ptr + b * stride_pb + t, mask=in_range, other=S).to(tl.int64)  # (BLOCK_T,)
    offs = tl.arange(0, BLOCK)  # all heads of a token, flattened (Hkv * D)
    head, d = offs // D, offs % D
    mask = (slot < S)[:, None] & (offs < HKV * D)[None, :]  # a slot past the cache is never written
    src = b[:, None] * stride_nb + t[:, None] * stride_nt + (head * stride_nh + d)[None, :]
    dst = row[:, None] * stride_cb + slot[:, None] * stride_cs + (head * stride_ch + d)[None, :]
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src, mask=mask), mask=mask)


def kv_append_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cache_rows: torch.Tensor, position_ids: torch.Tensor) -> None:
    B, T, Hkv, D = k.shape
    assert v.shape == k.shape and v.stride() == k.stride() and k.stride(-1) == 1, "k, v: one layout, last dim dense"
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and k_cache.stride(-1) == 1
    assert k_cache.shape[2:] == (Hkv, D), f"cache heads {tuple(k_cache.shape[2:])} != new {(Hkv, D)}"
    assert cache_rows.shape == (B,) and position_ids.shape == (B, T) and position_ids.stride(-1) == 1
    if B * T == 0:
        return
    block_t = min(16, triton.next_power_of_2(B * T))
    _kv_append_kernel[(triton.cdiv(B * T, block_t),)](
        k, v, k_cache, v_cache, cache_rows, position_ids, B * T, T, k_cache.shape[1],
        k.stride(0), k.stride(1), k.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        position_ids.stride(0), HKV=Hkv, D=D, BLOCK_T=block_t, BLOCK=triton.next_power_of_2(Hkv * D))


def kv_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              cache_rows: torch.Tensor, position_ids: torch.Tensor, impl: str = "auto") -> None:
    """Write k, v (B, T, Hkv, D) into the caches (B_cache, S, Hkv, D) at rows cache_rows, slots position_ids."""
    if pick_impl(impl, k) == "triton":
        if v.stride() != k.stride() or k.stride(-1) != 1:  # the kernel reads k and v with one set of strides
            k, v = k.contiguous(), v.contiguous()
        kv_append_triton(k_cache, v_cache, k, v, cache_rows, position_ids.contiguous())
    else:
        kv_append_reference(k_cache, v_cache, k, v, cache_rows, position_ids)
