"""CUDA graphs for the decode step: one graph per batch-size bucket, so a step costs one replay instead of
hundreds of kernel launches from Python. nanoufo.decode.Decoder.step reads and writes only static buffers
(the batch rows, last tokens, lengths, stop flags, the cache), which is what makes it capturable; a batch of
n rows runs the smallest bucket >= n, its extra entries pointing at the decoder's spare cache row.

    graphs = DecodeGraphs.capture(decoder.step, buckets=[1, 2, 4, 8], device=device)  # None: stay eager
    graphs.replay(bucket)   # = decoder.step(bucket)

Capture runs each bucket's step twice on a side stream (Triton compiles, cuBLAS picks its kernels), then
records it, largest bucket first so the smaller graphs reuse its memory pool. It must happen while no row
is live (a step then only writes the spare row). Any failure (no CUDA, an op that cannot be captured) falls
back to the eager step with one warning line, never a wrong token. The CPU is always eager.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_batching.py (bucket choice, padded rows through
the eager step, the fallback); the graphs themselves only run on a GPU.
"""
import warnings
from typing import Callable

import torch

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


class DecodeGraphs:
    def __init__(self, graphs: dict[int, "torch.cuda.CUDAGraph"]):
        self.graphs = graphs

    @classmethod
    def capture(cls, step: Callable[[int], None], buckets: list[int], device: torch.device) -> "DecodeGraphs | None":
        """Graphs of step(bucket) for every bucket, or None (with one warning) if capture is not possible."""
        try:
            if torch.device(device).type != "cuda":
                raise RuntimeError(f"CUDA graphs need a CUDA device, not {device}")
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
            return cls(graphs)
        except Exception as e:  # noqa: BLE001 - whatever stops capture, the eager step is always right
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {type(e).__name__}: {e}".splitlines()[0],
                          stacklevel=2)
            return None

    def replay(self, bucket: int) -> None:
        self.graphs[bucket].replay()
