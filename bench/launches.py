"""Count what the sampler's and the trainer's forwards launch and where they make the host wait, on the CPU,
through the code path a GPU takes: every aten op that runs a kernel (seen by a TorchDispatchMode; views and
allocations launch nothing and are not counted) plus every Triton launch (run by the interpreter:
TRITON_INTERPRET=1 makes kernels/dispatch.py pick the Triton kernels, as on CUDA), attributed to the decoder
layer it ran in or to the rest of the call. Counted apart:
  - host syncs: reading a device value (.item(), bool(), int(): aten._local_scalar_dense), data-dependent
    shapes (nonzero), Tensor.tolist / cpu / numpy;
  - blocking copies to the device: torch.tensor(..., device=...) and Tensor.to(device) without
    non_blocking=True. On a GPU each is a host sync too (PyTorch synchronises the stream after a copy from
    pageable memory); on this CPU the counter cannot tell a real move from a no-op .to(), so it counts every
    call. nanoufo.model.to_device (pinned memory, non_blocking) is not one.

    TRITON_INTERPRET=1 python bench/launches.py                      # every path, Qwen2.5-1.5B's layer, 2 layers
    TRITON_INTERPRET=1 python bench/launches.py --path decode --batch 8 --context 600
    TRITON_INTERPRET=1 python bench/launches.py --flash-attn         # with flash-attn (a stand-in, see below)

Paths: decode (one decode step of nanoufo/decode.py), prefill (the sampler admitting prompts: the cached
forward from slot 0, the head, the first token), feedback_prefill (a feedback turn appended to rows already in
the cache), scoring_packed / scoring_padded (the trainer's no-grad log-probs, nanoufo.trainer.sequence_stats,
trajectories packed or right-padded), values_padded (the critic's padded forward), update_packed /
update_padded (one micro-batch of the actor's PPO loss, forward and backward). flash-attn is not installed
here: --flash-attn puts a stand-in for its two functions into nanoufo.model (fake_flash_attn: the same
results, computed by SDPA outside the counter, each call counted as one launch), so the count is the code
path a GPU with flash-attn runs. The model has the preset's layer shapes with `--layers` layers and a small
vocabulary (the counts do not depend on widths); `--context` past 256 slots makes the decode attention take
its second (merge) pass. Prints a table and a final JSON line.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_launches.py
"""
import argparse
import json
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "_local_scalar_dense", "set_", "resize_", "_unsafe_view"}  # allocation and metadata only
SYNC = {"_local_scalar_dense", "nonzero", "is_nonzero"}  # the host waits for the device
PATHS = ("decode", "prefill", "feedback_prefill", "scoring_packed", "scoring_padded", "values_padded",
         "update_packed", "update_padded")


class HostSync(RuntimeError):
    """A host sync where none may happen (forbidding_host_syncs)."""


