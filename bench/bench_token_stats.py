"""Microbenchmark: fused token statistics from bf16 logits (kernels/token_stats.py) against PyTorch
eager, torch.compile and Liger-Kernel's cross entropy (which gives only the log-prob, as a mean
loss, and computes its gradient inside the forward), forward and forward+backward.

    TRITON_INTERPRET=1 python -m pytest -q bench/bench_token_stats.py --benchmark-only   # CPU harness
    python -m pytest -q bench/bench_token_stats.py --benchmark-only                      # on a GPU

Bytes counted: the logits read once (forward); + read again and the bf16 gradient written (backward).
"""
from functools import partial

import pytest
import torch

from nanoufo.kernels.token_stats import token_stats

ON_GPU = torch.cuda.is_available()
V_REAL = 151936  # Qwen2.5's vocabulary in the weights
SHAPES = [(n, V_REAL) for n in (1024, 4096, 16384)] if ON_GPU else [(64, 1000)]
IMPLS = ["nanoufo", "eager", "compile", "liger-ce"]


def eager_token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """What a trainer writes without a fused kernel: fp32 log_softmax over the whole (N, V)."""
    z = logits.float() / temperature  # (N, V) fp32 copy
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, torch.logsumexp(z, -1) - z.mean(-1)


def stats_fn(impl: str):
    """impl -> f(logits, targets) returning the tensors to differentiate."""
    if impl == "nanoufo":  # the Triton kernel on a GPU; the PyTorch reference on the CPU
        return partial(token_stats, impl="triton" if ON_GPU else "torch")
    if impl == "eager":
        return eager_token_stats
    if impl == "compile":
        return torch.compile(eager_token_stats)
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return lambda logits, targets: (LigerCrossEntropyLoss()(logits, targets),)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,v", SHAPES)
def test_token_stats(measure, device, n, v, impl, backward):
    fn = stats_fn(impl)
    logits = torch.randn(n, v, device=device, dtype=torch.bfloat16, requires_grad=backward)
    targets = torch.randint(0, v, (n,), device=device)

    def step():
        outs = fn(logits, targets)
        if backward:
            torch.autograd.grad(sum(o.sum() for o in outs), logits)

    measure(step, bytes_moved=n * v * 2 * (3 if backward else 1), n=n, v=v, impl=impl)
