"""Microbenchmark: token statistics fused with the LM head (kernels/linear_token_stats.py), forward
+ backward, against eager PyTorch (bf16 logits, then fp32 log_softmax), torch.compile of it,
Liger-Kernel's fused linear cross entropy (log-prob only) and the bare matrix products the fused
path needs (logits, their recomputation, grad_hidden, grad_weight: 8*N*H*V FLOPs).

    TRITON_INTERPRET=1 python -m pytest -q bench/bench_linear_token_stats.py --benchmark-only   # CPU
    python -m pytest -q bench/bench_linear_token_stats.py --benchmark-only                      # GPU

TFLOP/s counts what each path executes: 8*N*H*V with recomputation (nanoufo, gemm-only),
6*N*H*V without (eager, compile, liger).
"""
import pytest
import torch

from bench_token_stats import ON_GPU, V_REAL, eager_token_stats
from nanoufo.kernels.linear_token_stats import linear_token_stats

SHAPES = [(n, h, V_REAL) for h in (2048, 3584) for n in (1024, 4096, 16384)] if ON_GPU else [(32, 64, 500)]
IMPLS = ["nanoufo", "gemm-only", "eager", "compile", "liger-flce"]
CPU_CHUNK = 128  # several chunks at the CPU shape


def eager_linear(hidden, weight, targets):
    return eager_token_stats(hidden @ weight.T, targets)


def gemm_only(hidden, weight, targets):
    """The four matmuls of the fused forward+backward, with a stand-in logits gradient."""
    hidden @ weight.T  # the forward logits (N, V): timed for their cost, not used
    dz = hidden @ weight.T  # backward recomputation, reused as the logits gradient
    return dz @ weight, dz.T @ hidden  # grad_hidden (N, H), grad_weight (V, H)


def step_fn(impl: str, hidden, weight, targets):
    if impl == "gemm-only":
        return lambda: gemm_only(hidden, weight, targets)
    if impl == "nanoufo":
        kw = dict(impl="triton") if ON_GPU else dict(impl="torch", chunk_size=CPU_CHUNK)
        forward = lambda: linear_token_stats(hidden, weight, targets, **kw)
    elif impl == "eager":
        forward = lambda: eager_linear(hidden, weight, targets)
    elif impl == "compile":
        compiled = torch.compile(eager_linear)
        forward = lambda: compiled(hidden, weight, targets)
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss()
        forward = lambda: (loss(weight, hidden, targets),)
    return lambda: torch.autograd.grad(sum(o.sum() for o in forward()), (hidden, weight))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_linear_token_stats_fwd_bwd(measure, device, n, h, v, impl):
    dtype = torch.bfloat16
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    flops = (8 if impl in ("nanoufo", "gemm-only") else 6) * n * h * v
    measure(step_fn(impl, hidden, weight, targets), flops=flops, n=n, h=h, v=v, impl=impl)