class LaunchCounter(TorchDispatchMode):
    """Counts launches per scope: 'layer' inside a decoder layer (a module named in track()), else 'other'.
    strict: raise HostSync on a host sync or a blocking copy instead of counting it."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.launches, self.syncs, self.copies, self.ops, self.scope = Counter(), 0, 0, Counter(), "other"
        self.sites = Counter()  # "file:line" of the project's code that made each sync or blocking copy
        self.strict, self.outside = strict, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        if name in SYNC or _device_to_host(name, args, kwargs or {}):
            self.sync(f"aten.{name}")
        if not func.is_view and name not in NO_KERNEL:
            self.launches[self.scope] += 1
            self.ops[(self.scope, name)] += 1
        return func(*args, **(kwargs or {}))

    def sync(self, what: str) -> None:
        if self.strict:
            raise HostSync(f"{what}: a host sync at {_site()}")
        self.syncs += 1
        self.sites[_site()] += 1

    def host_method(self, name: str) -> None:
        """Tensor.tolist / cpu / numpy was called (a launch's own calls inside it excepted)."""
        if not self.outside:
            self.sync(f"Tensor.{name}()")

    def blocking_copy(self, what: str) -> None:
        """Host data copied to a device without non_blocking (a launch's own calls inside it excepted)."""
        if self.outside:
            return
        if self.strict:
            raise HostSync(f"{what}: a blocking copy to the device (a host sync on a GPU) at {_site()}")
        self.copies += 1
        self.sites[_site()] += 1

    def launch(self, kernel_name: str) -> None:
        self.launches[self.scope] += 1
        self.ops[(self.scope, kernel_name)] += 1

    def track(self, modules) -> list:
        """Attribute what runs inside these modules to 'layer'; returns the hook handles."""
        def enter(*_):
            self.scope = "layer"

        def leave(*_):
            self.scope = "other"
        return [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]


def _site() -> str:
    """The innermost frame of the project's code (nanoufo/ or kernels/) on the stack, as 'folder/file:line'."""
    for frame in reversed(traceback.extract_stack()):
        parts = frame.filename.replace("\\", "/").split("/")
        if len(parts) > 1 and parts[-2] in ("nanoufo", "kernels"):
            return f"{parts[-2]}/{parts[-1]}:{frame.lineno}"
    return "?"


def _device_to_host(name: str, args, kwargs) -> bool:
    """A copy from a device tensor into host memory (on a CPU-only machine there are none to see)."""
    if name == "_to_copy":
        return args[0].device.type != "cpu" and str(kwargs.get("device", args[0].device)) == "cpu"
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


HOST_METHODS = ("tolist", "cpu", "numpy")  # .item() reaches the dispatch mode itself
_active: list[LaunchCounter] = []  # the counter of the innermost counting(), for launches made outside aten


def _moves_to_device(args, kwargs) -> bool:
    """Whether Tensor.to(*args, **kwargs) names a device and does not ask for non_blocking."""
    if kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return False
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, (str, torch.device, torch.Tensor))


@contextmanager
def watching_host(counter: LaunchCounter):
    """The host-reading Tensor methods and the blocking copies to a device, reported to counter."""
    originals = {name: getattr(torch.Tensor, name) for name in (*HOST_METHODS, "to")}
    tensor_fn = torch.tensor

    def watched(name, method):
        def call(self, *args, **kwargs):
            counter.host_method(name)
            return method(self, *args, **kwargs)
        return call

    def to(self, *args, **kwargs):
        if _moves_to_device(args, kwargs):
            counter.blocking_copy("Tensor.to(device)")
        return originals["to"](self, *args, **kwargs)

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            counter.blocking_copy("torch.tensor(..., device=)")
        return tensor_fn(*args, **kwargs)
    for name in HOST_METHODS:
        setattr(torch.Tensor, name, watched(name, originals[name]))
    torch.Tensor.to, torch.tensor = to, tensor
    try:
        yield counter
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        torch.tensor = tensor_fn


@contextmanager
def counting(counter: LaunchCounter):
    """The counter active: its dispatch mode, Triton launches, the host-reading Tensor methods and the
    blocking copies to a device."""
    _active.append(counter)
    try:
        with watching_host(counter), counting_triton(counter), counter:
            yield counter
    finally:
        _active.pop()


def as_one_launch(name: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) counted as one launch by the active counter; what it does inside is not counted."""
    counter = _active[-1] if _active else None
    if counter is None:
        return fn(*args, **kwargs)
    counter.launch(name)
    outside, counter.outside = counter.outside, True
    try:
        with _disable_current_modes():
            return fn(*args, **kwargs)
    finally:
        counter.outside = outside


@contextmanager
def on_triton_launch(around):
    """Runs every Triton launch as around(kernel_name, args, kwargs, launch), launch() doing it: compiled ones
    (JITFunction.run) and interpreted ones (the interpreter's GridExecutor, which runs each launch in every
    Triton release from 3.4; its InterpretedFunction.run only exists from 3.6)."""
    from triton.runtime.interpreter import GridExecutor
    from triton.runtime.jit import JITFunction
    patched = [(JITFunction, "run"), (GridExecutor, "__call__")]
    originals = [getattr(cls, name) for cls, name in patched]

    def wrap(original):
        def launched(self, *args, **kwargs):
            return around(self.fn.__name__, args, kwargs, lambda: original(self, *args, **kwargs))
        return launched
    for (cls, name), original in zip(patched, originals):
        setattr(cls, name, wrap(original))
    try:
        yield
    finally:
        for (cls, name), original in zip(patched, originals):
            setattr(cls, name, original)


def counting_triton(counter: LaunchCounter):
    """Count each Triton launch once; what the interpreter does inside it (numpy copies) is not a launch."""
    return on_triton_launch(lambda name, args, kwargs, launch: as_one_launch(f"triton:{name}", launch))


def count_launches(fn, layers) -> LaunchCounter:
    """Run fn() once under the counter; layers are the modules whose work counts as 'layer'."""
    counter = LaunchCounter()
    handles = counter.track(layers)
    try:
        with counting(counter):
            fn()
    finally:
        for h in handles:
            h.remove()
    return counter


def forbidding_host_syncs():
    """A context in which any host sync or blocking copy outside a launch raises HostSync."""
    return counting(LaunchCounter(strict=True))


# ----------------------------------------------------------------------------- a stand-in for flash-attn
def _causal_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """q (T, Hq, D), k and v (S, Hkv, D): query t sees keys <= offset + t (flash-attn's bottom-right causal)."""
    T, S = q.shape[0], k.shape[0]
    visible = torch.arange(S) <= offset + torch.arange(T)[:, None]  # (T, S)
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))  # (Hq, S, D)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=visible).transpose(0, 1)


