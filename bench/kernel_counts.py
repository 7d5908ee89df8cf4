"""CPU proxies for the kernels' GPU cost (issues 15 and 28), counted on the code path a GPU takes:

- launches: every PyTorch op that runs a kernel (views and empty allocations excluded), counted with a
  TorchDispatchMode, plus every Triton kernel launch (the JIT function's run, wrapped); host syncs: ops
  that read a device value on the host (item, nonzero, ...); collectives: c10d ops. For token_stats' forward
  and backward, the PPO loss's forward and backward, and the vocab-parallel fused heads on two gloo ranks.
- matmul FLOPs of the LM head fused with the PPO loss, every matmul counted (mm, addmm, addmm_, bmm ...),
  against 6 N H V.
- bytes moved by one row chunk's weight-gradient step of that head, grad_W (V, H) fp32 += dz.T @ hidden
  (kernels/mm_acc.py), on meta tensors of Qwen2.5-3B at TP=2: each aten op reads its tensor inputs and
  writes its outputs (an in-place op reads and writes its self; a copy_ onto the same data moves nothing, as in
  PyTorch's copy_), each Triton launch reads its tensor
  arguments and writes those its kernel stores to (KERNEL_WRITES); against the GEMM's own bytes, its operands
  read once and its fp32 accumulator read and written once (a GEMM's re-reads of operand tiles from cache are
  counted for neither).
- rows the LM head runs on in the trainer's forwards (nanoufo/packing.py), before -> after keeping only the rows
  that predict a sampled token, on the benchmarks' synthetic multi-turn rollout (bench/common.py) of a preset's
  shapes, and the head's matmul FLOPs (forward and backward, 6 H V per row) that this saves.
- SASS instructions per logit in the main loop of the compiled statistics kernel (and of the backward's
  kernel): compiled for sm_90
  with Triton's bundled ptxas (no GPU needed), disassembled with the bundled cuobjdump; the loop is the
  span from a backward branch's target to the branch; per logit = its instructions / logits one thread
  handles per iteration. Registers, stack frame and local memory (spills) from cuobjdump -res-usage.

    TRITON_INTERPRET=1 python bench/kernel_counts.py        # launches, syncs, FLOPs, then SASS (subprocess)
    python bench/kernel_counts.py --sass [--source FILE --kernel NAME]   # SASS only, e.g. of an old version
    python bench/kernel_counts.py --sass --constexpr BF16_PAIRS=0   # the loop with a constexpr switched
    TRITON_INTERPRET=1 python bench/kernel_counts.py --root DIR   # the counts of another checkout's kernels/
    python bench/kernel_counts.py --bytes                    # only the weight gradient's bytes per row chunk
    python bench/kernel_counts.py --head-rows                # only the LM head's rows, before -> after

Prints one JSON line per figure. tests/test_kernel_counts.py asserts the goals with the same functions.
"""
import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compile_check import compile_for, nvidia_bin, resource_usage  # bench/: the compile check's shared pieces
from launches import on_triton_launch

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten.masked_select,
            aten.unique_dim, aten._unique2, aten.item}
NO_KERNEL = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided,
             aten.detach, aten.lift_fresh, aten.set_}
MATMULS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_, aten.addbmm, aten.addbmm_}


class Counts(TorchDispatchMode):
    """Kernel launches (PyTorch ops + Triton kernels), host syncs and matmul FLOPs inside the block."""

    def __init__(self):
        super().__init__()
        self.torch_ops, self.triton, self.syncs, self.flops = Counter(), Counter(), Counter(), 0
        self.collectives = Counter()  # c10d ops: all-reduce, all-gather, ...
        self.launched = []  # (kernel name, its arguments) of every Triton launch
        self._in_triton = 0

    @property
    def launches(self) -> int:
        return sum(self.torch_ops.values()) + sum(self.triton.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._in_triton:  # the interpreter's own host copies are not launches
            return out
        packet = func.overloadpacket
        if func.namespace == "c10d":
            self.collectives[str(packet)] += 1
        if packet in SYNC_OPS:
            self.syncs[str(packet)] += 1
        if packet in MATMULS:
            a, b = (args[0], args[1]) if packet in (aten.mm, aten.bmm) else (args[1], args[2])
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.ndim == 3 else 1)
        if packet not in NO_KERNEL and not func.is_view and packet is not aten._local_scalar_dense:
            self.torch_ops[str(packet)] += 1
        return out

    def __enter__(self):
        self._hook = on_triton_launch(self._triton_launch)
        self._hook.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.__exit__(*exc)
        return super().__exit__(*exc)

    def _triton_launch(self, name: str, args: tuple, kwargs: dict, launch):
        self.triton[name] += 1
        self.launched.append((name, args))
        self._in_triton += 1
        try:
            return launch()
        finally:
            self._in_triton -= 1

    def summary(self) -> dict:
        return dict(launches=self.launches, triton=dict(self.triton), torch_ops=dict(self.torch_ops),
                    host_syncs=sum(self.syncs.values()), syncs=dict(self.syncs), collectives=dict(self.collectives))


