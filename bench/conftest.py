"""Shared pieces of the kernel microbenchmarks: the hardware roofline table,
collection of bench_*.py files, and `measure`, which times a callable with pytest-benchmark and
records achieved GB/s or TFLOP/s, the fraction of the roofline and the peak memory in extra_info.

    make bench      # = TRITON_INTERPRET=1 python -m pytest -q bench --benchmark-only
    python -m pytest -q bench --benchmark-only --benchmark-json=bench.json   # on a GPU machine

On CUDA the benchmarks use the real shapes (V = 151936, H = 2048 and 3584, N from 1k to 16k); on the
CPU they use tiny shapes and the PyTorch reference, so only the harness is exercised, and they skip
torch.compile (its CPU compile alone takes tens of seconds here) and the roofline fraction.
Bench files take `measure` and `device` as fixtures: importing this file by name would pick up
tests/conftest.py instead when both folders are collected.
"""
import importlib.util
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch

from hardware import roofline  # the roofline table, shared with the end-to-end scripts

ON_GPU = torch.cuda.is_available()
HERE = Path(__file__).parent


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules (pytest's default only takes test_*.py, or a file named on
    the command line, which it collects itself)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    """Skip the impl rows that cannot run here: compile on the CPU, liger when not installed."""
    no_compile = pytest.mark.skip(reason="torch.compile skipped on the CPU: compiling takes longer than the whole CPU run")
    no_liger = pytest.mark.skip(reason="Liger-Kernel not installed")
    liger = importlib.util.find_spec("liger_kernel") is not None
    for item in items:
        impl = getattr(item, "callspec", None) and item.callspec.params.get("impl")
        if HERE not in Path(item.fspath).parents or not impl:
            continue
        if impl == "compile" and not ON_GPU:
            item.add_marker(no_compile)
        if impl.startswith("liger") and not liger:
            item.add_marker(no_liger)


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def measure(benchmark) -> Callable:
    """measure(fn, bytes_moved=..., flops=..., **info): see _measure."""
    return partial(_measure, benchmark)


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _measure(benchmark, fn: Callable[[], object], *, bytes_moved: float | None = None,
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
