"""Fused token statistics from logits (kernels/token_stats.py): the Triton kernel and the PyTorch
reference against each other and against an independent float64 oracle (log_softmax + autograd),
forward and backward, over dtypes, odd vocab sizes, block boundaries, temperatures, -inf logits and masked
rows; bad targets and NaN logits (NaN out, or a named error in debug mode); gradcheck of both paths in float64;
the dispatch rule.

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_token_stats.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kernel_device import DEVICE, needs_triton
from nanoufo.kernels.dispatch import pick_impl
from nanoufo.kernels.token_stats import token_stats

IGNORE = -100
# Both paths do fp32 math on the same rounded inputs, so the statistics agree to fp32 accuracy for
# every dtype; the logits gradient is written in the logits' dtype and carries its rounding.
STAT_TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.float16: dict(atol=1e-5, rtol=2e-3),
            torch.bfloat16: dict(atol=1e-4, rtol=1.6e-2)}


def oracle(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """float64 logp, entropy, self-certainty by the textbook formulas; masked rows give 0."""
    z = logits.double() / temperature  # (N, V)
    logp_all = F.log_softmax(z, dim=-1)
    valid = targets != IGNORE
    logp = logp_all.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    sc = torch.logsumexp(z, -1) - z.mean(-1)
    return tuple(torch.where(valid, x, 0.0) for x in (logp, entropy, sc))


def make_case(n: int, v: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, v, generator=gen)).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    targets[1] = IGNORE  # a masked row
    targets[2] = v - 1  # the last column, in the last (partial) block
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3)]
    return logits, targets, grads


def stats_and_grad(fn, logits, targets, grads, which):
    """Outputs of fn(logits) and the logits gradient of sum_k <g_k, out_k> over the outputs in which."""
    x = logits.detach().clone().requires_grad_()
    outs = fn(x)
    loss = sum((outs[k].double() * grads[k]).sum() for k in which)
    loss.backward()
    return [o.detach().double() for o in outs], x.grad.double()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,block,temperature", [(300, 64, 1.0), (77, 32, 0.7)])  # 5 and 3 blocks
def test_kernel_matches_reference_and_float64(dtype, temperature, v, block):
    logits, targets, grads = make_case(8, v, dtype)
    which = (0, 1, 2)
    results = {impl: stats_and_grad(lambda x: token_stats(x, targets, temperature, impl=impl, block_size=block),
                                    logits, targets, grads, which) for impl in ("triton", "torch")}
    want, want_grad = stats_and_grad(lambda x: oracle(x, targets, temperature), logits, targets, grads, which)
    for outs, grad in results.values():
        for out, ref in zip(outs, want):
            torch.testing.assert_close(out, ref, **STAT_TOL)
        torch.testing.assert_close(grad, want_grad, **GRAD_TOL[dtype])
    assert all(o.dtype == torch.float32 for o in token_stats(logits, targets, impl="triton", block_size=block))


@needs_triton
def test_bad_rows_give_nan_or_a_named_error():
    logits = torch.randn(5, 40, device=DEVICE)
    targets = torch.tensor([0, 1, 40, 3, IGNORE], device=DEVICE)  # row 2: outside the vocabulary
    logp, entropy, _ = token_stats(logits, targets, impl="triton", block_size=16, debug=False)
    assert logp[2].isnan() and not logp[[0, 1, 3, 4]].isnan().any()  # never a plausible number
    with pytest.raises(ValueError, match=r"targets\[2\] = 40 is outside the vocabulary \[0, 40\)"):
        token_stats(logits, targets, impl="triton", block_size=16, debug=True)
    targets[2] = 2
    logits[3, 7] = float("nan")
    logp, entropy, sc = token_stats(logits, targets, impl="triton", block_size=16)
    assert logp[3].isnan() and entropy[3].isnan() and sc[3].isnan() and not logp[[0, 1, 2, 4]].isnan().any()
    for impl in ("triton", "torch"):
        with pytest.raises(ValueError, match="row 3 of the logits holds NaN"):
            token_stats(logits, targets, impl=impl, block_size=16, debug=True)


@needs_triton
@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2)])
def test_gradient_of_each_output(which):
    logits, targets, grads = make_case(6, 150, torch.float32, seed=1)
    want, want_grad = stats_and_grad(lambda x: oracle(x, targets, 0.7), logits, targets, grads, which)
    for impl in ("triton", "torch"):
        _, grad = stats_and_grad(lambda x: token_stats(x, targets, 0.7, impl=impl, block_size=64),
                                 logits, targets, grads, which)
        torch.testing.assert_close(grad, want_grad, **GRAD_TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_minus_inf_logits_and_masked_rows(impl):
    n, v = 6, 70
    logits, targets, grads = make_case(n, v, torch.float32, seed=2)
    logits[0, ::3] = float("-inf")  # some -inf entries, not at the target
    targets[0] = 1
    logits[3] = float("-inf")  # -inf everywhere but the target
    logits[3, targets[3]] = 1.5
    logits[4] = float("-inf")  # a masked row may hold anything
    targets[4] = IGNORE
    logits[5] -= 200.0  # all far below 0: a running max started at 0 instead of -inf underflows
    outs, grad = stats_and_grad(lambda x: token_stats(x, targets, 0.7, impl=impl, block_size=32),
                                logits, targets, grads, (0, 1, 2))
    # the oracle sees -1e4 instead of -inf: p is exactly 0 there in float64, and so are the
    # logp/entropy terms of the gradient; only the self-certainty value differs (finite vs +inf)
    finite = logits.masked_fill(logits == float("-inf"), -1e4)
    want, want_grad = stats_and_grad(lambda x: oracle(x, targets, 0.7), finite, targets, grads, (0, 1, 2))
    has_inf = (logits == float("-inf")).any(1) & (targets != IGNORE)
    torch.testing.assert_close(outs[0], want[0], **STAT_TOL)
    torch.testing.assert_close(outs[1], want[1], **STAT_TOL)
    torch.testing.assert_close(outs[2][~has_inf], want[2][~has_inf], **STAT_TOL)
    assert torch.isposinf(outs[2][has_inf]).all()
    assert outs[0][3] == 0 and outs[1][3].abs() < 1e-6  # entropy: exactly 0 interpreted, FMA rounding (1e-14) on a GPU
    assert (outs[0][[1, 4]] == 0).all() and (outs[2][[1, 4]] == 0).all() and (grad[[1, 4]] == 0).all()
    assert not grad.isnan().any()
    torch.testing.assert_close(grad, want_grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gradcheck_float64(impl):
    logits, targets, _ = make_case(3, 7, torch.float64, seed=3)
    fn = lambda x: token_stats(x, targets, 0.7, impl=impl, block_size=4)
    # the interpreter runs the fp64 kernels as they are; fast_mode keeps it to a few launches
    assert torch.autograd.gradcheck(fn, (logits.requires_grad_(),), fast_mode=impl == "triton")


def test_self_certainty_is_lse_minus_mean_over_full_vocab():
    v = 37
    logits = torch.zeros(3, v, device=DEVICE)
    logits[1, 0] = 5.0
    _, _, sc = token_stats(logits, torch.zeros(3, dtype=torch.long, device=DEVICE), impl="torch")
    assert sc[0].item() == pytest.approx(math.log(v))  # uniform: KL(U || U) + log V
    assert sc[1].item() == pytest.approx(math.log(v - 1 + math.exp(5.0)) - 5.0 / v)


def test_bad_targets_are_named():
    logits = torch.randn(4, 10)
    logp, entropy, _ = token_stats(logits, torch.tensor([0, 1, 10, 3]), impl="torch")  # no host check: NaN
    assert logp[2].isnan() and not logp[[0, 1, 3]].isnan().any() and not entropy.isnan().any()
    with pytest.raises(ValueError, match=r"targets\[2\] = 10 is outside the vocabulary \[0, 10\)"):
        token_stats(logits, torch.tensor([0, 1, 10, 3]), impl="torch", debug=True)
    with pytest.raises(ValueError, match="targets must be integer of shape"):
        token_stats(logits, torch.zeros(3, dtype=torch.long), impl="torch")
    with pytest.raises(ValueError, match=r"targets must be integer of shape \(4,\) on cpu, got .* on meta"):
        token_stats(logits, torch.zeros(4, dtype=torch.long, device="meta"), impl="torch")
    with pytest.raises(ValueError, match="temperature"):
        token_stats(logits, torch.zeros(4, dtype=torch.long), temperature=0.0, impl="torch")


def test_dispatch_rule(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pick_impl("auto", cpu) == "triton" and pick_impl("torch", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert pick_impl("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        pick_impl("triton", cpu)
    with pytest.raises(ValueError, match="impl must be one of"):
        pick_impl("fast", cpu)