# ----------------------------------------------------------------------------- SASS of the statistics loop

ARG_TYPES = {"logits_ptr": "*bf16", "targets_ptr": "*i64", "bad_ptr": "*i64", "count_ptr": "*i32",
             "n_rows": "i32", "n_cols": "i32", "row_stride": "i32", "cols_per_split": "i32", "vocab_start": "i32",
             "ignore_index": "i32", "c": "fp32", "inv_temp": "fp32", "inv_vocab": "fp32", "grad_ptr": "*bf16",
             "grad_row_stride": "i32"}  # other *_ptr: *fp32; cols_per_split: the kernels before issue 28
V_REAL, BLOCK, WARPS = 151936, 4096, 8  # Qwen2.5's vocabulary; the launcher's block and warps at that width


def compile_sm90(kernel, constexprs: dict, num_warps: int) -> bytes:
    """The cubin of a @triton.jit kernel for sm_90 (bf16 logits, fp32 maths), compiled without a GPU."""
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else ARG_TYPES.get(n, "*fp32" if n.endswith("_ptr") else None)
                 for n in names}
    # what the JIT specializes at V = 151936: pointers and these widths divisible by 16
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n.endswith("_ptr") or n in ("n_cols", "row_stride", "grad_row_stride", "cols_per_split")}
    source = ASTSource(kernel, signature, constexprs={n: v for n, v in constexprs.items() if n in names},
                       attrs=aligned)
    return compile_for(source, 90, {"num_warps": num_warps}).asm["cubin"]