class FakeFlashAttn:
    """flash_attn_varlen_func and flash_attn_with_kvcache (causal) as SDPA loops, recording each call's offsets
    and lengths; each call counts as one launch under a counter."""

    def __init__(self):
        self.calls = []  # (function name, the offsets or seqlens tensor, max_len)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
        assert causal and cu_q is cu_k and max_q == max_k and isinstance(max_q, int)
        self.calls.append(("varlen", cu_q, max_q))

        def run():
            bounds, out = cu_q.tolist(), torch.empty_like(q)
            assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_q and bounds[-1] == q.shape[0]
            for a, b in zip(bounds, bounds[1:]):
                out[a:b] = _causal_gqa(q[a:b], k[a:b], v[a:b], 0)
            return out
        return as_one_launch("flash_attn_varlen_func", run)

    def with_kvcache(self, q, k_cache, v_cache, cache_seqlens, cache_batch_idx, causal=True):
        assert causal and cache_seqlens.dtype == cache_batch_idx.dtype == torch.int32
        self.calls.append(("with_kvcache", cache_seqlens, None))

        def run():
            T = q.shape[1]
            rows = [_causal_gqa(q[b], k_cache[r, :n], v_cache[r, :n], n - T)
                    for b, (r, n) in enumerate(zip(cache_batch_idx.tolist(), cache_seqlens.tolist()))]
            return torch.stack(rows)
        return as_one_launch("flash_attn_with_kvcache", run)


@contextmanager
def fake_flash_attn():
    """nanoufo.model with the stand-in flash-attn for every tensor (yields the FakeFlashAttn, its calls)."""
    from nanoufo import model
    fake = FakeFlashAttn()
    saved = model.uses_flash_attn, model.flash_attn_varlen_func, model.flash_attn_with_kvcache
    model.uses_flash_attn, model.flash_attn_varlen_func, model.flash_attn_with_kvcache = \
        (lambda x: True), fake.varlen, fake.with_kvcache
    try:
        yield fake
    finally:
        model.uses_flash_attn, model.flash_attn_varlen_func, model.flash_attn_with_kvcache = saved


