"""CUDA graphs for the decode step: one graph per batch-size bucket, so a step costs one replay instead of
hundreds of kernel launches from Python. nanoufo.decode.Decoder.step reads and writes only static buffers
(the batch rows, last tokens, lengths, stop flags, the turn limits, the cache), which is what makes it
capturable; a batch of n rows runs the smallest bucket >= n, its extra entries pointing at the decoder's spare
cache row. What a graph cannot change between replays are the host values the step passed when it was
recorded: the sampling temperature, top-p and seed, the bucket sizes and the buffers' addresses. So the graphs
belong to one decoder and are captured once per run: nanoufo.sampler.Decoders keeps both between generate()
calls, and the per-call values (episode ids, turn limits) live in the decoder's buffers.

    use = graphs_wanted(cfg.cuda_graphs, device)   # "auto": on CUDA; "true" on the CPU is an error
    graphs = DecodeGraphs.capture(decoder.step, buckets=[1, 2, 4, 8], device=device, tp_group=group)
    graphs.replay(bucket)   # = decoder.step(bucket); capture returns None on the CPU, raises CaptureFailed

Capture runs each bucket's step twice eagerly on a side stream (Triton compiles, cuBLAS picks its kernels),
then records it, largest bucket first so the smaller graphs reuse its memory pool. It must happen while no row
is live (a step then only writes the spare row). Under tensor parallelism the step's collectives (the
row-parallel all-reduces, the logits' all-gather) run in the warm-up and are recorded into the graphs as NCCL
kernels; the ranks of the TP group agree after recording, before any graph runs: all replay or none does. A
warm-up error is not caught: the warm-up is the eager step itself, so it fails the run on its rank (torchrun
then stops the others) instead of leaving that rank's collectives unpaired. A recording error is caught:
recording runs no collective (it only records them), so every rank reaches the agreement, and on every rank
alike capture raises
CaptureFailed, which nanoufo.sampler.Decoders counts and either survives by decoding eagerly (cuda_graphs
"auto") or lets end the run (an explicit "true"); the CPU is always eager, silently.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_batching.py (bucket choice, padded rows through
the eager step, capture once per run with a stand-in graph, failures, the TP agreement on two gloo ranks); the
graphs themselves only run on a GPU (NANOUFO_TEST_DEVICE=cuda).
"""
from typing import Callable

import torch
import torch.distributed as dist

from nanoufo.options import CUDA_GRAPHS
from nanoufo.parallel import print0

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class CaptureFailed(RuntimeError):
    """Decode graphs could not be recorded on some rank of the TP group (raised on every rank alike)."""


def graphs_wanted(setting: str, device: torch.device | str) -> bool:
    """Whether a run decodes with CUDA graphs: "auto" on a CUDA device, "true" (a CUDA device needed), "false"."""
    if setting not in CUDA_GRAPHS:
        raise ValueError(f"cuda_graphs={setting!r} is not one of {', '.join(CUDA_GRAPHS)}")
    if setting == "true" and not available(device):
        raise ValueError(f"cuda_graphs=true needs a CUDA device; this run's device is {torch.device(device)}")
    return setting == "true" or (setting == "auto" and available(device))


def bucket_for(n: int, buckets: list[int] | tuple[int, ...]) -> int:
    """The smallest bucket that holds n rows."""
    fitting = [b for b in buckets if b >= n]
    if not fitting:
        raise ValueError(f"bucket list {sorted(buckets)} does not cover a batch of {n} rows")
    return min(fitting)


def buckets_for_rows(n_rows: int, buckets: list[int] | tuple[int, ...] | None) -> list[int]:
    """The buckets a run with n_rows cache rows uses: those up to the one that holds all the rows. The
    default list is extended by n_rows itself when needed; a given list that cannot hold n_rows is an error."""
    if buckets is None:
        buckets = [b for b in DEFAULT_BUCKETS if b < n_rows] + [n_rows]
    if any(b < 1 for b in buckets):
        raise ValueError(f"bucket sizes must be >= 1, got {sorted(buckets)}")
    top = bucket_for(n_rows, buckets)
    return sorted(b for b in set(buckets) if b <= top)


def available(device: torch.device | str) -> bool:
    """Whether decode steps on device can be CUDA graphs (the CPU always decodes eagerly)."""
    return torch.device(device).type == "cuda"


def _warm_up(step: Callable[[int], None], buckets: list[int], device: torch.device) -> None:
    """Two eager steps of every bucket on a side stream, as torch.cuda.graph's documentation asks."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for bucket in buckets:
            step(bucket)
            step(bucket)
    torch.cuda.current_stream(device).wait_stream(side)


def _record(step: Callable[[int], None], buckets: list[int], device: torch.device) -> dict:
    """{bucket: torch.cuda.CUDAGraph of step(bucket)}, the largest first, all in its memory pool."""
    graphs, pool = {}, None
    for bucket in sorted(buckets, reverse=True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step(bucket)
        graphs[bucket], pool = graph, graph.pool()
    torch.cuda.empty_cache()  # the warm-up's blocks, cached for its side stream only; the graphs' pool stays
    return graphs


def _all_ranks(flag: bool, device: torch.device, tp_group: dist.ProcessGroup | None) -> bool:
    """flag on every rank of the TP group (an eager all-reduce; True without a group)."""
    if tp_group is None:
        return flag
    everyone = torch.tensor([int(flag)], device=device, dtype=torch.int32)
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN, group=tp_group)
    return bool(everyone.item())


class DecodeGraphs:
    def __init__(self, graphs: dict):
        self.graphs = graphs

    @classmethod
    def capture(cls, step: Callable[[int], None], buckets: list[int], device: torch.device,
                tp_group: dist.ProcessGroup | None = None) -> "DecodeGraphs | None":
        """Graphs of step(bucket) for every bucket; None on the CPU. Raises CaptureFailed on every rank of the
        TP group when recording failed on any of them (see the module docstring for what is agreed when)."""
        if not available(device):
            return None
        _warm_up(step, buckets, device)
        try:
            graphs, error = _record(step, buckets, device), None
        except Exception as e:  # noqa: BLE001 - whatever stops recording, the eager step is always right
            graphs, error = None, f"{type(e).__name__}: {e}".splitlines()[0]
        if not _all_ranks(graphs is not None, device, tp_group) and graphs is not None:
            graphs, error = None, "another tensor-parallel rank could not record its graphs"
        if graphs is None:
            raise CaptureFailed(error)
        tp = "" if tp_group is None else (f", the TP group's all-reduces and all-gather inside them as NCCL "
                                          f"kernels ({dist.get_world_size(tp_group)} ranks)")
        print0(f"CUDA graphs: decode steps captured for buckets {sorted(graphs)}{tp}; replayed until the "
               f"decoder changes")
        return cls(graphs)

    def replay(self, bucket: int) -> None:
        self.graphs[bucket].replay()
