"""bench/launches.py: a decode step on the GPU code path (Triton kernels under the interpreter) launches at
most 12 kernels per decoder layer; the sampler's prefills, the trainer's scoring and update forwards make no
host sync and no blocking copy to the device, with PyTorch's SDPA and with flash-attn (a stand-in: it is not
installed here), the kernels' own target check excepted; flash-attn's layout is worked out once per forward and
its results equal SDPA's; the counter sees what it must.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_launches.py
"""
import importlib
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kernel_device import needs_triton
from nanoufo.model import KVCache, Qwen2, QwenConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
launches = importlib.import_module("launches")
pytestmark = needs_triton

SHAPE = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2)
KERNEL_CHECK = "kernels/token_stats.py"  # finish_slice reads the targets' range back: the kernels' own check


def test_counter_counts_kernels_not_views_and_syncs_and_blocking_copies_apart():
    x = torch.randn(4, 6)
    counter = launches.count_launches(lambda: (x.view(24).t(), x + 1, x.sum().item(), x.to("cpu"),
                                               x.to(torch.float64), x.to("cpu", non_blocking=True),
                                               torch.tensor([1], device="cpu"), torch.tensor([1])), layers=[])
    assert counter.launches["other"] == 3  # add, sum, the float64 copy; the view is free
    assert counter.syncs == 1 and counter.copies == 2  # item; .to(device) and torch.tensor(device=)


def test_decode_step_launches_at_most_12_per_layer():
    result = launches.main(["--preset", "tiny", "--path", "decode", "--layers", "2", "--context", "300"])
    step = result["paths"]["decode"]  # 300 slots: 2 attention passes
    assert step["launches_per_layer"] <= 12 and step["host_syncs"] == step["blocking_copies"] == 0
    assert step["per_layer_ops"]["triton:_decode_attention_merge_kernel"] == 1  # counted inside the attention


@pytest.mark.parametrize("flash", [False, True], ids=["sdpa", "flash_attn"])
def test_prefill_scoring_and_update_forwards_make_no_host_sync(flash):
    config = replace(SHAPE, num_hidden_layers=2)
    model, critic = Qwen2(config).eval(), Qwen2(config, value_head=True).eval()
    with launches.fake_flash_attn() if flash else nullcontext() as fake:
        for path in launches.PATHS[1:]:
            counter = launches.count_path(path, model, critic, batch=3, context=24)
            assert all(site.startswith(KERNEL_CHECK) for site in counter.sites), (path, counter.sites)
            assert counter.syncs <= path.startswith("scoring") and counter.copies == 0, (path, counter.sites)
    assert not flash or {name for name, _, _ in fake.calls} == {"varlen", "with_kvcache"}


def forwards(model: Qwen2) -> dict[str, torch.Tensor]:
    """Hidden states of every kind of forward: padded, packed by lengths and by positions, a prompt prefill
    into the cache and a feedback turn appended to some of its rows."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE.vocab_size, (3, 10), generator=g)
    packed = torch.cat([torch.arange(n) for n in (4, 3, 3)])[None]
    cache = KVCache.allocate(SHAPE, 3, 16)
    with torch.no_grad():
        out = {"padded": model(ids), "by_lengths": model(ids[:1], packed, seq_lens=[4, 3, 3]),
               "by_positions": model(ids[:1], packed),
               "prefill": model(ids[:, :6], cache=cache, cache_len=6)}
        rows = torch.tensor([2, 0])
        out["append"] = model(ids[rows, 6:9], torch.arange(6, 9).expand(2, 3), cache=cache, cache_rows=rows)
    return out


def test_the_flash_attn_path_equals_sdpa_and_works_out_its_layout_once_per_forward(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the cached forwards through attention, not the decode kernel
    model = Qwen2(SHAPE).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    sdpa = forwards(model)
    with launches.fake_flash_attn() as fake:
        flash = forwards(model)
    for name in sdpa:
        assert (flash[name] - sdpa[name]).abs().max() < 1e-5, name
    layers = SHAPE.num_hidden_layers
    assert len(fake.calls) == len(sdpa) * layers
    for i in range(0, len(fake.calls), layers):  # one forward: every layer got the same offsets tensor
        name, offsets, max_len = fake.calls[i]
        assert all(call[1] is offsets and call[2] == max_len for call in fake.calls[i:i + layers]), name
