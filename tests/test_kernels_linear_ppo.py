"""The LM head fused with the PPO loss (kernels/linear_ppo_loss.py): the Triton and PyTorch paths against
the unfused float64 path (materialised logits, autograd) over dtypes, row chunks, KL estimators and the
entropy bonus; micro-batches with shared weights add up to the whole minibatch; gradcheck; bad inputs.
check_vocab_parallel (two gloo ranks give the single-rank loss and gradients) runs inside the two-rank
test of tests/test_kernels_linear.py, which spawns the ranks once for both files.

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_linear_ppo.py
"""
import math

import pytest
import torch
import torch.distributed as dist

from kernel_device import DEVICE, needs_triton
from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss, linear_ppo_loss_reference

GRAD_REL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}
OPTIONS = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_low=0.2, clip_high=0.28)


def make_case(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) / math.sqrt(h) * 3).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    with torch.no_grad():
        logp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0]
    old = (logp + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).float()  # both clip sides
    adv = torch.randn(n, generator=gen).to(DEVICE)
    mask = torch.rand(n, generator=gen) > 0.25
    mask[0] = False
    ref = (logp + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    weights = mask.float() / mask.sum()  # token-mean over the minibatch
    return hidden, weight, targets, [x.to(DEVICE) for x in (old, adv, mask, weights)], ref.to(DEVICE)


def run(fn, hidden, weight, targets, per_token, ref, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, metrics, logp = fn(h, w, targets, *per_token, ref_logp=ref, **kw)
    loss.backward()
    return loss.double(), {k: v.double() for k, v in metrics.items()}, logp.double(), h.grad.double(), w.grad.double()


def assert_close(got, want, rel):
    loss, metrics, logp, gh, gw = got
    torch.testing.assert_close(loss, want[0], atol=1e-5, rtol=1e-4)
    assert metrics.keys() == want[1].keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], want[1][name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logp, want[2], atol=5e-5, rtol=5e-5)
    for g, ref in ((gh, want[3]), (gw, want[4])):
        err = ((g - ref).norm() / ref.norm()).item()
        assert err < rel, f"relative gradient error {err:.2e} above {rel:.0e}"


def float64_reference(hidden, weight, targets, per_token, ref, temperature, **options):
    as64 = [x.double() if x.dtype.is_floating_point else x for x in per_token]
    return run(linear_ppo_loss_reference, hidden.double(), weight.double(), targets, as64, ref.double(),
               temperature=temperature, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kl_estimator,temperature", [("k3", 0.7), ("k1", 1.0)])
def test_fused_matches_float64(dtype, impl, kl_estimator, temperature):
    hidden, weight, targets, per_token, ref = make_case(10, 16, 77, dtype)
    options = OPTIONS | dict(kl_estimator=kl_estimator)
    got = run(linear_ppo_loss, hidden, weight, targets, per_token, ref, temperature=temperature, impl=impl,
              chunk_rows=4, block_size=16, **options)  # 3 row chunks
    want = float64_reference(hidden, weight, targets, per_token, ref, temperature, **options)
    assert_close(got, want, GRAD_REL[dtype])
    assert got[1]["clip_frac"] > 0  # the case exercises the clipped branch


def test_micro_batches_add_up_to_the_minibatch():
    hidden, weight, targets, (old, adv, mask, weights), ref = make_case(12, 8, 30, torch.float32, seed=1)
    whole = run(linear_ppo_loss, hidden, weight, targets, (old, adv, mask, weights), ref, impl="torch", **OPTIONS)
    parts = [run(linear_ppo_loss, hidden[rows], weight, targets[rows], [x[rows] for x in (old, adv, mask, weights)],
                 ref[rows], impl="torch", **OPTIONS) for rows in (slice(0, 5), slice(5, None))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0])
    torch.testing.assert_close(torch.cat([parts[0][3], parts[1][3]]), whole[3])
    torch.testing.assert_close(parts[0][4] + parts[1][4], whole[4])


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gradcheck_float64(impl):
    hidden, weight, targets, per_token, ref = make_case(4, 3, 7, torch.float64, seed=2)
    per_token[:2] = [x.double() for x in per_token[:2]]
    per_token[3] = per_token[3].double()
    fn = lambda h, w: linear_ppo_loss(h, w, targets, *per_token, ref_logp=ref.double(), temperature=0.7,
                                      chunk_rows=3, impl=impl, block_size=4, **OPTIONS)[0]
    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()),
                                    fast_mode=impl == "triton")