# ----------------------------------------------------------------------------- the paths
def path_runners(model, critic, batch: int, context: int) -> dict:
    """{path: a function running it once}, each on fresh inputs built here (outside the count)."""
    from common import mid_attempt_decoder
    from nanoufo import sampler, trainer
    from nanoufo.packing import one_forward
    from nanoufo.config import TrainConfig
    from nanoufo.decode import Decoder, Sampling
    V, g = model.config.vocab_size, torch.Generator().manual_seed(0)
    lengths = [context - 7 * b for b in range(batch)]  # trajectories of different lengths
    tokens = torch.randint(0, V, (batch, max(lengths)), generator=g)
    mask = (torch.arange(tokens.shape[1]) < torch.tensor(lengths)[:, None]).float()
    mask[:, :8] = 0.0
    mb = trainer.Batch(tokens, mask, torch.zeros_like(mask), torch.randn(mask.shape, generator=g) * mask)
    cfg = TrainConfig()

    def sampler_run(prompt_len: int):
        prompts = [torch.randint(0, V, (prompt_len - b,), generator=g).tolist() for b in range(batch)]
        decoder = Decoder(model, batch, context + 64, Sampling(1.0, 1.0, 0), [], 32)
        return sampler._Run(model, prompts, lambda rows, *a: [None] * len(rows), decoder, max_turns=2, stop_ids=[],
                            episode_ids=list(range(batch)), buckets=None, graphs=None, sync_every=8)

    def feedback_prefill():
        run = sampler_run(context // 2)
        run.admit()
        for row in range(batch):  # an attempt of 16 sampled tokens ended; 12 tokens of feedback follow it
            conversation = run.on(row)
            conversation.append(list(range(16)), [0.0] * 16)
            conversation.spans.append((conversation.turn_start, len(conversation.tokens)))
            conversation.append(list(range(12)))
        return lambda: run.begin(list(range(batch)), [13] * batch)

    def update(packed: bool):
        weights = trainer.minibatch_weights(mb.mask, cfg.aggregation, model.par)

        def run():
            forward = one_forward(tokens, lengths if packed else None)[0]
            loss, _ = trainer.policy_loss(cfg, model, trainer.UpdateRows.of(mb, weights, forward))
            loss.backward()
        return run

    return {"decode": lambda: mid_attempt_decoder(model, batch, context, steps=2)[0],
            "prefill": lambda: sampler_run(context).admit,
            "feedback_prefill": feedback_prefill,
            "scoring_packed": lambda: lambda: trainer.sequence_stats(model, tokens, 1.0, lengths),
            "scoring_padded": lambda: lambda: trainer.sequence_stats(model, tokens, 1.0),
            "values_padded": lambda: lambda: trainer.sequence_values(critic, tokens),
            "update_packed": lambda: update(True), "update_padded": lambda: update(False)}


def count_path(path: str, model, critic, batch: int, context: int) -> LaunchCounter:
    """Build the path's inputs, run it once outside the count (warm-up), then once counted."""
    runners = path_runners(model, critic, batch, context)
    grad = path.startswith("update")
    with torch.set_grad_enabled(grad):
        runners[path]()()
        run = runners[path]()
        layers = list((critic if path == "values_padded" else model).model.layers)
        return count_launches(run, layers)


def main(argv: list[str] | None = None) -> dict:
    from common import PRESETS
    from nanoufo.kernels.dispatch import interpreting
    from nanoufo.model import Qwen2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.5b", help="whose layer shapes")
    parser.add_argument("--path", choices=("all", *PATHS), default="all")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=300, help="cache slots before the step's token / tokens")
    parser.add_argument("--flash-attn", action="store_true", help="count with the flash-attn stand-in")
    args = parser.parse_args(argv)
    if not interpreting():
        parser.error("run with TRITON_INTERPRET=1 (set before Python starts) to count the GPU code path")
    config = replace(PRESETS[args.preset].config, num_hidden_layers=args.layers, vocab_size=args.vocab)
    model, critic = Qwen2(config).eval(), Qwen2(config, value_head=True).eval()
    for m in (model, critic):
        m.init_weights(torch.Generator().manual_seed(0))
    rows = {}
    with fake_flash_attn() if args.flash_attn else _nothing():
        for path in PATHS if args.path == "all" else (args.path,):
            counter = count_path(path, model, critic, args.batch, args.context)
            rows[path] = dict(launches_per_layer=counter.launches["layer"] / args.layers,
                              launches_outside_layers=counter.launches["other"],
                              launches=sum(counter.launches.values()), host_syncs=counter.syncs,
                              blocking_copies=counter.copies, sync_sites=dict(counter.sites),
                              per_layer_ops={name: n / args.layers for (scope, name), n in sorted(counter.ops.items())
                                             if scope == "layer"})
    columns = ("launches_per_layer", "launches_outside_layers", "launches", "host_syncs", "blocking_copies")
    print(f"{'path':>17}  " + "  ".join(f"{c:>23}" for c in columns))
    for path, row in rows.items():
        print(f"{path:>17}  " + "  ".join(f"{row[c]:>23g}" for c in columns))
    result = dict(preset=args.preset, layers=args.layers, batch=args.batch, context=args.context,
                  flash_attn=args.flash_attn, paths=rows)
    print(json.dumps(result))
    return result


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    main()
