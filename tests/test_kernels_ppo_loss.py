"""PPO loss (kernels/ppo_loss.py): the Triton kernel against the PyTorch reference (run in float64
as the oracle) over options, masks, aggregations and per-token weights (micro-batches add up to the
whole minibatch); a hand-computed example; fully masked rows and
batches; garbage under the mask; gradcheck of both paths in float64.

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_ppo_loss.py
"""
import math

import pytest
import torch

from kernel_device import DEVICE, ON_GPU, needs_triton
from nanoufo.kernels.dispatch import interpreting
from nanoufo.kernels.ppo_loss import ppo_loss

TOL = dict(atol=1e-6, rtol=1e-5)  # fp32 kernel vs float64 reference: one fp32 pass, short sums


def make_batch(b: int = 5, t: int = 37, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)  # ratios on both clip sides
    old[0, :4] = logp[0, :4] - 25.0  # log-ratio past the +-20 clamp
    adv = torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv[0, 4:8] = -2.0  # A < 0 with ratio e^20: the dual clip binds
    old[0, 4:8] = logp[0, 4:8] - 19.0
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[b // 2] = False  # a fully masked row
    ref = logp + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    ent = 2 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    return [x.to(dtype).to(DEVICE) for x in (logp, old, adv)] + [mask.to(DEVICE)] + \
        [x.to(dtype).to(DEVICE) for x in (ref, ent)]


def run(impl, logp, old, adv, mask, ref, ent, **kw):
    """Loss, metrics and the gradients w.r.t. logp and entropy."""
    lp = logp.detach().clone().requires_grad_()
    en = None if ent is None else ent.detach().clone().requires_grad_()
    loss, metrics = ppo_loss(lp, old, adv, mask, ref_logp=ref, entropy=en, impl=impl, block_size=16, **kw)
    loss.backward()
    return loss.double(), {k: v.double() for k, v in metrics.items()}, lp.grad.double(), \
        None if en is None else en.grad.double()


def assert_same(got, want) -> None:
    loss, metrics, g_logp, g_ent = got
    torch.testing.assert_close(loss, want[0], **TOL)
    assert metrics.keys() == want[1].keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], want[1][name], **TOL)
    torch.testing.assert_close(g_logp, want[2], **TOL)
    if g_ent is not None:
        torch.testing.assert_close(g_ent, want[3], **TOL)


@needs_triton
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01),
    dict(kl_coef=0.1, kl_estimator="k1", dual_clip=None, clip_low=0.1, clip_high=0.1),
    dict(kl_coef=0.1, kl_estimator="k3", kl_clamp=0.02),  # caps about half of the batch's k3 values
])
def test_kernel_matches_float64_reference(aggregation, options):
    logp, old, adv, mask, ref, ent = make_batch()
    use_ref = ref if "kl_coef" in options else None
    use_ent = ent if "entropy_coef" in options else None
    got = run("triton", logp, old, adv, mask, use_ref, use_ent, aggregation=aggregation, **options)
    as64 = [None if x is None else x.double() for x in (logp, old, adv)] + [mask] + \
        [None if x is None else x.double() for x in (use_ref, use_ent)]
    want = run("torch", *as64, aggregation=aggregation, **options)
    assert_same(got, want)
    assert got[1]["clip_frac"] > 0  # the batch exercises the clipped branch


