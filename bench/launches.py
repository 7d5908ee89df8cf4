"""Count what one decode step of the sampler launches, on the CPU, through the code path a GPU takes: every aten op that
runs a kernel (seen by a TorchDispatchMode; views and allocations launch nothing and are not counted) plus
every Triton launch (run by the interpreter: TRITON_INTERPRET=1 makes kernels/dispatch.py pick the Triton
kernels, as on CUDA), attributed to the decoder layer it ran in or to the rest of the step. Host syncs
(.item() and friends: aten._local_scalar_dense) are counted apart.

    TRITON_INTERPRET=1 python bench/launches.py                       # Qwen2.5-1.5B's layer, 2 layers
    TRITON_INTERPRET=1 python bench/launches.py --batch 8 --context 600

The model has the 1.5B preset's layer shapes (bench/common.py) with `--layers` layers and a small vocabulary
(the counts do not depend on widths); `--context` past 256 slots makes the decode attention take its
second (merge) pass. Prints a table and a final JSON line.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_launches.py
"""
import argparse
import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "_local_scalar_dense", "set_", "resize_", "_unsafe_view"}  # allocation and metadata only
SYNC = {"_local_scalar_dense", "nonzero", "is_nonzero"}  # the host waits for the device


class HostSync(RuntimeError):
    """A host sync where none may happen (forbidding_host_syncs)."""


class LaunchCounter(TorchDispatchMode):
    """Counts launches per scope: 'layer' inside a decoder layer (a module named in track()), else 'other'.
    strict: raise HostSync on a host sync instead of counting it."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.launches, self.syncs, self.ops, self.scope, self.strict = Counter(), 0, Counter(), "other", strict
        self.in_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        if name in SYNC or _device_to_host(name, args, kwargs or {}):
            if self.strict:
                raise HostSync(f"aten.{name}: a host sync")
            self.syncs += 1
        if not func.is_view and name not in NO_KERNEL:
            self.launches[self.scope] += 1
            self.ops[(self.scope, name)] += 1
        return func(*args, **(kwargs or {}))

    def host_method(self, name: str) -> None:
        """Tensor.tolist / cpu / numpy was called (the interpreter's own calls inside a launch excepted)."""
        if not self.in_triton:
            if self.strict:
                raise HostSync(f"Tensor.{name}(): a host sync")
            self.syncs += 1

    def triton_launch(self, kernel_name: str) -> None:
        self.launches[self.scope] += 1
        self.ops[(self.scope, f"triton:{kernel_name}")] += 1

    def track(self, modules) -> list:
        """Attribute what runs inside these modules to 'layer'; returns the hook handles."""
        def enter(*_):
            self.scope = "layer"

        def leave(*_):
            self.scope = "other"
        return [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]


def _device_to_host(name: str, args, kwargs) -> bool:
    """A copy from a device tensor into host memory (on a CPU-only machine there are none to see)."""
    if name == "_to_copy":
        return args[0].device.type != "cpu" and str(kwargs.get("device", args[0].device)) == "cpu"
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


HOST_METHODS = ("tolist", "cpu", "numpy")  # .item() reaches the dispatch mode itself


@contextmanager
def counting(counter: LaunchCounter):
    """The counter active: its dispatch mode, Triton launches and the host-reading Tensor methods."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}

    def watched(name, method):
        def call(self, *args, **kwargs):
            counter.host_method(name)
            return method(self, *args, **kwargs)
        return call
    for name, method in originals.items():
        setattr(torch.Tensor, name, watched(name, method))
    try:
        with counting_triton(counter), counter:
            yield counter
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@contextmanager
def counting_triton(counter: LaunchCounter):
    """Count each Triton launch once; what the interpreter does inside it (numpy copies) is not a launch."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    originals = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def wrap(run):
        def counted(self, *args, **kwargs):
            counter.triton_launch(getattr(self, "__name__", None) or getattr(self.fn, "__name__", "?"))
            counter.in_triton = True
            try:
                with _disable_current_modes():
                    return run(self, *args, **kwargs)
            finally:
                counter.in_triton = False
        return counted
    for cls, run in originals.items():
        cls.run = wrap(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def count_decode_step(step, layers) -> LaunchCounter:
    """Run step() once under the counter; layers are the modules whose work counts as 'layer'."""
    counter = LaunchCounter()
    handles = counter.track(layers)
    try:
        with counting(counter):
            step()
    finally:
        for h in handles:
            h.remove()
    return counter


def forbidding_host_syncs():
    """A context in which any host sync outside a Triton launch raises HostSync (tests/test_batching.py)."""
    return counting(LaunchCounter(strict=True))


def main(argv: list[str] | None = None) -> dict:
    from common import PRESETS, mid_attempt_decoder
    from nanoufo.kernels.dispatch import interpreting
    from nanoufo.model import Qwen2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.5b", help="whose layer shapes")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=300, help="cache slots before the step's token")
    args = parser.parse_args(argv)
    if not interpreting():
        parser.error("run with TRITON_INTERPRET=1 (set before Python starts) to count the GPU code path")
    config = replace(PRESETS[args.preset].config, num_hidden_layers=args.layers, vocab_size=args.vocab)
    model = Qwen2(config).eval()
    with torch.no_grad():
        model.init_weights(torch.Generator().manual_seed(0))
        step = mid_attempt_decoder(model, args.batch, args.context, steps=2)
        step()  # warm-up outside the count
        counter = count_decode_step(step, list(model.model.layers))
    per_layer = counter.launches["layer"] / args.layers
    result = dict(preset=args.preset, layers=args.layers, batch=args.batch, context=args.context,
                  launches_per_layer=per_layer, launches_outside_layers=counter.launches["other"],
                  launches_per_step=sum(counter.launches.values()), host_syncs=counter.syncs,
                  per_layer_ops={name: n / args.layers for (scope, name), n in sorted(counter.ops.items())
                                 if scope == "layer"})
    for key in ("launches_per_layer", "launches_outside_layers", "launches_per_step", "host_syncs"):
        print(f"{key:>24}: {result[key]:g}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
