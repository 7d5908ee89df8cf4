"""Attention of a few new query tokens over a KV cache, split over the cache length (flash-decoding).

Query token t of batch item b reads cache row cache_rows[b] and sees slots 0..position_ids[b, t] (its own
key is already in the cache). Pass 1 gives each (query token, KV head, split of the slots) one program:
it loads the query heads that share this KV head (GQA) and runs an online softmax over its split, writing
a partial output with its running max and sum. Pass 2 merges the splits of each (query token, head).
Splitting keeps the GPU busy when batch x KV heads is small and the context long.

    from nanoufo.kernels.decode_attention import decode_attention
    out = decode_attention(q, k_cache, v_cache, position_ids, cache_rows)  # (B, T, Hq, D)

Same result as nanoufo.model.attention's SDPA path with cache_rows. With a single split, pass 1 writes
the normalized output itself and pass 2 is skipped.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py
"""
import math

import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import pick_impl

SPLIT_LEN = 256  # cache slots per pass-1 program: a 4k context is 16 programs per (token, KV head), enough to
                 # fill a GPU at a small batch, and each still runs 4 steps of BLOCK_S to amortise its q load
BLOCK_S = 64  # slots per inner step: tl.dot wants >= 16; 64 keys x 128 dims of bf16 is a 16 KiB K (or V) tile
BLOCK_S_FP32 = 32  # fp32 caches: the same 16 KiB tiles (64 slots took 140 KiB of shared memory and 128 registers)


def block_s_of(dtype: torch.dtype) -> int:
    """Cache slots per inner step for caches of this dtype: tiles of 16 KiB at D = 128."""
    return BLOCK_S_FP32 if dtype == torch.float32 else BLOCK_S


def block_d_of(head_dim: int) -> int:
    """The head dimension a program holds: a power of two, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))


def split_parts(queries: int, heads: int, slots: int, split_len: int = SPLIT_LEN) -> int:
    """The partial results pass 1 writes: one per (query token, head, split), none with a single split."""
    n_splits = triton.cdiv(slots, split_len)
    return queries * heads * n_splits if n_splits > 1 else 0


def partial_bytes_per_query(heads: int, slots: int, head_dim: int) -> int:
    """fp32 bytes of one query token's partials over a cache of `slots` slots: each an output and (max, sum)."""
    return split_parts(1, heads, slots) * (block_d_of(head_dim) + 2) * 4


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               position_ids: torch.Tensor, cache_rows: torch.Tensor) -> torch.Tensor:
    """q (B, T, Hq, D); caches (B_cache, S, Hkv, D); position_ids (B, T); cache_rows (B,) -> (B, T, Hq, D)."""
    B, T, Hq, D = q.shape
    S = int(position_ids.max()) + 1  # slots past the furthest query are never visible
    group = Hq // k_cache.shape[2]
    k = k_cache[cache_rows, :S].float().repeat_interleave(group, dim=2)  # (B, S, Hq, D)
    v = v_cache[cache_rows, :S].float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k) / math.sqrt(D)  # (B, Hq, T, S)
    visible = torch.arange(S, device=q.device) <= position_ids[:, None, :, None]  # (B, 1, T, S)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v).to(q.dtype)  # (B, T, Hq, D)


