"""a @ b with an fp32 result, and out += a @ b into an fp32 out, for the fused LM heads' GEMMs: their logits
and the gradients they accumulate over chunks (the head's weight gradient over row chunks in
kernels/linear_ppo_loss.py, the hidden gradient over vocabulary chunks in kernels/linear_token_stats.py).

    from nanoufo.kernels.mm_acc import mm_acc
    logits = mm_acc(hidden, weight.T)            # (N, V) fp32 from bf16 operands, no fp32 copy of the weight
    grad_weight = mm_acc(dz.T, hidden, out=grad_weight)   # (V, H) fp32 += (V, R) @ (R, H), in place

With 16-bit operands on CUDA a fresh product is cuBLAS's (torch.mm with out_dtype=float32: bf16 x bf16
accumulated in fp32), and an accumulation is the Triton kernel below: each program computes a tile of the
product with fp32 accumulators (tl.dot), reads that tile of out once, adds and writes it back. So the bytes an
accumulation moves are the GEMM's own, the operands and the accumulator read and written once (the SM's
re-reads of operand tiles aside, as for any GEMM), where adding a separate fp32 product moved the
accumulator's size twice more (writing the product and reading it back): nearly twice the GEMM's own bytes
for the (75,968 x 2,048) weight gradient of Qwen2.5-3B at TP=2 (bench/kernel_counts.py --bytes; bench/RESULTS.md,
"Fused LM head + loss"). cuBLAS
could add into out itself, but the addmm of the supported torch releases (2.9 on) rejects an fp32 out with
bf16 operands (pytorch/pytorch#154086). Tiles: 128 x 128 of out, steps of 64 over the shared dimension, and
programs ordered in groups of 8 tile rows so that a row of a's tiles is read from L2 by every column of tiles.
Elsewhere (the CPU) the operands are upcast and multiplied in fp32, an accumulation one addmm_; fp32 operands
use that path on CUDA too (cuBLAS adds into an fp32 out in place). impl="auto" picks the kernel on CUDA only,
not under TRITON_INTERPRET=1: the interpreter's tl.dot of bf16 is wrong (triton-lang/triton#11584) and the
fused heads' tests run bf16 there, so they check the reference; the kernel's own tests name impl="triton" at
fp16 and fp32 (bf16 on a GPU: NANOUFO_TEST_DEVICE=cuda).
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_linear.py -k mm_acc
"""
import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import IMPLS, acc_dtype

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64  # a 128 x 128 fp32 accumulator over 8 warps: 64 registers a thread
GROUP_M = 8  # tile rows per group of programs: 8 x 16 tiles (H = 2048) is about one wave of an H100's 132 SMs
NUM_WARPS, NUM_STAGES = 8, 3  # 3 stages of 128 x 64 and 64 x 128 16-bit tiles: 96 KiB of shared memory


def mm_acc_reference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in fp32 (fp64 for fp64 operands), upcast first; added into out when given."""
    acc = acc_dtype(a.dtype)
    a, b = a.to(acc), b.to(acc)
    return a @ b if out is None else out.addmm_(a, b)


@triton.jit
def _mm_acc_kernel(a_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)  # the last group may hold fewer tile rows
    tile_m = first_m + (pid % per_group) % group_m
    tile_n = (pid % per_group) // group_m
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :].to(tl.int64) * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptrs, tl.load(out_ptrs, mask=inside) + acc, mask=inside)


def mm_acc_triton(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, block_m: int = BLOCK_M,
                  block_n: int = BLOCK_N, block_k: int = BLOCK_K, group_m: int = GROUP_M) -> torch.Tensor:
    """out (M, N) fp32 += a (M, K) @ b (K, N), any strides; returns out."""
    M, K = a.shape
    N = b.shape[1]
    assert b.shape[0] == K and out.shape == (M, N), f"{tuple(a.shape)} @ {tuple(b.shape)} into {tuple(out.shape)}"
    assert a.dtype == b.dtype and out.dtype == torch.float32, "16-bit or fp32 operands, an fp32 out"
    assert min(block_m, block_n, block_k) >= 16, "tl.dot needs tiles of at least 16"
    if M and N and K:
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _mm_acc_kernel[grid](a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
                             out.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                             num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


def mm_acc(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """a (M, K) @ b (K, N) with a float32 result (float64 for float64 operands), added into out (M, N) when given
    (and out returned). impl: "auto" (see the module docstring), "triton" (the kernel, which always adds: a
    fresh product starts from zeros) or "torch" (the reference)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton":
        return mm_acc_triton(a, b, torch.zeros(a.shape[0], b.shape[1], device=a.device) if out is None else out)
    on_gpu = a.device.type in ("cuda", "meta")  # meta: the compile check and the shape tests run the GPU branch
    if impl == "torch" or not on_gpu or a.dtype == acc_dtype(a.dtype):
        return mm_acc_reference(a, b, out)
    return torch.mm(a, b, out_dtype=torch.float32) if out is None else mm_acc_triton(a, b, out)
