"""Token statistics fused with the LM head (kernels/linear_token_stats.py) and the vocab-parallel
form of both paths: chunked Triton and PyTorch paths against a float64 oracle on materialised
logits, gradients for hidden and weight, gradcheck, and two gloo ranks (torch.multiprocessing spawn)
whose combined outputs and gradients must equal the single-rank ones (the same two ranks check the LM head
fused with the PPO loss: tests/test_kernels_linear_ppo.py).

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_linear.py
"""
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_device import DEVICE, ON_GPU, gpu_only, needs_triton
from nanoufo.kernels.linear_token_stats import linear_token_stats, linear_token_stats_reference
from nanoufo.kernels.mm_acc import mm_acc, mm_acc_triton
from nanoufo.kernels.token_stats import token_stats
from test_kernels_linear_ppo import check_vocab_parallel
from test_kernels_token_stats import IGNORE, oracle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
launches = importlib.import_module("launches")

# Statistics: fp32 logits from the same rounded inputs, so fp32 accuracy for every dtype. Gradients:
# the logits gradient is rounded to the input dtype before the two matmuls; compared by the
# relative Frobenius error of the whole gradient.
STAT_TOL = dict(atol=5e-5, rtol=5e-5)
GRAD_REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_case(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) / math.sqrt(h) * 3).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    targets[1] = IGNORE
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3)]
    return hidden, weight, targets, grads


def run(fn, hidden, weight, grads, which=(0, 1, 2)):
    """Outputs of fn(hidden, weight) and the gradients of sum_k <g_k, out_k> w.r.t. hidden and weight."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    outs = fn(h, w)
    sum((outs[k].double() * grads[k]).sum() for k in which).backward()
    return [o.detach().double() for o in outs], *(None if t.grad is None else t.grad.double() for t in (h, w))


def oracle_linear(targets, temperature):
    return lambda h, w: oracle(h.double() @ w.double().T, targets, temperature)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = ((got - want).norm() / want.norm()).item()
    assert err < rel, f"relative gradient error {err:.2e} above {rel:.0e}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl,temperature", [("triton", 0.7), ("torch", 1.0), ("triton", 1.0)])
def test_fused_matches_float64(dtype, impl, temperature):
    hidden, weight, targets, grads = make_case(8, 32, 77, dtype)  # chunks of 24, 24, 24, 5 columns
    fused = lambda h, w: linear_token_stats(h, w, targets, temperature, chunk_size=24, impl=impl, block_size=16)
    outs, gh, gw = run(fused, hidden, weight, grads)
    want, want_gh, want_gw = run(oracle_linear(targets, temperature), hidden, weight, grads)
    for out, ref in zip(outs, want):
        torch.testing.assert_close(out, ref, **STAT_TOL)
    assert_grad_close(gh, want_gh, GRAD_REL[dtype])
    assert_grad_close(gw, want_gw, GRAD_REL[dtype])
    assert gh.shape == hidden.shape and gw.shape == weight.shape


@pytest.mark.parametrize("which", [(0,), (1,), (2,)])
def test_each_output_and_one_input(which):
    hidden, weight, targets, grads = make_case(6, 16, 41, torch.float32, seed=1)
    fused = lambda h, w: linear_token_stats(h, w, targets, 0.7, chunk_size=16, impl="torch")
    _, gh, gw = run(fused, hidden, weight, grads, which)
    _, want_gh, want_gw = run(oracle_linear(targets, 0.7), hidden, weight, grads, which)
    assert_grad_close(gh, want_gh, GRAD_REL[torch.float32])
    assert_grad_close(gw, want_gw, GRAD_REL[torch.float32])
    frozen = weight.detach().clone()  # a frozen head: only hidden gets a gradient
    h = hidden.detach().clone().requires_grad_()
    linear_token_stats(h, frozen, targets, 0.7, chunk_size=16, impl="torch")[which[0]].sum().backward()
    assert frozen.grad is None and h.grad is not None


def test_reference_and_chunking_agree_with_materialised_logits():
    hidden, weight, targets, _ = make_case(5, 16, 30, torch.float64, seed=2)
    want = linear_token_stats_reference(hidden, weight, targets, 0.7)
    for chunk in (7, 30, 64):
        for got, ref in zip(linear_token_stats(hidden, weight, targets, 0.7, chunk_size=chunk), want):
            torch.testing.assert_close(got, ref)


def test_self_certainty_uses_the_full_vocab_across_chunks():
    v = 50
    weight = torch.zeros(v, 8, device=DEVICE)  # every logit 0: uniform over all V
    _, _, sc = linear_token_stats(torch.randn(2, 8, device=DEVICE), weight, torch.tensor([0, 49], device=DEVICE),
                                  chunk_size=16, impl="torch")
    torch.testing.assert_close(sc, torch.full_like(sc, math.log(v)))


def test_gradcheck_float64_reference():
    hidden, weight, targets, _ = make_case(3, 4, 9, torch.float64, seed=3)
    fn = lambda h, w: linear_token_stats(h, w, targets, 0.7, chunk_size=4, impl="torch")
    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()))


def mm_acc_case(dtype: torch.dtype, m: int = 70, k: int = 37, n: int = 45, seed: int = 0):
    """a (m, k) as a transposed view (the head's dz.T), b (k, n), out (m, n) fp32, and the float64 oracle."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=gen).to(dtype).to(DEVICE).T
    b = torch.randn(k, n, generator=gen).to(dtype).to(DEVICE)
    out = torch.randn(m, n, generator=gen).to(DEVICE)
    return a, b, out, out.double() + a.double() @ b.double()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else []))
