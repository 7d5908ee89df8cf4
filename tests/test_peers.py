"""bench/peers.py --preset tiny, as CI runs it: TRL's GRPOTrainer and nanoufo compute the same loss and gradients
on one fixed batch (clipped tokens included), then each runs GRPO steps on the same prompts in its own process,
and the table and final JSON line hold both systems' seconds, tokens per second and peak memory for every phase.

    python -m pytest -q tests/test_peers.py     # needs TRL: in .[test] on Python >= 3.11, else skipped

About 45 s on a 2-core CPU: three Python processes (the check, TRL, nanoufo), each loading its libraries.
"""
import importlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="bench/peers.py needs TRL, which needs Python >= 3.11: pip install -e '.[peers]'")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the script imports its siblings
peers = importlib.import_module("peers")


def test_tiny_preset_checks_the_loss_and_times_both_systems(capsys):
    result = peers.main(["--preset", "tiny"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    check = result["check"]
    assert check["equal"] and max(check["loss_rel_diff"], check["grad_rel_diff"]) <= check["tolerance"] <= 1e-4
    assert 0 < check["clipped_share"] < 1  # both the clipped and the unclipped branch were compared
    rows = {row["phase"]: row for row in result["rows"]}
    for phase in ("generation", "scoring", "update", "step", "peak GiB"):
        assert rows[phase]["trl"] > 0 and rows[phase]["nanoufo"] > 0 and rows[phase]["ratio"] > 0, phase
    for phase in ("generation", "update", "step"):  # scoring's CPU time can round to 0 where TRL skips it
        assert rows[phase]["trl_cpu"] > 0 and rows[phase]["nanoufo_cpu"] > 0, phase
    steps = result["per_step"]
    assert len(steps["trl"]) == len(steps["nanoufo"]) == peers.PRESETS["tiny"].steps
    for ours, theirs in zip(steps["nanoufo"], steps["trl"]):  # the same prompts at every step
        assert ours["tokens"] - ours["sampled_tokens"] == theirs["tokens"] - theirs["sampled_tokens"]


def test_a_gpu_preset_on_the_cpu_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(peers.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        peers.main(["--preset", "1.5b"])
    assert stop.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
