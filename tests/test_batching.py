"""The sampler's device-resident decode loop, continuous batching and CUDA-graph plumbing (nanoufo/decode.py,
nanoufo/sampler.py, nanoufo/cuda_graphs.py): no host sync between two stop checks, padded static-buffer
steps equal unpadded ones, each episode gets the tokens it gets alone, the KV cache stays within its budget,
bad settings fail before sampling; with a stand-in graph on the CPU, a run captures each bucket once over
rollouts of any prompt lengths, and a failed capture is counted, said, and fatal when required, on every
tensor-parallel rank alike (two gloo ranks); on a GPU (NANOUFO_TEST_DEVICE=cuda, bench/gpu_session.sh) the
model runs there and CUDA-graph steps equal eager ones.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_batching.py
    NANOUFO_TEST_DEVICE=cuda python -m pytest -q tests/test_batching.py -k "sync or graph"
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from distributed_utils import launch
from kernel_device import DEVICE, ON_GPU, needs_triton
from nanoufo import sampler as sampler_module
from torch.utils._python_dispatch import TorchDispatchMode

from nanoufo import cuda_graphs
from nanoufo.cuda_graphs import CaptureFailed, DecodeGraphs, bucket_for, buckets_for_rows, graphs_wanted
from nanoufo.decode import kv_bytes_per_row
from nanoufo.model import KVCache
from nanoufo.options import SamplingOptions
from nanoufo.sampler import Decoders, generate, run_max_len
from nanoufo.weights import load_model
from test_sampler import PROMPTS, Script, sampling_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
launches = importlib.import_module("launches")

EPISODE_PROMPTS = PROMPTS + [[11, 12, 13, 14], [50, 51], [70, 71, 72, 73, 74, 75]]
TURNS = [3, 1, 2, 3, 2, 1, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_model
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model(seed=3).save_pretrained(path)
    return load_model(path, device=DEVICE).eval()


def run(model, prompts, turns, **kw):
    """generate() with these defaults; kw's SamplingOptions keys go into its sampling."""
    kw = {"max_turns": 3, "max_new_tokens": 5, "temperature": 1.0, "seed": 7, "max_len": 40, **kw}
    return generate(model, prompts, Script(turns), sampling_of(kw), **kw)


def first_emitted_token(model, prompt):
    """A token the model emits greedily soon after the prompt, used as a stop token (so stops happen)."""
    out = generate(model, [prompt], lambda rows, *_: [None] * len(rows),
                   SamplingOptions(max_new_tokens=3, temperature=0.0), max_turns=1, stop_ids=[])
    return int(out.tokens[0, len(prompt) + 2])


def episode_tokens(rollout, b):
    return rollout.tokens[b, :int(rollout.lengths[b])].tolist()


@needs_triton
def test_no_host_sync_between_two_stop_checks(tiny, monkeypatch):
    """On the GPU code path (Triton kernels, here under the interpreter) the steps between two polls raise on
    .item(), .tolist(), .cpu(), nonzero or a device-to-host copy; the whole rollout still completes."""
    decode, guarded = sampler_module._Run.decode, []

    def decode_without_syncs(self, rows):
        with launches.forbidding_host_syncs():
            decode(self, rows)
        guarded.append(self.n_decode_steps)
    monkeypatch.setattr(sampler_module._Run, "decode", decode_without_syncs)
    stop = first_emitted_token(tiny, PROMPTS[1])
    rollout = run(tiny, PROMPTS, [2, 1, 1, 2], stop_ids=[stop], max_new_tokens=4, sync_every=3)
    assert guarded and guarded[-1] == rollout.n_decode_steps and int(rollout.loss_mask.sum()) > 8
    with pytest.raises(launches.HostSync):  # and the guard does catch a sync
        with launches.forbidding_host_syncs():
            torch.ones(2).sum().item()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padded_static_buffer_steps_equal_unpadded(tiny, torch_paths, temperature):
    """Buckets pad each decode batch with the spare cache row, as a CUDA graph replay runs it."""
    stop = first_emitted_token(tiny, PROMPTS[1])
    kw = dict(stop_ids=[stop], temperature=temperature)
    plain = run(tiny, EPISODE_PROMPTS, TURNS, **kw)
    padded = run(tiny, EPISODE_PROMPTS, TURNS, buckets=[2, 8], sync_every=2, **kw)
    assert torch.equal(plain.tokens, padded.tokens) and torch.equal(plain.loss_mask, padded.loss_mask)
    assert (plain.logprobs - padded.logprobs).abs().max() < 1e-5


