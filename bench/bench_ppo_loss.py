"""Microbenchmark: the PPO loss kernel (kernels/ppo_loss.py) against the PyTorch reference run
eagerly and under torch.compile, forward and forward+backward, with the KL (k3) and entropy terms
on. Liger-Kernel has no kernel for this per-token loss over given log-probs, so it has no row here.

    TRITON_INTERPRET=1 python -m pytest -q bench/bench_ppo_loss.py --benchmark-only   # CPU harness
    python -m pytest -q bench/bench_ppo_loss.py --benchmark-only                      # on a GPU

Bytes per token: forward reads logp, old, adv, ref, entropy (fp32) and the bool mask and writes
d(loss)/d(logp): 25; the backward reads that and the mask and writes two gradients: 13 more.
"""
from functools import partial

import pytest
import torch

from nanoufo.kernels.ppo_loss import ppo_loss

ON_GPU = torch.cuda.is_available()
SHAPES = [(16, 1024), (256, 4096), (512, 8192)] if ON_GPU else [(8, 256)]
IMPLS = ["nanoufo", "eager", "compile"]
OPTIONS = dict(kl_coef=0.001, kl_estimator="k3", entropy_coef=0.001)


def loss_fn(impl: str):
    if impl == "nanoufo":
        return partial(ppo_loss, impl="triton" if ON_GPU else "torch", **OPTIONS)
    reference = partial(ppo_loss, impl="torch", **OPTIONS)
    return reference if impl == "eager" else torch.compile(reference)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,t", SHAPES)
def test_ppo_loss(measure, device, b, t, impl, backward):
    fn = loss_fn(impl)
    logp = -torch.rand(b, t, device=device) * 3
    old, ref = logp + 0.1 * torch.randn_like(logp), logp + 0.1 * torch.randn_like(logp)
    adv, entropy = torch.randn_like(logp), torch.rand_like(logp)
    mask = torch.rand(b, t, device=device) > 0.2
    logp.requires_grad_(), entropy.requires_grad_()

    def step():
        loss, _ = fn(logp, old, adv, mask, ref_logp=ref, entropy=entropy)
        if backward:
            torch.autograd.grad(loss, (logp, entropy))

    measure(step, bytes_moved=b * t * (38 if backward else 25), b=b, t=t, impl=impl)