def test_mm_acc_kernel_adds_the_product_into_out_in_fp32(dtype):
    """Tiles of 32 x 32 in steps of 16: ragged in every dimension (70 x 37 @ 37 x 45), three tile rows in groups
    of 2 (the last group short); out is written in place. bf16 on a GPU only: the interpreter's bf16 tl.dot is
    wrong (triton-lang/triton#11584). fp32 operands go through tl.dot's TF32 on a GPU."""
    a, b, out, want = mm_acc_case(dtype)
    got = mm_acc_triton(a, b, out, block_m=32, block_n=32, block_k=16, group_m=2)
    assert got is out
    tol = 2e-2 if ON_GPU and dtype == torch.float32 else 1e-5  # TF32 rounds the fp32 operands on a GPU
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    fresh = mm_acc(a, b, impl="triton")  # from zeros, at the default tiles
    torch.testing.assert_close(fresh.double(), a.double() @ b.double(), atol=tol, rtol=tol)


@gpu_only
def test_mm_acc_on_cuda_adds_bf16_products_in_fp32_through_the_kernel():
    a, b, out, want = mm_acc_case(torch.bfloat16, m=4100, k=300, n=2048)
    before = out.clone()
    mm_acc(a, b, out=out)
    assert (out - before).abs().max() > 0 and torch.allclose(out.double(), want, atol=1e-3, rtol=1e-4)


def test_mm_acc_on_the_cpu_is_the_upcast_reference():
    a, b, out, want = mm_acc_case(torch.bfloat16)
    a, b, out = a.cpu(), b.cpu(), out.cpu()
    assert mm_acc(a, b).dtype == torch.float32
    torch.testing.assert_close(mm_acc(a, b, out=out).double(), want.cpu(), atol=1e-5, rtol=1e-5)  # fp32 sums
    with pytest.raises(ValueError, match="impl must be one of"):
        mm_acc(a, b, impl="cuda")