def test_continuous_batching_gives_each_episode_its_tokens_alone_within_the_kv_budget(tiny, torch_paths,
                                                                                      monkeypatch):
    stop = first_emitted_token(tiny, PROMPTS[1])
    budget = 3 * kv_bytes_per_row(tiny, 40)  # 2 episodes at a time + the spare row
    allocated, rows_used = [], []
    allocate, forward = KVCache.allocate.__func__, tiny.forward
    with monkeypatch.context() as m:
        m.setattr(KVCache, "allocate", classmethod(lambda cls, *a, **k: allocated.append(
            allocate(cls, *a, **k)) or allocated[-1]))
        m.setattr(tiny, "forward", lambda ids, pos, cache=None, cache_rows=None, **kw: (
            rows_used.append((ids.shape[1], cache_rows.tolist())) or forward(ids, pos, cache, cache_rows, **kw)))
        batched = run(tiny, EPISODE_PROMPTS, TURNS, stop_ids=[stop], kv_budget_gb=budget / 2**30)
    assert len(allocated) == 1 and sum(t.numel() * t.element_size() for t in (allocated[0].k, allocated[0].v)) <= budget
    assert {r for _, rows in rows_used for r in rows} == {0, 1}  # 7 episodes went through 2 rows
    assert max(len(rows) for _, rows in rows_used) == 2
    for b, prompt in enumerate(EPISODE_PROMPTS):
        script = Script(TURNS)  # answers as it would to episode b
        alone = generate(tiny, [prompt], lambda rows, *a: script([b] * len(rows), *a),
                         SamplingOptions(max_new_tokens=5, temperature=1.0), max_turns=3, seed=7, max_len=40,
                         stop_ids=[stop], episode_ids=[b])
        assert episode_tokens(batched, b) == episode_tokens(alone, 0), f"episode {b}"
        assert batched.turn_spans[b] == alone.turn_spans[0]
        n = int(alone.lengths[0])
        assert (batched.logprobs[b, :n] - alone.logprobs[0, :n]).abs().max() < 1e-5
    assert sum(len(s) for s in batched.turn_spans) == sum(TURNS)


def test_bad_settings_fail_before_sampling(tiny, torch_paths, monkeypatch):
    monkeypatch.setattr(tiny, "forward", lambda *a, **k: pytest.fail("the model ran"))
    script = Script([1] * 4)
    row = kv_bytes_per_row(tiny, 40)
    with pytest.raises(ValueError, match=rf"KV budget of {row:,} bytes holds no episode: a row of max_len=40"):
        generate(tiny, PROMPTS, script, SamplingOptions(max_new_tokens=3, kv_budget_gb=row / 2**30), max_turns=1,
                 stop_ids=[], max_len=40)
    with pytest.raises(ValueError, match=r"bucket list \[1, 2\] does not cover a batch of 4 rows"):
        generate(tiny, PROMPTS, script, SamplingOptions(max_new_tokens=3), max_turns=1, stop_ids=[], buckets=[1, 2])
    with pytest.raises(ValueError, match="prompt 0 has 7 tokens, more than max_len=6"):
        generate(tiny, PROMPTS, script, SamplingOptions(max_new_tokens=3), max_turns=1, stop_ids=[], max_len=6)
    assert script.calls == []