@needs_triton
def test_float_mask_and_bf16_inputs():
    logp, old, adv, mask, ref, ent = make_batch(seed=1)
    want = run("torch", logp, old, adv, mask, ref, ent, kl_coef=0.05, entropy_coef=0.01)
    got = run("triton", logp, old, adv, mask.float(), ref, ent, kl_coef=0.05, entropy_coef=0.01)
    assert_same(got, want)
    half = [x.bfloat16() if x.dtype == torch.float32 else x for x in (logp, old, adv, mask, ref, ent)]
    got16, want16 = run("triton", *half, kl_coef=0.05), run("torch", *half, kl_coef=0.05)
    assert_same(got16, want16)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_per_token_weights(impl):
    logp, old, adv, mask, ref, ent = make_batch(seed=4)
    opts = dict(kl_coef=0.1, entropy_coef=0.01)
    # weights mask / n_tokens are the token-mean; split in two micro-batches, the losses and gradients add up
    weights = mask.double() / mask.sum()
    whole = run("torch", *[x.double() if x.dtype != torch.bool else x for x in (logp, old, adv, mask, ref, ent)],
                **opts)
    got = run(impl, logp, old, adv, mask, ref, ent, weights=weights.float(), **opts)
    assert_same(got, whole)
    halves = [run(impl, *(x[rows] for x in (logp, old, adv, mask, ref, ent)), weights=weights[rows].float(), **opts)
              for rows in (slice(0, 2), slice(2, None))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], whole[0], **TOL)
    torch.testing.assert_close(torch.cat([halves[0][2], halves[1][2]]), whole[2], **TOL)


@needs_triton
def test_gradcheck_float64_weights():
    logp, old, adv, mask, ref, ent = make_batch(b=2, t=6, seed=5, dtype=torch.float64)
    weights = torch.rand(2, 6, dtype=torch.float64, device=DEVICE)
    fn = lambda lp, en: ppo_loss(lp, old, adv, mask, ref_logp=ref, entropy=en, weights=weights, kl_coef=0.1,
                                 kl_estimator="k1", entropy_coef=0.01, impl="triton", block_size=4)[0]
    assert torch.autograd.gradcheck(fn, (logp.requires_grad_(), ent.requires_grad_()), fast_mode=True)


def test_hand_computed_example():
    # row 0: two tokens with ratio 1 (A = 1, 3), row 1: one token with ratio e^0.5 > 1.28 and A = 2
    logp = torch.tensor([[0.0, 0.0, 9.0], [0.5, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 3.0, 5.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    token_loss = [-1.0, -3.0, -2.0 * 1.28]  # the third is clipped
    for impl in ["torch"] + (["triton"] if interpreting() or ON_GPU else []):
        loss, m = ppo_loss(logp.to(DEVICE), old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), impl=impl)
        assert loss.item() == pytest.approx(sum(token_loss) / 3)
        assert m["clip_frac"].item() == pytest.approx(1 / 3)
        assert m["ratio_mean"].item() == pytest.approx((2 + torch.e ** 0.5) / 3)
        for aggregation in ("seq-mean", "seq-mean-token-mean"):  # the short and the long name
            loss, _ = ppo_loss(logp.to(DEVICE), old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE),
                               aggregation=aggregation, impl=impl)
            assert loss.item() == pytest.approx(((-1.0 - 3.0) / 2 + token_loss[2]) / 2)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fully_masked_and_garbage_under_the_mask(impl):
    logp, old, adv, mask, ref, ent = make_batch(b=3, t=20, seed=2)
    for x in (logp, old, adv, ref, ent):
        x[~mask] = float("nan")  # padding may hold anything
    loss, metrics, g_logp, g_ent = run(impl, logp, old, adv, mask, ref, ent, kl_coef=0.1, entropy_coef=0.01,
                                       aggregation="seq-mean")
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert (g_logp[~mask] == 0).all() and torch.isfinite(g_logp).all() and (g_ent[~mask] == 0).all()
    nothing = torch.zeros_like(mask)
    for aggregation in ("token-mean", "seq-mean"):
        loss, metrics, g_logp, _ = run(impl, logp, old, adv, nothing, ref, None, aggregation=aggregation)
        assert loss.item() == 0 and (g_logp == 0).all() and all(v.item() == 0 for v in metrics.values())


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gradcheck_float64(impl):
    logp, old, adv, mask, ref, ent = make_batch(b=2, t=6, seed=3, dtype=torch.float64)
    fn = lambda lp, en: ppo_loss(lp, old, adv, mask, ref_logp=ref, entropy=en, kl_coef=0.1, entropy_coef=0.01,
                                 aggregation="seq-mean", impl=impl, block_size=4)[0]
    # fast_mode keeps the interpreted kernel to a few launches
    assert torch.autograd.gradcheck(fn, (logp.requires_grad_(), ent.requires_grad_()), fast_mode=impl == "triton")


def test_bad_inputs_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 2\)"):
        ppo_loss(x, x, torch.zeros(2, 2), x, impl="torch")
    with pytest.raises(ValueError, match="dual_clip > 1"):
        ppo_loss(x, x, x, x, dual_clip=0.5, impl="torch")
    with pytest.raises(ValueError, match="aggregation must be"):
        ppo_loss(x, x, x, x, aggregation="sum", impl="torch")
    with pytest.raises(ValueError, match="weights is on meta"):
        ppo_loss(x, x, x, x, weights=torch.zeros(2, 3, device="meta"), impl="torch")
    with pytest.raises(ValueError, match="advantages must be a float tensor"):
        ppo_loss(x, x, torch.zeros(2, 3, dtype=torch.long), x, impl="torch")
    nan = x.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"old_logp\[1, 2\] is NaN on a masked-in token"):
        ppo_loss(x, nan, x, torch.ones(2, 3), impl="torch", debug=True)
    ppo_loss(x, nan, x, torch.tensor([[1, 1, 0], [1, 1, 0]]), impl="torch", debug=True)  # masked out: fine