@triton.jit
def _decode_attention_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, pos_ptr, part_out_ptr, part_stat_ptr,
                                   out_ptr, T, split_len, sm_scale,
                                   stride_qb, stride_qt, stride_qh,  # q (B, T, Hq, D), and out
                                   stride_cb, stride_cs, stride_ch,  # caches (B_cache, S, Hkv, D)
                                   stride_pb,  # position_ids (B, T)
                                   G: tl.constexpr, D: tl.constexpr, HQ: tl.constexpr, N_SPLITS: tl.constexpr,
                                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                                   IEEE: tl.constexpr):
    pid_q, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, t = pid_q // T, pid_q % T
    row = tl.load(rows_ptr + b).to(tl.int64)
    n_visible = tl.load(pos_ptr + b * stride_pb + t).to(tl.int64) + 1
    start = split.to(tl.int64) * split_len
    end = tl.minimum(start + split_len, n_visible)

    g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    heads = kv_head * G + g  # the query heads that read this KV head
    gd_mask = (g < G)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + t * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gd_mask, other=0.0)  # (BLOCK_G, BLOCK_D)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kv_base = row * stride_cb + kv_head * stride_ch
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < end
        kv_offs = kv_base + s[:, None] * stride_cs + d[None, :]
        kv_mask = s_mask[:, None] & (d < D)[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # (BLOCK_S, BLOCK_D)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_G, BLOCK_S)
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(s_mask[None, :], scores * sm_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: every step has a visible slot
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])  # (BLOCK_G, BLOCK_S)
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    if N_SPLITS == 1:
        dst = b.to(tl.int64) * stride_qb + t * stride_qt + heads[:, None] * stride_qh + d[None, :]
        tl.store(out_ptr + dst, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
        return
    # an empty split (past this token's position) stores m = -inf, l = 0, which pass 2 weighs by 0
    part = (pid_q.to(tl.int64) * HQ + heads) * N_SPLITS + split  # (BLOCK_G,)
    tl.store(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=(g < G)[:, None])  # padding too: 0
    tl.store(part_stat_ptr + part * 2, m, mask=g < G)
    tl.store(part_stat_ptr + part * 2 + 1, l, mask=g < G)


@triton.jit
def _decode_attention_merge_kernel(part_out_ptr, part_stat_ptr, out_ptr, T,
                                   stride_ob, stride_ot, stride_oh,  # out (B, T, Hq, D)
                                   D: tl.constexpr, HQ: tl.constexpr, N_SPLITS: tl.constexpr,
                                   BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q, head = tl.program_id(0), tl.program_id(1)
    b, t = pid_q // T, pid_q % T
    sp, d = tl.arange(0, BLOCK_SPLITS), tl.arange(0, BLOCK_D)
    part = (pid_q.to(tl.int64) * HQ + head) * N_SPLITS + sp  # (BLOCK_SPLITS,)
    m = tl.load(part_stat_ptr + part * 2, mask=sp < N_SPLITS, other=float("-inf"))
    l = tl.load(part_stat_ptr + part * 2 + 1, mask=sp < N_SPLITS, other=0.0)
    acc = tl.load(part_out_ptr + part[:, None] * BLOCK_D + d[None, :], mask=(sp < N_SPLITS)[:, None], other=0.0)
    m_all = tl.max(m, axis=0)  # finite: slot 0 is always visible, so split 0 is never empty
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # (BLOCK_SPLITS,)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)  # (BLOCK_D,)
    dst = b.to(tl.int64) * stride_ob + t * stride_ot + head * stride_oh + d
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=d < D)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            position_ids: torch.Tensor, cache_rows: torch.Tensor,
                            split_len: int = SPLIT_LEN, block_s: int | None = None) -> torch.Tensor:
    B, T, Hq, D = q.shape
    block_s = block_s or block_s_of(k_cache.dtype)
    Hkv = k_cache.shape[2]
    assert q.is_contiguous() and k_cache.stride(-1) == 1, "q contiguous (out shares its strides), caches by last dim"
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert k_cache.shape[3] == D and Hq % Hkv == 0, f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}"
    assert cache_rows.shape == (B,) and position_ids.shape == (B, T) and position_ids.stride(-1) == 1
    assert split_len % block_s == 0 and block_s >= 16, "split_len must be a multiple of block_s >= 16"
    out = torch.empty_like(q)  # (B, T, Hq, D)
    if out.numel() == 0:
        return out
    n_splits = triton.cdiv(k_cache.shape[1], split_len)
    BLOCK_D = block_d_of(D)
    G = Hq // Hkv
    n_parts = split_parts(B * T, Hq, k_cache.shape[1], split_len)  # one split writes out directly
    part_out = torch.empty(n_parts, BLOCK_D, device=q.device, dtype=torch.float32)
    part_stat = torch.empty(n_parts, 2, device=q.device, dtype=torch.float32)  # (max, sum)
    _decode_attention_split_kernel[(B * T, Hkv, n_splits)](
        q, k_cache, v_cache, cache_rows, position_ids, part_out, part_stat, out, T, split_len, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        position_ids.stride(0), G=G, D=D, HQ=Hq, N_SPLITS=n_splits, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_D=BLOCK_D, BLOCK_S=block_s, IEEE=q.dtype == torch.float32)
    if n_splits > 1:
        _decode_attention_merge_kernel[(B * T, Hq)](
            part_out, part_stat, out, T, out.stride(0), out.stride(1), out.stride(2), D=D, HQ=Hq,
            N_SPLITS=n_splits, BLOCK_SPLITS=triton.next_power_of_2(n_splits), BLOCK_D=BLOCK_D)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position_ids: torch.Tensor,
                     cache_rows: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """q (B, T, Hq, D) over caches (B_cache, S, Hkv, D) -> (B, T, Hq, D); see the module docstring."""
    if pick_impl(impl, q) == "triton":
        return decode_attention_triton(q.contiguous(), k_cache, v_cache, position_ids.contiguous(), cache_rows)
    return decode_attention_reference(q, k_cache, v_cache, position_ids, cache_rows)
