"""Every @triton.jit kernel of kernels/ compiled for sm_90 (H100/H200) and sm_80 (A100) on the CPU, with Triton's
own compiler and its bundled ptxas (no GPU needed), at the launch geometry its launcher picks at real shapes:
Qwen2.5-1.5B/3B/7B (nanoufo/plan.py SHAPES) at TP 1 and 2, the row counts of the two shipped configs
(config/*.py: micro-batch tokens, the whole minibatch when micro_batch_tokens=0, the sampler's max_len, the
prompt limit).

How: each launcher (`<name>_triton`) runs on meta tensors of the real shapes while JITFunction.run is replaced
by a recorder, so the block sizes, num_warps and constexprs are the launcher's own choice (no second copy of
the rule); each recorded launch is specialised as the JIT would on a GPU (pointers 16-byte aligned, integers
by value) and compiled for each target. Registers and local memory per thread (the stack frame, where ptxas
puts spilled registers, plus any local array) come from the bundled cuobjdump -res-usage, shared memory per
block from the compiled kernel. A row fails on a compile error, on any local memory, or on shared memory over
the target's per-block limit (227 KiB on sm_90, 163 KiB on sm_80); every `_*_kernel` of kernels/ must be
compiled at least once.

    python bench/compile_check.py              # one JSON line per kernel variant and target; exit 1 on a failure
    python bench/compile_check.py --markdown   # the summary table of bench/RESULTS.md (per kernel and dtype)

Run it without TRITON_INTERPRET=1 (the interpreter replaces the compiler). Test: tests/test_compile_check.py
"""
import argparse
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}  # arch, shared bytes per block
MODELS = ("Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen2.5-7B")
CONFIGS = ("config/ufo_qwen2.5_3b.py", "config/intuitor_qwen2.5_3b.py")
DECODE_BATCH = 64  # a decode step's rows
META = torch.device("meta")


