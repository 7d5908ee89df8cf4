"""CUDA graphs for the decode step: one graph per batch-size bucket, so a step costs one replay instead of
hundreds of kernel launches from Python. nanoufo.decode.Decoder.step reads and writes only static buffers
(the batch rows, last tokens, lengths, stop flags, the turn limits, the cache), which is what makes it
capturable; a batch of n rows runs the smallest bucket >= n, its extra entries pointing at the decoder's spare
cache row. What a graph cannot change between replays are the host values the step passed when it was
recorded: the sampling temperature, top-p and seed, the bucket sizes and the buffers' addresses. So the graphs
belong to one decoder and are captured once per run: nanoufo.sampler.Decoders keeps both between generate()
calls, and the per-call values (episode ids, turn limits) live in the decoder's buffers.

    graphs = DecodeGraphs.capture(decoder.step, buckets=[1, 2, 4, 8], device=device, tp_group=group)  # or None
    graphs.replay(bucket)   # = decoder.step(bucket)

Capture runs each bucket's step twice on a side stream (Triton compiles, cuBLAS picks its kernels), then
records it, largest bucket first so the smaller graphs reuse its memory pool. It must happen while no row
is live (a step then only writes the spare row). Under tensor parallelism the step's collectives (the
row-parallel all-reduces, the logits' all-gather) are recorded into the graphs as NCCL kernels, and the ranks
of the TP group agree: all replay graphs or all decode eagerly, so their collectives keep pairing up. Any
failure (an op that cannot be captured) falls back to the eager step with one warning line, never a wrong
token; the CPU is always eager, silently.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_batching.py (bucket choice, padded rows through
the eager step, capture once per run with a stand-in graph, the fallback); the graphs themselves only run on
a GPU (NANOUFO_TEST_DEVICE=cuda).
"""
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from nanoufo.parallel import print0

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


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


def available(device: torch.device) -> bool:
    """Whether decode steps on device can be CUDA graphs (the CPU always decodes eagerly)."""
    return torch.device(device).type == "cuda"


def _capture_cuda(step: Callable[[int], None], buckets: list[int], device: torch.device) -> dict:
    """{bucket: torch.cuda.CUDAGraph of step(bucket)}: warm-up on a side stream, then the captures."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for bucket in buckets:
            step(bucket)
            step(bucket)
    torch.cuda.current_stream(device).wait_stream(side)
    graphs, pool = {}, None
    for bucket in sorted(buckets, reverse=True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step(bucket)
        graphs[bucket], pool = graph, graph.pool()
    return graphs


class DecodeGraphs:
    def __init__(self, graphs: dict):
        self.graphs = graphs

    @classmethod
    def capture(cls, step: Callable[[int], None], buckets: list[int], device: torch.device,
                tp_group: dist.ProcessGroup | None = None) -> "DecodeGraphs | None":
        """Graphs of step(bucket) for every bucket, or None (eager) on the CPU or, with one warning, when
        capture fails on any rank of the TP group."""
        if not available(device):
            return None
        try:
            graphs, error = _capture_cuda(step, buckets, device), None
        except Exception as e:  # noqa: BLE001 - whatever stops capture, the eager step is always right
            graphs, error = None, f"{type(e).__name__}: {e}".splitlines()[0]
        if tp_group is not None:  # every TP rank replays or none does
            everyone = torch.tensor([graphs is not None], device=device, dtype=torch.int32)
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN, group=tp_group)
            if graphs is not None and not everyone.item():
                graphs, error = None, "another tensor-parallel rank could not capture"
        if graphs is None:
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {error}", stacklevel=2)
            return None
        tp = "" if tp_group is None else (f", the TP group's all-reduces and all-gather inside them as NCCL "
                                          f"kernels ({dist.get_world_size(tp_group)} ranks)")
        print0(f"CUDA graphs: decode steps captured for buckets {sorted(graphs)}{tp}; replayed until the "
               f"decoder changes")
        return cls(graphs)

    def replay(self, bucket: int) -> None:
        self.graphs[bucket].replay()