def loop_stats(cubin: bytes, logits_per_iteration: int) -> dict:
    """Instructions of the first loop in the SASS, per logit; registers and spills of the kernel."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kernel_counts_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        sass = subprocess.run([nvidia_bin("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        path.unlink()
    code = [(int(addr, 16), text.strip()) for addr, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target, 16), addr) for addr, text in code
             for target in re.findall(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text) if int(target, 16) < addr]
    start, end = min(loops)  # the first loop in program order: the unmasked full-block loop
    body = [text for addr, text in code if start <= addr <= end]
    ops = Counter(text.split()[0].lstrip("@!P0123456789T ").split(".")[0] if not text.startswith("@")
                  else text.split()[1].split(".")[0] for text in body)
    usage = resource_usage(cubin)
    return dict(loop_instructions=len(body), logits_per_iteration=logits_per_iteration,
                per_logit=round(len(body) / logits_per_iteration, 2), registers=usage["reg"],
                local_bytes=usage["local"], stack_bytes=usage["stack"], barriers_in_loop=ops.get("BAR", 0),
                mix=dict(ops.most_common(8)))


def sass_report(source: str | None, kernel_name: str, overrides: dict | None = None) -> dict:
    """The loop's SASS of kernel_name in source (default: this checkout's kernels/token_stats.py) at bf16 logits,
    V = 151936, with the constexprs the launcher picks there (SPLIT=1: the split kernels of older versions),
    changed by overrides {name: int}."""
    import triton.language as tl
    if source:
        spec = importlib.util.spec_from_file_location("kernel_source", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        source = "kernels/token_stats.py"
        module = importlib.import_module("nanoufo.kernels.token_stats")
    kernel = getattr(module, kernel_name)
    k = 8
    constexprs = dict(BLOCK=BLOCK, K=k, GROUPS=BLOCK // (2 * k), SPLIT=1, DEBUG=False, BF16_PAIRS=True, ACC=tl.float32,
                      HAS_LOGP=True, HAS_ENT=True, HAS_SC=True) | (overrides or {})
    stats = loop_stats(compile_sm90(kernel, constexprs, WARPS), BLOCK // (32 * WARPS))
    return dict(kernel=kernel_name, source=source, block=BLOCK, num_warps=WARPS, **(overrides or {}), **stats)


# ----------------------------------------------------------------------------- launches, syncs, FLOPs

def count(fn) -> Counts:
    with Counts() as counts:
        fn()
    return counts


def token_stats_counts(n: int = 8, v: int = 300, device: str = "cpu") -> dict:
    """Launches and syncs of one token_stats forward and backward (bf16 logits, the Triton path)."""
    from nanoufo.kernels.token_stats import token_stats
    logits = torch.randn(n, v, dtype=torch.bfloat16, device=device, requires_grad=True)
    targets = torch.randint(0, v, (n,), device=device)
    outs = []
    forward = count(lambda: outs.extend(token_stats(logits, targets, 0.7, impl="triton", block_size=64)))
    grads = [torch.randn(n, device=device) for _ in outs]
    backward = count(lambda: torch.autograd.grad(outs, logits, grads))
    return dict(op="token_stats", n=n, v=v, forward=forward.summary(), backward=backward.summary())


def ppo_loss_counts(b: int = 4, t: int = 64, device: str = "cpu") -> dict:
    """Launches and syncs of one PPO loss forward and backward (k3 KL and entropy on, the Triton path)."""
    from nanoufo.kernels.ppo_loss import ppo_loss
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(b, t, generator=gen)
    old, ref = logp + 0.1 * torch.randn(b, t, generator=gen), logp + 0.1 * torch.randn(b, t, generator=gen)
    adv, entropy, mask = torch.randn(b, t, generator=gen), torch.rand(b, t, generator=gen), torch.rand(b, t) > 0.2
    logp, old, ref, adv, entropy, mask = (x.to(device) for x in (logp, old, ref, adv, entropy, mask))
    logp.requires_grad_(), entropy.requires_grad_()
    out = []
    forward = count(lambda: out.extend(ppo_loss(logp, old, adv, mask, ref_logp=ref, entropy=entropy, kl_coef=0.01,
                                                entropy_coef=0.01, impl="triton")))
    g = torch.ones((), device=device)
    backward = count(lambda: torch.autograd.grad(out[0], (logp, entropy), g))
    return dict(op="ppo_loss", b=b, t=t, forward=forward.summary(), backward=backward.summary())


def head_flops(n: int = 16, h: int = 32, v: int = 300) -> list[dict]:
    """Matmul FLOPs of forward + backward, in units of N H V: the head fused with the PPO loss, and the
    statistics-only fused head (whose backward recomputes the logits)."""
    from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss
    from nanoufo.kernels.linear_token_stats import linear_token_stats
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True) / h ** 0.5
    weight = weight.detach().requires_grad_()
    targets = torch.randint(0, v, (n,))
    old, adv, mask = -torch.rand(n), torch.randn(n), torch.rand(n) > 0.2
    step = lambda: linear_ppo_loss(hidden, weight, targets, old, adv, mask, mask.float() / mask.sum(),
                                   entropy_coef=0.01, chunk_rows=n // 2, impl="torch")[0].backward()
    rows = [("linear_ppo_loss", count(step))]
    step = lambda: sum(o.sum() for o in linear_token_stats(hidden, weight, targets, chunk_size=v // 3,
                                                             impl="torch")).backward()
    rows.append(("linear_token_stats", count(step)))
    return [dict(op=name, n=n, h=h, v=v, matmul_flops=c.flops, per_nhv=c.flops / (n * h * v)) for name, c in rows]


KERNEL_WRITES = {"_mm_acc_kernel": (2,)}  # the positions of the arguments a Triton kernel stores to (out)


class Bytes(TorchDispatchMode):
    """Bytes read and written inside the block (see the module docstring); Triton launches are recorded, not run."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket not in NO_KERNEL and not _copy_onto_itself(func, args):
            self.ops[str(func.overloadpacket)] += 1
            self.read += sum(_nbytes(x) for x in (*args, *(kwargs or {}).values()))
            self.written += sum(_nbytes(x) for x in (out if isinstance(out, (tuple, list)) else (out,)))
        return out

    def __enter__(self):
        self._hook = on_triton_launch(self._triton_launch)
        self._hook.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.__exit__(*exc)
        return super().__exit__(*exc)

    def _triton_launch(self, name: str, args: tuple, kwargs: dict, launch) -> None:
        self.ops[f"triton:{name}"] += 1
        self.read += sum(_nbytes(x) for x in args)
        self.written += sum(_nbytes(args[i]) for i in KERNEL_WRITES[name])