def nvidia_bin(tool: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame (spills) and local memory per thread of the cubin's kernel (cuobjdump -res-usage)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"compile_check_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        usage = subprocess.run([nvidia_bin("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
    finally:
        path.unlink()
    return {key.lower(): int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL")}


def compile_for(source, arch: int, options: dict):
    """triton.compile of an ASTSource for cuda sm_<arch>, without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# ----------------------------------------------------------------------------- the launchers' launches

@dataclass
class Launch:
    where: str  # the workload that made it
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


@contextmanager
def recording(where: str, launches: list):
    """JITFunction.run records each launch instead of running it (its arguments, meta tensors included)."""
    from triton.runtime.jit import JITFunction
    original = JITFunction.run

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(where, kernel, args, kwargs))
    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def meta(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def workloads() -> dict:
    """{where: a function running the launchers on meta tensors of that real shape}."""
    from nanoufo.config import parse_args
    from nanoufo.plan import SHAPES, episode_tokens
    jobs = {}
    for path in CONFIGS:
        cfg = parse_args([str(ROOT / path)], check_paths=False)
        name = Path(path).stem.split("_")[0]
        for model in MODELS:
            shape = SHAPES[model]
            max_len = episode_tokens(cfg, shape["max_position_embeddings"])
            tokens = {cfg.micro_batch_tokens: f"{cfg.micro_batch_tokens} tokens",
                      cfg.minibatch_size * max_len: "micro_batch_tokens=0"}
            for tp in (1, 2):
                v = -(-shape["vocab_size"] // tp)  # rank 0's slice, the larger of an uneven split
                for n, what in tokens.items():
                    jobs[f"train {name} {model} tp{tp} {what}"] = lambda n=n, v=v, h=shape["hidden_size"], tp=tp, \
                        cfg=cfg: train(n, v, h, tp, cfg)
                for dtype in (torch.bfloat16, torch.float32):
                    jobs[f"decode {name} {model} tp{tp} {str(dtype)[6:]}"] = lambda shape=shape, tp=tp, dtype=dtype, \
                        s=max_len, p=cfg.max_prompt_tokens: decode(shape, tp, s, p, dtype)
    jobs["token_stats bf16 16384 x 151936"] = lambda: token_stats_bf16(16384, SHAPES["Qwen2.5-3B"]["vocab_size"])
    jobs["ppo_loss 64 x 5760 (a padded minibatch)"] = lambda: ppo_loss((64, 5760), True, "k3", weights=False)
    for v in sorted({s["vocab_size"] for s in SHAPES.values()}):
        jobs[f"sample {DECODE_BATCH} x {v}"] = lambda v=v: sample(DECODE_BATCH, v)
    return jobs


def train(n_tokens: int, v: int, h: int, tp: int, cfg) -> None:
    """One micro-batch of the update (linear_ppo_loss: row chunks of fp32 logits, the statistics, their
    gradient, the PPO loss on one row, the head's weight gradient added in place) and of scoring
    (linear_token_stats: vocab chunks, forward + backward, the hidden gradient added in place)."""
    from nanoufo.kernels.linear_ppo_loss import default_chunk_rows
    from nanoufo.kernels.linear_token_stats import DEFAULT_CHUNK
    from nanoufo.kernels.mm_acc import mm_acc_triton
    from nanoufo.kernels.token_stats import (SliceConfig, token_stats_grad_triton, token_stats_partial_triton,
                                             token_stats_triton)
    stats_cfg = SliceConfig(impl="triton")
    rows = min(n_tokens, default_chunk_rows(v))
    for r in {rows, n_tokens % rows} - {0}:  # a full row chunk and the last, shorter one
        logits, targets, lse = meta(r, v), meta(r, dtype=torch.long), meta(r)
        if tp == 1:
            token_stats_triton(logits, targets, stats_cfg)
        else:
            token_stats_partial_triton(logits, targets, stats_cfg)
        token_stats_grad_triton(logits, targets, lse, lse, (lse, lse, None), v, stats_cfg, torch.bfloat16)
        mm_acc_triton(meta(r, v, dtype=torch.bfloat16).T, meta(r, h, dtype=torch.bfloat16), meta(v, h))  # grad_W +=
    ppo_loss((1, n_tokens), cfg.kl_in == "loss", cfg.kl_estimator, cfg.kl_clamp or None)  # one row of tokens
    for c in {DEFAULT_CHUNK, v % DEFAULT_CHUNK} - {0}:  # scoring: vocab chunks of fp32 logits
        logits, targets, lse = meta(n_tokens, c), meta(n_tokens, dtype=torch.long), meta(n_tokens)
        token_stats_partial_triton(logits, targets, stats_cfg)
        token_stats_grad_triton(logits, targets, lse, lse, (lse, lse, lse), v, stats_cfg, torch.bfloat16)
        mm_acc_triton(meta(n_tokens, c, dtype=torch.bfloat16), meta(c, h, dtype=torch.bfloat16), meta(n_tokens, h))


def ppo_loss(shape: tuple[int, int], with_ref: bool, kl_estimator: str, kl_clamp: float | None = None,
             weights: bool = True) -> None:
    """The PPO loss forward and backward (to logp and entropy, as linear_ppo_loss takes it) on (B, T) tokens,
    per-token weights or a seq-mean."""
    from nanoufo.kernels.ppo_loss import PPOConfig, ppo_loss_triton
    logp, entropy = meta(*shape).requires_grad_(), meta(*shape).requires_grad_()
    cfg = PPOConfig(aggregation="weights" if weights else "seq-mean", kl_estimator=kl_estimator, kl_clamp=kl_clamp)
    loss, _ = ppo_loss_triton(logp, entropy, meta(*shape), meta(*shape), meta(*shape, dtype=torch.bool),
                              meta(*shape) if with_ref else None, meta(*shape) if weights else None, cfg)
    loss.backward()


def decode(shape: dict, tp: int, max_len: int, prompt_tokens: int, dtype: torch.dtype) -> None:
    """The cached path's kernels: a decode step of DECODE_BATCH rows and a prefill of prompt_tokens tokens."""
    from nanoufo.kernels.decode_attention import decode_attention_triton
    from nanoufo.kernels.rms_norm import add_rms_norm_triton
    from nanoufo.kernels.rope_kv_append import rope_kv_append_triton
    from nanoufo.kernels.silu_mul import silu_mul_triton
    h, d = shape["hidden_size"], shape["hidden_size"] // shape["num_attention_heads"]
    hq, hkv = shape["num_attention_heads"] // tp, shape["num_key_value_heads"] // tp
    i = shape["intermediate_size"] // tp
    cache = meta(DECODE_BATCH + 1, max_len, hkv, d, dtype=dtype)
    rows = meta(DECODE_BATCH, dtype=torch.long)
    for t in (1, prompt_tokens):
        b = DECODE_BATCH if t == 1 else 1
        cos = meta(b, t, 1, d, dtype=dtype)
        pos = meta(b, t, dtype=torch.long)
        rope_kv_append_triton(meta(b, t, (hq + 2 * hkv) * d, dtype=dtype), cos, cos, cache, cache, rows[:b], pos, hq)
        x = meta(b, t, h, dtype=dtype)
        add_rms_norm_triton(x, meta(h, dtype=dtype), 1e-6, x)
        add_rms_norm_triton(x, meta(h, dtype=dtype), 1e-6)
        silu_mul_triton(meta(b, t, 2 * i, dtype=dtype))
    decode_attention_triton(meta(DECODE_BATCH, 1, hq, d, dtype=dtype), cache, cache,
                            meta(DECODE_BATCH, 1, dtype=torch.long), rows)


def token_stats_bf16(n: int, v: int) -> None:
    """The public token_stats on bf16 logits (forward and backward)."""
    from nanoufo.kernels.token_stats import SliceConfig, token_stats_grad_triton, token_stats_triton
    logits, targets, lse = meta(n, v, dtype=torch.bfloat16), meta(n, dtype=torch.long), meta(n)
    stats_cfg = SliceConfig(impl="triton")
    token_stats_triton(logits, targets, stats_cfg)
    try:
        token_stats_triton(logits, targets, SliceConfig(impl="triton", debug=True))
    except NotImplementedError:  # after the launch, debug reads the kernel's findings: a meta tensor has none
        pass
    token_stats_grad_triton(logits, targets, lse, lse, (lse, lse, lse), v, stats_cfg, torch.bfloat16)


def sample(n: int, v: int) -> None:
    from nanoufo.kernels.sampling import sample_triton
    logits, ids = meta(n, v), meta(n, dtype=torch.long)
    for temperature, top_p in ((1.0, 1.0), (1.0, 0.9), (0.0, 1.0)):
        sample_triton(logits, temperature, top_p, 0, ids)


# ----------------------------------------------------------------------------- specialise, compile, check

def specialise(launch: Launch, arch: int):
    """(ASTSource, options) as JITFunction.run builds them on a GPU of compute capability arch."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", kernel.debug) or knobs.runtime.debug)
    if hasattr(knobs.compilation, "instrumentation_mode"):  # Triton >= 3.6 passes it, 3.5 has no such knob
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def variant_name(source) -> str:
    """The kernel, the dtype of its first pointer (its main input) and its constexprs, e.g.
    _token_stats_kernel[*bf16 DEBUG=False ...]."""
    names = source.fn.arg_names
    dtype = next(t for t in source.signature.values() if t.startswith("*"))
    values = [f"{names[path[0]]}={getattr(value, '__name__', value)}"
              for path, value in sorted(source.constants.items())]
    aligned = [f"{names[path[0]]}%16" for path, attr in sorted(source.attrs.items())  # integers the JIT saw % 16 == 0
               if attr and not source.signature[names[path[0]]].startswith("*")]
    return f"{source.fn.__name__}[{' '.join([dtype, *values, *aligned])}]"


def compile_row(job: tuple) -> dict:
    """Compile one variant for one target: its registers, spills and shared memory, and whether it passes."""
    name, target, source, options, where = job
    arch, shared_limit = TARGETS[target]
    row = dict(kernel=name, target=target, num_warps=options.num_warps, where=where)
    try:
        compiled = compile_for(source, arch, options.__dict__)
    except Exception as error:  # noqa: BLE001 - a compile error is this row's result
        return row | dict(ok=False, error=f"{type(error).__name__}: {str(error).splitlines()[0]}")
    usage = resource_usage(compiled.asm["cubin"])
    spills = usage["stack"] + usage["local"]  # ptxas spills into the stack frame
    problems = ([f"{spills} B of local memory (spills)"] if spills else []) + (
        [f"{compiled.metadata.shared} B shared memory > {shared_limit}"] if compiled.metadata.shared > shared_limit
        else [])
    return row | dict(registers=usage["reg"], spill_bytes=spills, shared_bytes=compiled.metadata.shared,
                      ok=not problems, error="; ".join(problems))


def jobs_for(targets: list[str]) -> list[tuple]:
    """Every distinct (kernel variant, target) the workloads launch, with the first workload that made it."""
    jobs = {}
    for target in targets:
        arch, _ = TARGETS[target]
        for where, run in workloads().items():
            launches = []
            with recording(where, launches):
                run()
            for launch in launches:
                source, options = specialise(launch, arch)
                key = (target, source.hash(), repr(sorted(options.__dict__.items())))
                jobs.setdefault(key, (variant_name(source), target, source, options, where))
    return list(jobs.values())


def every_kernel() -> set[str]:
    """The names of the launched kernels (`_*_kernel`) defined in kernels/."""
    from triton.runtime.jit import JITFunction
    names = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        module = importlib.import_module(f"nanoufo.kernels.{path.stem}")
        names |= {n for n, obj in vars(module).items() if isinstance(obj, JITFunction) and n.endswith("_kernel")
                  and obj.__module__ == module.__name__}
    return names


_JOBS: list[tuple] = []  # what the forked workers compile, by index (a JITFunction does not pickle)


def _compile_job(index: int) -> dict:
    return compile_row(_JOBS[index])


def check(targets: list[str], workers: int = 2) -> list[dict]:
    _JOBS[:] = jobs_for(targets)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_compile_job, range(len(_JOBS))))
    missed = every_kernel() - {row["kernel"].split("[")[0] for row in rows}
    return rows + [dict(kernel=name, target="-", ok=False, error="never launched by a workload")
                   for name in sorted(missed)]


def markdown(rows: list[dict]) -> str:
    """One line per kernel and main input dtype: its variants (distinct compiles per target), and per target the
    registers (fewest-most), the most local memory (spills) and shared memory of any variant, and whether all of
    them passed."""
    groups = {}
    for row in rows:
        name, _, rest = row["kernel"].partition("[")
        groups.setdefault((name, rest.split(" ")[0].lstrip("*")), []).append(row)
    lines = ["| kernel | input | variants | " + " | ".join(f"{t} registers | {t} spills (B) | {t} shared (B)"
                                                         for t in TARGETS) + " | all pass |",
             "|---|---|---|" + "---|---|---|" * len(TARGETS) + "---|"]
    for (name, dtype), group in sorted(groups.items()):
        cells = []
        for target in TARGETS:
            done = [r for r in group if r["target"] == target and "registers" in r]
            regs = sorted({r["registers"] for r in done}) or ["-"]
            cells += [f"{regs[0]}-{regs[-1]}" if len(regs) > 1 else str(regs[0]),
                      str(max((r["spill_bytes"] for r in done), default="-")),
                      str(max((r["shared_bytes"] for r in done), default="-"))]
        variants = max(sum(r["target"] == target for r in group) for target in TARGETS)  # compiles per target
        verdict = "yes" if all(r["ok"] for r in group) else "NO: " + "; ".join(r["error"] for r in group if not r["ok"])
        lines.append(f"| `{name}` | {dtype} | {variants} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--markdown", action="store_true", help="print the markdown table instead of JSON lines")
    parser.add_argument("--workers", type=int, default=2, help="compiles in parallel")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")
    sys.path.insert(0, str(ROOT))
    rows = check(args.targets, args.workers)
    print(markdown(rows) if args.markdown else "\n".join(json.dumps(row) for row in rows))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