def test_bad_inputs_are_named():
    hidden, weight, targets, (old, adv, mask, weights), ref = make_case(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match=r"advantages must be \(4,\)"):
        linear_ppo_loss(hidden, weight, targets, old, adv[:3], mask, weights, impl="torch")
    with pytest.raises(ValueError, match="share a float dtype"):
        linear_ppo_loss(hidden, weight.double(), targets, old, adv, mask, weights, impl="torch")
    with pytest.raises(ValueError, match="pass its group"):
        linear_ppo_loss(hidden, weight, targets, old, adv, mask, weights, vocab_start=5, impl="torch")
    targets[1] = 10
    mask[1] = True
    loss, _, logp = linear_ppo_loss(hidden, weight, targets, old, adv, mask, weights, impl="torch")
    assert logp[1].isnan() and loss.isnan()  # no host check: never a plausible number; debug names the row
    with pytest.raises(ValueError, match=r"targets\[1\] = 10 is outside the vocabulary"):
        linear_ppo_loss(hidden, weight, targets, old, adv, mask, weights, impl="torch", debug=True)


# ----------------------------------------------------------------------------- vocab-parallel, 2 ranks

def check_vocab_parallel(rank: int, impl: str) -> None:
    """Run by each of the two gloo ranks of tests/test_kernels_linear.py (one spawn for both files): the
    rank's vocab slice gives the single-rank loss, logp, metrics and gradients."""
    hidden, weight, targets, per_token, ref = make_case(9, 16, 53, torch.float32, seed=3)
    start, end = [(0, 30), (30, 53)][rank]  # unequal slices
    kw = dict(temperature=0.7, impl=impl, chunk_rows=4, block_size=16, **OPTIONS)
    want = run(linear_ppo_loss, hidden, weight, targets, per_token, ref, **kw)
    sliced = lambda h, w, *args, **k: linear_ppo_loss(h, w[start:end], *args, vocab_start=start,
                                                      group=dist.group.WORLD, **k)
    loss, metrics, logp, gh, gw = run(sliced, hidden, weight, targets, per_token, ref, **kw)
    torch.testing.assert_close(loss, want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logp, want[2], atol=1e-6, rtol=1e-5)
    for name in metrics:
        torch.testing.assert_close(metrics[name], want[1][name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw[start:end], want[4][start:end], atol=1e-6, rtol=1e-5)
    assert (gw[:start] == 0).all() and (gw[end:] == 0).all()
    dist.all_reduce(gh)  # the caller's column-parallel input function sums the hidden gradient
    torch.testing.assert_close(gh, want[3], atol=1e-6, rtol=1e-5)


def test_the_cpu_default_chunk_is_its_own_budget(monkeypatch):
    """Without chunk_rows the CPU takes CPU_CHUNK_ELEMENTS logits per row chunk (a GPU CHUNK_ELEMENTS)."""
    import nanoufo.kernels.linear_ppo_loss as head
    assert head.default_chunk_rows(151936, "cpu") == 441 and head.default_chunk_rows(151936, "cuda") == 1766
    hidden, weight, targets, per_token, ref = make_case(10, 16, 77, torch.float32)
    monkeypatch.setattr(head, "CPU_CHUNK_ELEMENTS", 4 * 77)  # 4 rows a chunk
    rows, mm_acc = [], head.mm_acc
    monkeypatch.setattr(head, "mm_acc", lambda a, b, out=None: rows.append(a.shape[0]) or mm_acc(a, b, out=out))
    with torch.no_grad():  # the forward's logits GEMM only: one call a chunk
        head.linear_ppo_loss(hidden.cpu(), weight.cpu(), targets.cpu(), *[x.cpu() for x in per_token], **OPTIONS)
    assert rows == [4, 4, 2]
