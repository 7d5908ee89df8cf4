"""The hardware limits every benchmark compares against, in one place: the
kernel microbenchmarks (bench/conftest.py) and the end-to-end scripts (bench/common.py) import it.

    from hardware import roofline
    hbm_bytes_per_s, bf16_flops_per_s = roofline() or (None, None)   # None on the CPU

Not run on its own. Tested through the end-to-end scripts: TRITON_INTERPRET=1 python -m pytest -q
tests/test_bench_e2e.py (on the CPU the roofline is None).
"""
import torch

# name fragment of torch.cuda.get_device_name() -> (HBM bytes/s, bf16 dense FLOP/s)
ROOFLINES = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def roofline() -> tuple[float, float] | None:
    """(bytes/s, FLOP/s) of this GPU, or None on the CPU or an unlisted GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((row for key, row in ROOFLINES.items() if key in name), None)