@needs_triton
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_loss_weights_give_the_aggregated_loss_and_split_by_rows(aggregation):
    """With nanoufo.rl.loss_weights of the whole batch, sum(w * loss) is the aggregated loss on both paths,
    and the weighted losses of two row subsets add up to it (what micro-batches rely on)."""
    from nanoufo.rl import loss_weights
    logp, old, adv, mask, ref, ent = make_batch()
    options = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, aggregation=aggregation)
    want = run("torch", logp, old, adv, mask, ref, ent, **options)
    weights = loss_weights(mask, aggregation).to(logp.dtype)
    for impl in ("torch", "triton"):
        loss, _, g_logp, g_ent = run(impl, logp, old, adv, mask, ref, ent, weights=weights, **options)
        assert_same((loss, want[1], g_logp, g_ent), want)
    halves = [run("triton", *(x[rows] for x in (logp, old, adv, mask, ref, ent)), weights=weights[rows], **options)
              for rows in (slice(0, 2), slice(2, None))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], want[0], **TOL)
    torch.testing.assert_close(torch.cat([halves[0][2], halves[1][2]]), want[2], **TOL)


@needs_triton
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_finish_tiles_over_many_rows_and_blocks(aggregation):
    """More rows than FINISH_ROWS and more blocks than a tile holds: the finishing program loops over tiles
    in both directions (finish_tile gives 64 x 8 here), and the loss, metrics and gradients still match."""
    from nanoufo.kernels.ppo_loss import FINISH_ROWS, finish_tile
    b, t, block = FINISH_ROWS + 3, 19, 2
    rows, blocks = finish_tile(b, -(-t // block))
    assert rows < b and blocks < -(-t // block)
    logp, old, adv, mask, ref, ent = make_batch(b=b, t=t, seed=7)
    options = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, aggregation=aggregation)
    lp, en = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, metrics = ppo_loss(lp, old, adv, mask, ref_logp=ref, entropy=en, impl="triton", block_size=block,
                             **options)
    loss.backward()
    got = loss.double(), {k: v.double() for k, v in metrics.items()}, lp.grad.double(), en.grad.double()
    as64 = [x.double() for x in (logp, old, adv)] + [mask] + [x.double() for x in (ref, ent)]
    assert_same(got, run("torch", *as64, **options))


def independent_loss(logp, old, adv, mask, ref, ent, aggregation, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                     kl_coef=0.1, entropy_coef=0.01) -> float:
    """The module docstring's loss token by token in plain Python floats, k3 KL, aggregated without
    kernels/ppo_loss.py (its finishing kernel or ppo_loss_reference)."""
    rows = []
    for b in range(logp.shape[0]):
        token_losses = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            lp, a = float(logp[b, t]), float(adv[b, t])
            ratio = math.exp(min(max(lp - float(old[b, t]), -20.0), 20.0))
            loss = max(-a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high))
            if a < 0:
                loss = min(loss, -a * dual_clip)
            d = min(max(float(ref[b, t]) - lp, -20.0), 20.0)
            token_losses.append(loss + kl_coef * (math.exp(d) - d - 1) - entropy_coef * float(ent[b, t]))
        rows.append(token_losses)
    if aggregation == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    row_means = [sum(r) / len(r) for r in rows if r]  # rows without tokens do not count
    return sum(row_means) / len(row_means)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_aggregation_against_an_independent_reference(impl, aggregation):
    logp, old, adv, mask, ref, ent = make_batch(b=4, t=9, seed=5, dtype=torch.float64)
    mask[1] = False  # an empty row: seq-mean averages over the 3 rows that hold tokens
    mask[2, 3:] = False  # a short row: seq-mean weighs it as much as the long ones
    loss, _ = ppo_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, kl_coef=0.1, entropy_coef=0.01,
                       aggregation=aggregation, impl=impl)
    expected = independent_loss(*(x.cpu() for x in (logp, old, adv, mask, ref, ent)), aggregation)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_k3_kl_past_the_clamp(impl):
    """ref - logp = +30 and -30: the k3 term uses d clamped to +-20, and passes no gradient out there."""
    logp = torch.zeros(1, 3, dtype=torch.float64, device=DEVICE)
    ref = torch.tensor([[30.0, -30.0, 0.5]], dtype=torch.float64, device=DEVICE)
    zeros, mask = torch.zeros_like(logp), torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    lp = logp.clone().requires_grad_()
    loss, metrics = ppo_loss(lp, zeros, zeros, mask, ref_logp=ref, kl_coef=0.5, impl=impl)  # ratio 1, A = 0
    kl = [math.exp(20) - 21, math.exp(-20) + 19, math.exp(0.5) - 1.5]
    assert metrics["kl"].item() == pytest.approx(sum(kl) / 3, rel=1e-9)
    assert loss.item() == pytest.approx(0.5 * sum(kl) / 3, rel=1e-9)
    loss.backward()
    assert lp.grad[0, :2].tolist() == [0.0, 0.0]
    assert lp.grad[0, 2].item() == pytest.approx(0.5 * (1 - math.exp(0.5)) / 3, rel=1e-9)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_k3_capped_as_verls_low_var_kl(impl):
    """kl_clamp=10, verl's low_var_kl: kl = clamp(e^d - d - 1, -10, 10) with d = ref - logp, so a token past the
    cap counts 10 and passes no gradient. d = 3: e^3 - 4 = 16.09 -> 10; d = -12: e^-12 + 11 = 11.000006 -> 10;
    d = -0.5: e^-0.5 - 0.5 = 0.1065, not capped, gradient kl_coef (1 - e^d) / 3."""
    logp = torch.zeros(1, 3, dtype=torch.float64, device=DEVICE)
    ref = torch.tensor([[3.0, -12.0, -0.5]], dtype=torch.float64, device=DEVICE)
    zeros, mask = torch.zeros_like(logp), torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    lp = logp.clone().requires_grad_()
    loss, metrics = ppo_loss(lp, zeros, zeros, mask, ref_logp=ref, kl_coef=0.5, kl_clamp=10.0, impl=impl)
    kl = [10.0, 10.0, math.exp(-0.5) - 0.5]
    assert metrics["kl"].item() == pytest.approx(sum(kl) / 3, rel=1e-9)
    assert loss.item() == pytest.approx(0.5 * sum(kl) / 3, rel=1e-9)
    loss.backward()
    assert lp.grad[0, :2].tolist() == [0.0, 0.0]
    assert lp.grad[0, 2].item() == pytest.approx(0.5 * (1 - math.exp(-0.5)) / 3, rel=1e-9)