def _copy_onto_itself(func, args) -> bool:
    """A copy_ of a view onto the same data, which PyTorch's copy_ returns from at once (`out[rows] += x` ends
    with one: Python writes the added slice back)."""
    if func.overloadpacket is not aten.copy_:
        return False
    dst, src = args[0], args[1]
    return (torch._C._is_alias_of(dst, src) and dst.storage_offset() == src.storage_offset()
            and dst.stride() == src.stride() and dst.shape == src.shape and dst.dtype == src.dtype)


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def weight_grad_bytes(v: int = 75968, h: int = 2048, rows: int = 3533, mm_acc=None) -> dict:
    """Bytes of grad_W (v, h) fp32 += dz.T @ hidden for one row chunk, dz (rows, v) and hidden (rows, h) bf16
    (default: Qwen2.5-3B at TP=2, a full row chunk of linear_ppo_loss), the first chunk's (a fresh product)
    and a later one's (added in place), against the GEMM's own. mm_acc: another checkout's, for a before."""
    if mm_acc is None:
        from nanoufo.kernels.mm_acc import mm_acc
    dz, hidden = (torch.empty(shape, dtype=torch.bfloat16, device="meta") for shape in ((rows, v), (rows, h)))
    grad_weight = torch.empty(v, h, device="meta")
    with Bytes() as fresh:
        mm_acc(dz.T, hidden)
    with Bytes() as added:
        mm_acc(dz.T, hidden, out=grad_weight)
    operands, accumulator = _nbytes(dz) + _nbytes(hidden), _nbytes(grad_weight)
    row = dict(op="weight_grad_bytes", v=v, h=h, rows=rows, operand_bytes=operands, accumulator_bytes=accumulator)
    for name, counted, gemm in (("fresh", fresh, operands + accumulator), ("added", added, operands + 2 * accumulator)):
        row[name] = dict(bytes=counted.read + counted.written, gemm_bytes=gemm,
                         over_gemm=round((counted.read + counted.written) / gemm, 4), ops=dict(counted.ops))
    return row


VOCAB_PARALLEL = ("scoring", "stats_grad", "stats_grad_vocab_size", "ppo_head")


def head_rows(preset: str = "3b", batch: int = 64, budget: int = 16384, seed: int = 0) -> dict:
    """The LM head's rows over one rollout's packed forwards: every hidden row (before) against the rows that
    predict a sampled token (after), on the synthetic rollout with a UFO-like mix of attempts per row."""
    from common import PRESETS, synthetic_rollout
    from nanoufo.packing import micro_batches, span_lengths
    shape = PRESETS[preset]
    rollout = synthetic_rollout(shape, batch, seed, mixed=True)
    lengths = span_lengths(rollout.turn_spans)
    rows = {name: sum(len(forward.targets) for forward in micro_batches(rollout.tokens, lengths, budget, True, spans))
            for name, spans in (("before", None), ("after", rollout.turn_spans))}
    sampled = int(rollout.loss_mask.sum())
    flops_per_row = 6 * shape.config.hidden_size * shape.config.vocab_size  # forward + backward of the head
    return dict(figure="head_rows", preset=preset, batch=batch, micro_batch_tokens=budget,
                rows_before=rows["before"], rows_after=rows["after"], sampled_tokens=sampled,
                after_over_before=round(rows["after"] / rows["before"], 4),
                head_tflops_saved=round((rows["before"] - rows["after"]) * flops_per_row / 1e12, 2))


