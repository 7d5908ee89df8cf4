"""bench/launches.py: a decode step on the GPU code path (Triton kernels under the interpreter) launches at
most 12 kernels per decoder layer and makes no host sync; the counter sees what it must.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_launches.py
"""
import importlib
import sys
from pathlib import Path

import torch

from kernel_device import needs_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
launches = importlib.import_module("launches")
pytestmark = needs_triton


def test_counter_counts_kernels_not_views_and_syncs_apart():
    x = torch.randn(4, 6)
    counter = launches.count_decode_step(lambda: (x.view(24).t(), x + 1, x.sum().item()), layers=[])
    assert counter.launches["other"] == 2 and counter.syncs == 1  # add, sum; the view is free; item syncs


def test_decode_step_launches_at_most_12_per_layer():
    result = launches.main(["--preset", "tiny", "--layers", "2", "--context", "300"])  # 2 attention passes
    assert result["launches_per_layer"] <= 12 and result["host_syncs"] == 0
    assert result["per_layer_ops"]["triton:_decode_attention_merge_kernel"] == 1  # counted inside the attention