class _Launches(TorchDispatchMode):
    """The aten ops that run a kernel (views left out) and the Triton kernels launched (recorded, not run)."""

    def __init__(self):
        super().__init__()
        self.ops, self.kernels = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops.append((func, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out

    def __enter__(self):
        self._hook = launches.on_triton_launch(lambda name, args, kwargs, launch: self.kernels.append((name, args)))
        self._hook.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.__exit__(*exc)
        return super().__exit__(*exc)


def test_mm_acc_on_the_gpu_branch_adds_in_one_kernel_and_multiplies_with_cublas():
    """The GPU branch on the meta device at the fused head's real shape (Qwen2.5-3B, TP=2, a full row chunk):
    grad_W (V, H) += dz.T (V, R) @ hidden (R, H) is one launch of the kernel and no aten op (no fp32 product,
    no addmm, whose CUDA form some torch releases refuse for an fp32 out with bf16 operands); a fresh product
    (the logits) is one torch.mm with out_dtype."""
    v, r, h = 75968, 3533, 2048
    dz, hidden = (torch.empty(shape, dtype=torch.bfloat16, device="meta") for shape in ((r, v), (r, h)))
    grad_weight = torch.empty(v, h, device="meta")
    with _Launches() as record:
        assert mm_acc(dz.T, hidden, out=grad_weight) is grad_weight
    assert record.ops == [] and [name for name, _ in record.kernels] == ["_mm_acc_kernel"]
    a, b, out, M, N, K = record.kernels[0][1][:6]
    assert (a.shape, b.shape, out.shape, M, N, K) == ((v, r), (r, h), (v, h), v, h, r) and a.stride() == (1, v)
    chunk = torch.empty(v, h, dtype=torch.bfloat16, device="meta")[:8192].T
    with _Launches() as record:
        assert mm_acc(hidden, chunk).dtype == torch.float32  # (R, C) fp32 logits of a chunk
    assert record.ops == [(torch.ops.aten.mm.dtype, (r, 8192))] and record.kernels == []


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="share a float dtype"):
        linear_token_stats(torch.randn(2, 4), torch.randn(5, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden \(N, H\) and weight \(V, H\)"):
        linear_token_stats(torch.randn(2, 4), torch.randn(5, 3), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- vocab-parallel, 2 ranks

def _vocab_parallel_worker(rank: int, world: int, init_file: str, impl: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        hidden, weight, targets, grads = make_case(6, 16, 53, torch.float32, seed=4)
        start, end = [(0, 30), (30, 53)][rank]  # unequal slices: the full V comes from the all-gather
        logits = hidden @ weight.T
        kw = dict(impl=impl, block_size=16)
        full = lambda x, _: token_stats(x, targets, 0.7, **kw)
        part = dict(vocab_start=start, group=dist.group.WORLD)
        sliced = lambda x, _: token_stats(x[:, start:end], targets, 0.7, **part, **kw)
        want, want_grad, _ = run(full, logits, weight, grads)
        outs, grad, _ = run(sliced, logits, weight, grads)
        for out, ref in zip(outs, want):
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad[:, start:end], want_grad[:, start:end], atol=1e-6, rtol=1e-5)
        assert (grad[:, :start] == 0).all() and (grad[:, end:] == 0).all()  # nothing outside the slice

        head = dict(kw, chunk_size=16)
        full = lambda h, w: linear_token_stats(h, w, targets, 0.7, **head)
        want, want_gh, want_gw = run(full, hidden, weight, grads)
        for vocab_size in (None, 53):  # the full vocabulary's size gathered, or given (no host read)
            sliced = lambda h, w: linear_token_stats(h, w[start:end], targets, 0.7, vocab_size=vocab_size, **part,
                                                     **head)
            outs, gh, gw = run(sliced, hidden, weight, grads)
            for out, ref in zip(outs, want):
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gw[start:end], want_gw[start:end], atol=1e-5, rtol=1e-4)
            dist.all_reduce(gh)  # the caller's column-parallel input function sums the hidden gradient
            torch.testing.assert_close(gh, want_gh, atol=1e-5, rtol=1e-4)
        bad = targets.clone()
        bad[0] = 53  # outside the vocabulary: a NaN logp on every rank, no host check; debug names it
        logp, entropy, _ = token_stats(logits[:, start:end], bad, **part, **kw)
        assert logp[0].isnan() and not logp[1:].isnan().any() and not entropy.isnan().any()
        with pytest.raises(ValueError, match=r"targets\[0\] = 53 is outside the vocabulary \[0, 53\)"):
            token_stats(logits[:, start:end], bad, debug=True, **part, **kw)
        with pytest.raises(ValueError, match="vocab_size=52 but the ranks' slices hold 53 columns"):
            token_stats(logits[:, start:end], targets, debug=True, vocab_size=52, **part, **kw)
        check_vocab_parallel(rank, impl)  # the LM head fused with the PPO loss, in the same two ranks
    finally:
        dist.destroy_process_group()


@needs_triton
def test_vocab_parallel_two_gloo_ranks(tmp_path):
    mp.spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "store"), "triton"), nprocs=2, join=True)