def _vocab_parallel_rank(rank: int, store: str, cases: tuple[str, ...], n: int, h: int, v: int) -> None:
    """One of two gloo ranks: counts each case on this rank's half of the vocabulary, into store.rank<r>.json."""
    import torch.distributed as dist
    from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss
    from nanoufo.kernels.linear_token_stats import linear_token_stats
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) / h ** 0.5
    targets, old, adv = torch.randint(0, v, (n,), generator=gen), -torch.rand(n, generator=gen), torch.randn(n)
    start, end = (0, v // 2) if rank == 0 else (v // 2, v)
    h_, w_ = hidden.requires_grad_(), weight[start:end].detach().requires_grad_()
    part = dict(vocab_start=start, group=dist.group.WORLD, impl="triton")
    stats = lambda **kw: sum(o.sum() for o in linear_token_stats(h_, w_, targets, chunk_size=v // 6, **part, **kw))
    runs = dict(scoring=lambda: torch.no_grad()(stats)(), stats_grad=lambda: stats().backward(),
                stats_grad_vocab_size=lambda: stats(vocab_size=v).backward(),
                ppo_head=lambda: linear_ppo_loss(h_, w_, targets, old, adv, torch.ones(n), torch.ones(n) / n,
                                                 entropy_coef=0.01, chunk_rows=n // 4, **part)[0].backward())
    stats()  # warm-up: the interpreter's first launches
    rows = {}
    for case in cases:
        h_.grad = w_.grad = None  # each backward starts without gradients to accumulate into
        rows[case] = count(runs[case]).summary()
    Path(f"{store}.rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def vocab_parallel_counts(cases: tuple[str, ...] = VOCAB_PARALLEL, n: int = 16, h: int = 32,
                          v: int = 300) -> list[dict]:
    """Host syncs, collectives and launches per rank of the vocab-parallel fused heads on two gloo ranks (TP=2,
    the Triton path under the interpreter): scoring (linear_token_stats without grad, 6 vocab chunks), its
    forward + backward (without and with vocab_size), and the head fused with the PPO loss (4 row chunks).
    The ranks hold CPU tensors, so they interpret the Triton path also when this process runs on a GPU
    machine (NANOUFO_TEST_DEVICE=cuda): the spawned ranks get TRITON_INTERPRET=1 whatever this process has."""
    import tempfile
    import torch.multiprocessing as mp
    interpret = os.environ.get("TRITON_INTERPRET")
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        os.environ["TRITON_INTERPRET"] = "1"  # read by the spawned ranks as they import the kernels
        try:
            mp.spawn(_vocab_parallel_rank, args=(store, cases, n, h, v), nprocs=2, join=True)
        finally:
            if interpret is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = interpret
        ranks = [json.loads(Path(f"{store}.rank{r}.json").read_text()) for r in range(2)]
    return [dict(op=f"tp2 {case}", n=n, h=h, v=v, rank0=ranks[0][case], rank1=ranks[1][case]) for case in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="only the SASS count (run without TRITON_INTERPRET)")
    parser.add_argument("--source", help="a token_stats.py to compile instead of this checkout's")
    parser.add_argument("--kernel", default="_token_stats_kernel")
    parser.add_argument("--constexpr", nargs="*", default=[], metavar="NAME=INT",
                        help="compile with these constexprs changed, e.g. BF16_PAIRS=0")
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose kernels/ package is counted")
    parser.add_argument("--bytes", action="store_true", help="only the weight gradient's bytes per row chunk")
    parser.add_argument("--head-rows", action="store_true", help="only the LM head's rows, before -> after")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    if args.bytes:
        print(json.dumps(weight_grad_bytes()))
        return
    if args.head_rows:
        for preset in ("1.5b", "3b"):
            print(json.dumps(head_rows(preset)))
        return
    if args.sass:
        overrides = {name: int(value) for name, value in (item.split("=") for item in args.constexpr)}
        print(json.dumps(sass_report(args.source, args.kernel, overrides)))
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("the counts run the Triton path on the CPU: set TRITON_INTERPRET=1")
    for row in (token_stats_counts(), ppo_loss_counts(), *head_flops(), weight_grad_bytes(), head_rows(),
                *vocab_parallel_counts()):
        print(json.dumps(row))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for kernel in ("_token_stats_kernel", "_token_stats_grad_kernel"):
        sass = [sys.executable, __file__, "--sass", "--root", args.root, "--kernel", kernel]
        print(subprocess.run(sass, env=env, capture_output=True, text=True, check=True).stdout, end="")


if __name__ == "__main__":
    main()
