"""Launch a function on N gloo processes from inside pytest, as torchrun would (RANK, WORLD_SIZE, ...).

    outcomes = run_ranks(check_tp, world_size=2, args=(ckpt_dir,))   # one Outcome per rank
    values = launch(check_tp, world_size=2, args=(ckpt_dir,))        # the return values; raises on any failure

The function must be importable by name (module level in a test file); it runs in a fresh "spawn" process,
so it imports torch itself and the launch costs a few seconds: share one launch across several checks.
Return plain Python values (floats, lists): tensors sent between processes need their sender alive.
The children run the kernels' PyTorch references (TRITON_INTERPRET is unset in them): the kernels' own tests
check Triton against those references, these check the parallel logic, and interpreting Triton in two
processes would take most of the test budget.
Not a test file; its users: python -m pytest -q tests/test_parallel.py tests/test_dp_statistics.py
tests/test_micro_batches.py tests/test_prm.py
"""
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass


@dataclass
class Outcome:
    rank: int
    value: object = None
    error: str | None = None  # the child's traceback
    exitcode: int | None = None  # None: still running at the deadline, then killed
    seconds: float = 0.0  # from start until the child reported (or the deadline)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world_size: int, port: int, results, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports the kernels
    import torch
    torch.set_num_threads(1)  # two processes share the test machine's cores
    try:
        results.put((rank, fn(*args), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 120.0,
              kill_on_error: bool = False) -> list[Outcome]:
    """Run fn(*args) on world_size processes; a process still running at the deadline is killed. With
    kill_on_error, as under torchrun, the deadline moves to 5 s after the first rank reports an error. A port
    that another process took between free_port and rank 0's store (tests run in parallel under pytest-xdist)
    is given up for a new one, up to three times."""
    for _ in range(3):
        outcomes = _run_ranks_once(fn, world_size, args, timeout_s, kill_on_error)
        if not any(o.error and "EADDRINUSE" in o.error for o in outcomes):
            break
    return outcomes


def _run_ranks_once(fn, world_size: int, args: tuple, timeout_s: float, kill_on_error: bool) -> list[Outcome]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port, start = free_port(), time.monotonic()
    deadline = start + timeout_s
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, results, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes = [Outcome(r) for r in range(world_size)]
    pending = set(range(world_size))
    while pending and time.monotonic() < deadline:
        silent = all(not procs[r].is_alive() for r in pending)  # then only their last words may be queued
        try:
            rank, value, error = results.get(timeout=1.0 if silent else 0.2)
        except queue.Empty:
            if silent:
                break
            continue
        outcomes[rank].value, outcomes[rank].error = value, error
        outcomes[rank].seconds = time.monotonic() - start
        pending.discard(rank)
        if error and kill_on_error:
            deadline = min(deadline, time.monotonic() + 5.0)
    for o, p in zip(outcomes, procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            o.seconds = deadline - start
        else:
            o.exitcode = p.exitcode
    return outcomes


def launch(fn, world_size: int = 2, args: tuple = (), timeout_s: float = 120.0) -> list:
    """run_ranks, then raise with every failing rank's traceback; returns each rank's value."""
    outcomes = run_ranks(fn, world_size, args, timeout_s, kill_on_error=True)
    failures = [o for o in outcomes if o.error or o.exitcode != 0]
    if failures:
        raise AssertionError("\n".join(f"rank {o.rank} (exit code {o.exitcode}):\n{o.error or 'no report'}"
                                       for o in failures))
    return [o.value for o in outcomes]
