"""Shared pieces of the kernel microbenchmarks: the hardware roofline table (DESIGN.md section 5),
collection of bench_*.py files, and `measure`, which times a callable with pytest-benchmark and
records achieved GB/s or TFLOP/s, the fraction of the roofline and the peak memory in extra_info.

    make bench      # = TRITON_INTERPRET=1 python -m pytest -q bench --benchmark-only
    python -m pytest -q bench --benchmark-only --benchmark-json=bench.json   # on a GPU machine

On CUDA the benchmarks use the real shapes (V = 151936, H = 2048 and 3584, N from 1k to 16k); on the
CPU they use tiny shapes and the PyTorch reference, so only the harness is exercised, and they skip
torch.compile (its CPU compile alone takes tens of seconds here) and the roofline fraction.
"""
from typing import Callable

import pytest
import torch

# name fragment of torch.cuda.get_device_name() -> (HBM bytes/s, bf16 dense FLOP/s)
ROOFLINES = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
V_REAL = 151936


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default only takes test_*.py, or a file named on
    the command line, which it collects itself)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def roofline() -> tuple[float, float] | None:
    """(bytes/s, FLOP/s) of this GPU, or None on the CPU or an unlisted GPU."""
    if not ON_GPU:
        return None
    name = torch.cuda.get_device_name()
    return next((row for key, row in ROOFLINES.items() if key in name), None)


def skip_unless(impl: str) -> None:
    """Skip impls that cannot run here: compile on the CPU, liger when not installed."""
    if impl == "compile" and not ON_GPU:
        pytest.skip("torch.compile skipped on the CPU: compiling takes longer than the whole CPU run")
    if impl.startswith("liger"):
        pytest.importorskip("liger_kernel", reason="Liger-Kernel not installed")


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def measure(benchmark, fn: Callable[[], object], *, bytes_moved: float | None = None,
            flops: float | None = None, **info) -> None:
    """Time fn (synchronised) and record throughput, roofline fraction and peak memory."""
    def run():
        fn()
        _sync()
    rounds = 10 if ON_GPU else 3
    run()  # warm-up: compilation, autotuning, allocator
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1 if ON_GPU else 0, iterations=1)
    seconds = benchmark.stats.stats.median
    peak = roofline()
    extra = dict(info, device=torch.cuda.get_device_name() if ON_GPU else "cpu", median_ms=seconds * 1e3)
    if bytes_moved is not None:
        extra["GB/s"] = bytes_moved / seconds / 1e9
        if peak:
            extra["hbm_roofline_fraction"] = bytes_moved / seconds / peak[0]
    if flops is not None:
        extra["TFLOP/s"] = flops / seconds / 1e12
        if peak:
            extra["bf16_roofline_fraction"] = flops / seconds / peak[1]
    if ON_GPU:
        extra["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info.update(extra)
