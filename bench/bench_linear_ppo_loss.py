"""Microbenchmark: the LM head fused with the PPO loss (kernels/linear_ppo_loss.py), forward + backward,
against its three GEMMs alone (logits, grad_hidden, grad_weight: 6*N*H*V FLOPs), the unfused eager path
(bf16 logits, fp32 statistics, PyTorch PPO loss), torch.compile of it, and Liger-Kernel's fused linear GRPO
loss (loss_type "dapo": the token-mean over the whole batch, the same maths as the weights mask / n_tokens
used here; `python bench/bench_linear_ppo_loss.py` compares the two in float64 on the CPU).

    TRITON_INTERPRET=1 python -m pytest -q bench/bench_linear_ppo_loss.py --benchmark-only   # CPU harness
    python -m pytest -q bench/bench_linear_ppo_loss.py --benchmark-only                      # GPU

Options for every path: clip 0.2 / 0.28, no dual clip, k3 KL to a reference (coefficient 0.04), no entropy
bonus (Liger's GRPO has none). TFLOP/s counts 6*N*H*V for every row.
"""
import pytest
import torch

from bench_token_stats import ON_GPU, V_REAL
from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss, linear_ppo_loss_reference

SHAPES = [(n, h, V_REAL) for h in (2048, 3584) for n in (1024, 4096, 16384)] if ON_GPU else [(32, 64, 500)]
IMPLS = ["nanoufo", "gemm-only", "eager", "compile", "liger-grpo"]
PPO = dict(clip_low=0.2, clip_high=0.28, dual_clip=None, kl_coef=0.04, kl_estimator="k3")
SEQ = 16  # tokens per sequence, for Liger's (B, T) layout


def gemm_only(hidden, weight):
    """The three GEMMs of the fused path, with the logits standing in for their gradient."""
    dz = hidden @ weight.T  # (N, V)
    return dz @ weight, dz.T @ hidden  # grad_hidden (N, H), grad_weight (V, H)


def liger_grpo(hidden, weight, targets, old, adv, mask, ref):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    loss = LigerFusedLinearGRPOLoss(beta=PPO["kl_coef"], epsilon_low=PPO["clip_low"], epsilon_high=PPO["clip_high"],
                                    loss_type="dapo", compiled=ON_GPU)
    rows = hidden.shape[0] // SEQ
    seq = lambda x: x.view(rows, SEQ, *x.shape[1:])
    return lambda: loss(seq(hidden), weight, seq(targets), seq(mask.float()), seq(adv)[:, 0],
                        ref_per_token_logps=seq(ref), old_per_token_logps=seq(old))[0]


def step_fn(impl: str, hidden, weight, targets, old, adv, mask, ref):
    weights = mask.float() / mask.sum()
    args = (hidden, weight, targets, old, adv, mask, weights)
    if impl == "gemm-only":
        return lambda: gemm_only(hidden, weight)
    if impl == "nanoufo":
        kw = dict(impl="triton") if ON_GPU else dict(impl="torch", chunk_rows=8)  # several chunks on the CPU
        forward = lambda: linear_ppo_loss(*args, ref_logp=ref, **PPO, **kw)[0]
    elif impl == "eager":
        forward = lambda: linear_ppo_loss_reference(*args, ref_logp=ref, **PPO)[0]
    elif impl == "compile":
        compiled = torch.compile(linear_ppo_loss_reference)
        forward = lambda: compiled(*args, ref_logp=ref, **PPO)[0]
    else:
        forward = liger_grpo(hidden, weight, targets, old, adv, mask, ref)
    return lambda: torch.autograd.grad(forward(), (hidden, weight))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_linear_ppo_loss_fwd_bwd(measure, device, n, h, v, impl):
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=gen) / h**0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    old = -5 + torch.randn(n, device=device, generator=gen)  # log-probs near those of random logits
    ref = old + 0.1 * torch.randn(n, device=device, generator=gen)
    adv = torch.randn(n // SEQ, device=device, generator=gen).repeat_interleave(SEQ)  # one per sequence
    mask = torch.rand(n, device=device, generator=gen) > 0.2
    step = step_fn(impl, hidden, weight, targets, old, adv, mask, ref)
    measure(step, flops=6 * n * h * v, n=n, h=h, v=v, impl=impl)


def liger_agreement(b: int = 2, t: int = 8, h: int = 16, v: int = 50) -> dict:
    """Float64 on the CPU: Liger's fused linear GRPO loss (dapo) against linear_ppo_loss with weights
    mask / n_tokens: |loss difference| and the largest gradient differences."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(b * t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / 4
    targets = torch.randint(0, v, (b * t,), generator=gen)
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    old = logp + 0.3 * torch.randn(b * t, generator=gen, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(b * t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b * t, generator=gen) > 0.2
    adv = torch.randn(b, generator=gen, dtype=torch.float64).repeat_interleave(t)
    grads = []
    for impl in ("liger", "nanoufo"):
        hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if impl == "liger":
            loss = LigerFusedLinearGRPOLoss(beta=PPO["kl_coef"], epsilon_low=PPO["clip_low"],
                                            epsilon_high=PPO["clip_high"], loss_type="dapo", compiled=False)(
                hid.view(b, t, h), w, targets.view(b, t), mask.view(b, t).double(), adv.view(b, t)[:, 0],
                ref_per_token_logps=ref.view(b, t), old_per_token_logps=old.view(b, t))[0]
        else:
            loss = linear_ppo_loss(hid, w, targets, old, adv, mask, mask.double() / mask.sum(), ref_logp=ref,
                                   impl="torch", **PPO)[0]
        loss.backward()
        grads.append((loss.detach(), hid.grad, w.grad))
    (l0, h0, w0), (l1, h1, w1) = grads
    return dict(liger_loss=l0.item(), nanoufo_loss=l1.item(), grad_hidden_max_diff=(h0 - h1).abs().max().item(),
                grad_weight_max_diff=(w0 - w1).abs().max().item())


if __name__ == "__main__":  # python bench/bench_linear_ppo_loss.py (with liger-kernel importable)
    print(liger_agreement())