def test_bucket_choice():
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert buckets_for_rows(5, None) == [1, 2, 4, 5]  # the default list, topped by the row count
    assert buckets_for_rows(6, [8, 1, 4, 16]) == [1, 4, 8]  # buckets past the one holding every row: unused
    with pytest.raises(ValueError, match=">= 1"):
        buckets_for_rows(3, [0, 4])


def two_rollouts(model, stop: int, temperature: float, **kw) -> list:
    """Two rollouts of a run: other episodes (ids), fewer of them, other turn limits; the same sampling."""
    kw = dict(stop_ids=[stop], temperature=temperature, buckets=[2, 4, 8], **kw)
    return [run(model, EPISODE_PROMPTS, TURNS, episode_ids=range(7), **kw),
            run(model, EPISODE_PROMPTS[:5], TURNS, episode_ids=range(7, 12), max_new_tokens=3, max_len=30, **kw)]


def same_rollouts(a: list, b: list) -> bool:
    return all(torch.equal(x.tokens, y.tokens) and (x.logprobs - y.logprobs).abs().max() < 1e-5 for x, y in zip(a, b))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (NANOUFO_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_graph_steps_equal_eager_steps_across_rollouts_of_one_capture(tiny, temperature):
    stop = first_emitted_token(tiny, PROMPTS[1])
    eager, decoders = two_rollouts(tiny, stop, temperature), Decoders(required=True)  # a failed capture raises
    graphs = two_rollouts(tiny, stop, temperature, cuda_graphs="true", decoders=decoders)
    assert decoders.captures == 3 and decoders.graphs is not None and same_rollouts(eager, graphs)
    assert all(r.n_graph_replays == r.n_decode_steps > 0 for r in graphs)


class FakeGraph:
    """torch.cuda.CUDAGraph's stand-in on the CPU: capture runs step(bucket) and records the host values it
    hands every aten op and Triton kernel (tensors by shape and dtype); replay runs the step again and fails if
    any of them changed, which a real graph would not see (it replays the recorded ones)."""

    def __init__(self, step, bucket: int):
        self.step, self.bucket, self.replays = step, bucket, 0
        self.trace = self.traced()

    def traced(self) -> list:
        trace = []
        counter = launches.LaunchCounter()
        counter.launch = lambda name: trace.append(name)
        with launches.counting(counter), HostValues(trace):
            self.step(self.bucket)
        return trace

    def replay(self) -> None:
        assert self.traced() == self.trace, "a host value recorded in the graph changed between replays"
        self.replays += 1


def _host(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_host(i) for i in x)
    return x if isinstance(x, (int, float, bool, str, type(None))) else str(x)


class HostValues(TorchDispatchMode):
    """Appends (op, its host values) for every aten op, and each Triton launch's arguments, to trace."""

    def __init__(self, trace: list):
        super().__init__()
        self.trace = trace

    def _launch(self, name: str, args: tuple, kwargs: dict, launch):
        self.trace.append((name, _host(args), _host(sorted(kwargs.items()))))
        return launch()

    def __enter__(self):
        self._hook = launches.on_triton_launch(self._launch)
        self._hook.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._hook.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.trace.append((str(func), _host(args), _host(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


class EagerGraph:
    """The plainest stand-in: a replay runs the step (for counting captures and replays on any code path)."""

    def __init__(self, step, bucket: int):
        self.step, self.bucket, self.replays = step, bucket, 0

    def replay(self) -> None:
        self.step(self.bucket)
        self.replays += 1


def stand_in_graphs(monkeypatch, graph=FakeGraph) -> list:
    """CUDA graph capture on the CPU with a stand-in graph class: warm-up steps run eagerly, recording makes one
    graph per bucket (the list they are appended to is returned)."""
    graphs = []
    monkeypatch.setattr(cuda_graphs, "available", lambda device: True)
    monkeypatch.setattr(cuda_graphs, "_warm_up", lambda step, buckets, device: [step(b) for b in buckets])
    monkeypatch.setattr(cuda_graphs, "_record", lambda step, buckets, device: {
        b: graphs.append(graph(step, b)) or graphs[-1] for b in buckets})
    return graphs


@needs_triton
def test_a_run_captures_its_decode_graphs_once_and_replays_them_across_rollouts(tiny, monkeypatch):
    """With a stand-in graph: the second rollout (other episode ids, turn limits and episode count) replays the
    graphs of the first with every host value unchanged, and both equal eager rollouts; a new seed recaptures."""
    graphs = stand_in_graphs(monkeypatch)
    stop = first_emitted_token(tiny, PROMPTS[1])
    decoders = Decoders()
    replayed = two_rollouts(tiny, stop, 1.0, cuda_graphs="true", decoders=decoders)
    assert decoders.captures == len(graphs) == 3 and sum(g.replays for g in graphs) > 0
    assert all(r.n_graph_replays == r.n_decode_steps > 0 for r in replayed)
    assert same_rollouts(replayed, two_rollouts(tiny, stop, 1.0))
    run(tiny, PROMPTS, [1] * 4, stop_ids=[stop], seed=8, buckets=[2, 4, 8], cuda_graphs="true", decoders=decoders)
    assert decoders.captures == 3 + 2  # the seed is a value the graphs hold (4 rows now: buckets 2 and 4)


LONGEST_PROMPTS = (10, 12, 11, 20, 15, 30)  # six rollouts whose longest prompts vary (issue 38)


def rollouts_of_varying_prompts(model, decoders: Decoders, max_len: int | None) -> None:
    for i, longest in enumerate(LONGEST_PROMPTS):
        prompts = [list(range(1, longest + 1)), [5, 6, 7], list(range(40, 40 + longest // 2))]
        generate(model, prompts, Script([1] * 3), SamplingOptions(max_new_tokens=3, cuda_graphs="true"),
                 max_turns=1, stop_ids=[], seed=7, max_len=max_len, episode_ids=range(3 * i, 3 * i + 3),
                 buckets=[2, 4], decoders=decoders)


def test_a_run_max_len_from_its_limits_captures_once_per_bucket_whatever_the_prompts(tiny, torch_paths, monkeypatch):
    """train.py passes run_max_len (the prompt limit + the turns' budget): six rollouts whose longest prompts are
    10, 12, 11, 20, 15 and 30 tokens record each bucket's graph once. Sized from each batch (generate's
    default), the same rollouts record them again whenever a longer prompt arrives. (That replays hold every
    host value: the test above, with FakeGraph.)"""
    graphs = stand_in_graphs(monkeypatch, EagerGraph)
    decoders = Decoders()
    rollouts_of_varying_prompts(tiny, decoders, run_max_len(32, 1, 3, 4, tiny.config.max_position_embeddings))
    assert decoders.captures == len(graphs) == 2 and sorted(g.bucket for g in graphs) == [2, 4]
    assert sum(g.replays for g in graphs) > 0 and decoders.stats() == dict(graph_captures=2, graph_capture_failures=0)
    per_batch = Decoders()
    rollouts_of_varying_prompts(tiny, per_batch, None)
    assert per_batch.captures == 2 * 4  # 10, 12, 20, 30: a longer cache each time


@pytest.mark.skipif(ON_GPU, reason="the CPU case")
def test_cuda_graphs_on_the_cpu_decode_eagerly(tiny, torch_paths, capsys):
    decoders = Decoders(required=True)
    graphs = run(tiny, PROMPTS, [2] * 4, stop_ids=[], cuda_graphs="auto", decoders=decoders)
    assert torch.equal(graphs.tokens, run(tiny, PROMPTS, [2] * 4, stop_ids=[]).tokens)
    assert graphs.n_graph_replays == 0 and decoders.stats() == dict(graph_captures=0, graph_capture_failures=0)
    assert capsys.readouterr().out == ""  # no capture is tried, so nothing to say
    assert graphs_wanted("auto", "cpu") is False and graphs_wanted("false", "cuda") is False
    assert graphs_wanted("auto", "cuda") is True
    with pytest.raises(ValueError, match="cuda_graphs=true needs a CUDA device; this run's device is cpu"):
        graphs_wanted("true", "cpu")


def fail_recording(step, buckets, device):
    raise RuntimeError("operation not permitted when stream is capturing\n(the rest of CUDA's message)")


def test_a_failed_capture_is_counted_said_and_fatal_when_required(tiny, torch_paths, monkeypatch, capsys):
    monkeypatch.setattr(cuda_graphs, "available", lambda device: True)
    monkeypatch.setattr(cuda_graphs, "_warm_up", lambda step, buckets, device: None)
    monkeypatch.setattr(cuda_graphs, "_record", fail_recording)
    with pytest.raises(CaptureFailed, match="^RuntimeError: operation not permitted when stream is capturing$"):
        DecodeGraphs.capture(lambda bucket: None, [1, 2], torch.device("cpu"))
    decoders = Decoders()  # cuda_graphs=auto: the run goes on eagerly, and says why
    eager = [run(tiny, PROMPTS, [2] * 4, stop_ids=[], cuda_graphs="true", decoders=decoders,
                 episode_ids=range(i, i + 4)) for i in (0, 4)]
    assert decoders.stats() == dict(graph_captures=0, graph_capture_failures=1)  # the decoder is kept: tried once
    assert decoders.failure.startswith("RuntimeError: operation not permitted") and "\n" not in decoders.failure
    assert all(r.n_graph_replays == 0 < r.n_decode_steps for r in eager)
    assert capsys.readouterr().out.count("CUDA graph capture failed, decoding eagerly") == 1
    assert torch.equal(eager[0].tokens, run(tiny, PROMPTS, [2] * 4, stop_ids=[]).tokens)
    required = Decoders(required=True)  # an explicit cuda_graphs=true
    with pytest.raises(CaptureFailed):
        run(tiny, PROMPTS, [2] * 4, stop_ids=[], cuda_graphs="true", decoders=required)
    assert required.capture_failures == 1


def test_a_failed_warm_up_is_the_run_s_error_not_a_fallback(monkeypatch):
    """The warm-up runs the eager step, collectives included: an error there propagates on its rank (under
    torchrun the others are then stopped) instead of sending that rank on to an unpaired collective."""
    monkeypatch.setattr(cuda_graphs, "available", lambda device: True)
    monkeypatch.setattr(cuda_graphs, "_warm_up", lambda step, buckets, device: step(buckets[0]))
    monkeypatch.setattr(cuda_graphs, "_record", lambda *a: pytest.fail("recorded after a failed warm-up"))

    def step(bucket):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):
        DecodeGraphs.capture(step, [1, 2], torch.device("cpu"))


def _capture_on_two_ranks(failing_rank: int) -> str:
    """One rank of a gloo TP group of two: the warm-up's steps all-reduce (as the row-parallel layers do), and
    recording fails on failing_rank (-1: on none). What capture gave this rank, in words."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cuda_graphs.available = lambda device: True
    cuda_graphs._warm_up = lambda step, buckets, device: [step(b) for b in buckets for _ in range(2)]
    cuda_graphs._record = fail_recording if rank == failing_rank else lambda step, buckets, device: {
        b: f"graph {b}" for b in buckets}

    def step(bucket: int) -> None:
        x = torch.ones(bucket)
        dist.all_reduce(x)
        assert x.tolist() == [2.0] * bucket  # paired with the other rank's step of the same bucket
    try:
        return f"graphs {sorted(DecodeGraphs.capture(step, [1, 2], torch.device('cpu'), dist.group.WORLD).graphs)}"
    except CaptureFailed as e:
        return f"failed: {e}"


def test_tensor_parallel_ranks_agree_on_the_capture():
    assert launch(_capture_on_two_ranks, 2, args=(-1,), timeout_s=120) == ["graphs [1, 2]"] * 2
    assert launch(_capture_on_two_ranks, 2, args=(1,), timeout_s=120) == [
        "failed: another tensor-parallel rank could not record its graphs",
        "failed: RuntimeError: operation not permitted when stream is capturing"]
