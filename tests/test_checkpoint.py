"""Atomic checkpoints (nanoufo/checkpoint.py): round trip of models, optimizers and RNG states, and a crash
in the middle of a save never leaves `latest` pointing at a partial checkpoint: a crash is injected at
every file-system step of a save in turn (rename, fsync, remove, write), deterministically; a bf16 run's
fp32 masters survive.

    python -m pytest -q tests/test_checkpoint.py
"""
import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanoufo import checkpoint
from nanoufo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanoufo.model import QwenConfig, Qwen2

TINY = QwenConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


def models_and_optimizers(seed):
    actor, critic = Qwen2(TINY), Qwen2(TINY, value_head=True)
    actor.init_weights(torch.Generator().manual_seed(seed))
    critic.init_weights(torch.Generator().manual_seed(seed + 1))
    models = {"actor": actor, "critic": critic}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-2) for name, m in models.items()}
    return models, opts


def take_a_step(models, opts):
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    ids = torch.arange(6)[None] % TINY.vocab_size
    pos = torch.arange(6)[None]
    loss = sum(m(ids, pos).pow(2).mean() + (m.values(m(ids, pos)).sum() if m.value_head is not None else 0)
               for m in models.values())
    loss.backward()
    for opt in opts.values():
        opt.step()


def test_round_trip_restores_models_optimizers_and_rng(tmp_path):
    models, opts = models_and_optimizers(0)
    take_a_step(models, opts)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    save_checkpoint(tmp_path, 7, models, opts, {"data_pos": 224})
    expected = (torch.rand(3), np.random.rand(3), random.random())

    fresh, fresh_opts = models_and_optimizers(1)
    state = load_checkpoint(tmp_path, fresh, fresh_opts)
    assert state == {"step": 7, "data_pos": 224}
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    for name in models:
        for (n, p), q in zip(models[name].named_parameters(), fresh[name].parameters()):
            assert torch.equal(p, q), n
        a, b = opts[name].state_dict(), fresh_opts[name].state_dict()
        for key in a["state"]:
            assert torch.equal(a["state"][key]["exp_avg"], b["state"][key]["exp_avg"])
    take_a_step(models, opts), take_a_step(fresh, fresh_opts)  # and training continues identically
    assert torch.equal(models["actor"].lm_head_weight, fresh["actor"].lm_head_weight)


def test_only_the_newest_checkpoint_is_kept(tmp_path):
    models, opts = models_and_optimizers(0)
    save_checkpoint(tmp_path, 1, models, opts, {})
    save_checkpoint(tmp_path, 2, models, opts, {})
    assert latest_checkpoint(tmp_path).name == "ckpt-2"
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-2"]


def test_a_crash_mid_save_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    models, opts = models_and_optimizers(0)
    save_checkpoint(tmp_path, 1, models, opts, {"data_pos": 1})
    written = []

    def dying_save(model, out):
        if written:
            raise KeyboardInterrupt("killed mid-write")
        written.append(out)
        real_save(model, out)

    real_save = checkpoint.save_model
    monkeypatch.setattr(checkpoint, "save_model", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, models, opts, {"data_pos": 2})
    monkeypatch.setattr(checkpoint, "save_model", real_save)
    assert (tmp_path / "ckpt-2.tmp").is_dir() and not (tmp_path / "ckpt-2").exists()
    assert load_checkpoint(tmp_path, *models_and_optimizers(3))["data_pos"] == 1
    save_checkpoint(tmp_path, 2, models, opts, {"data_pos": 2})  # the next save clears the leftover
    assert latest_checkpoint(tmp_path).name == "ckpt-2" and not (tmp_path / "ckpt-2.tmp").exists()


def test_no_checkpoint_and_a_dangling_pointer(tmp_path):
    assert load_checkpoint(tmp_path, *models_and_optimizers(0)) is None
    (tmp_path / "latest").write_text("ckpt-9\n")
    with pytest.raises(FileNotFoundError, match="points at .*ckpt-9, which is not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_a_bf16_run_resumes_from_its_fp32_masters(tmp_path):
    """bf16 models with fp32 masters: the checkpoint restores the masters themselves, not their bf16 rounding,
    while the HF directories a user takes away stay bf16; training then continues identically."""
    from nanoufo.optim import adamw

    def bf16_run(seed):
        models, _ = models_and_optimizers(seed)
        models = {name: m.to(torch.bfloat16) for name, m in models.items()}
        return models, {name: adamw(m.parameters(), lr=1e-4, weight_decay=0.0) for name, m in models.items()}

    models, opts = bf16_run(0)
    for _ in range(3):
        take_a_step(models, opts)
    masters = opts["actor"].masters
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)  # finer than bf16
    path = save_checkpoint(tmp_path, 3, models, opts, {})
    assert load_file(path / "actor" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((path / "actor" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    fresh, fresh_opts = bf16_run(1)
    load_checkpoint(tmp_path, fresh, fresh_opts)
    assert all(torch.equal(a, b) for a, b in zip(masters, fresh_opts["actor"].masters))
    take_a_step(models, opts), take_a_step(fresh, fresh_opts)
    for name in models:
        assert all(torch.equal(a, b) for a, b in zip(opts[name].masters, fresh_opts[name].masters))
        assert all(torch.equal(a, b) for a, b in zip(models[name].parameters(), fresh[name].parameters()))


class Crash(BaseException):
    """Stands in for SIGKILL at one step of a save: nothing after it runs (not an Exception, so no handler
    in the code under test can swallow it)."""


SAVE_STEPS = [(checkpoint.os, "replace"), (checkpoint.os, "fsync"), (checkpoint.shutil, "rmtree"),
              (checkpoint, "save_model"), (checkpoint.torch, "save"), (checkpoint, "_write_manifest")]


def crash_at_call(monkeypatch, k: int) -> list[str]:
    """Make the k-th call (from 1; 0: none) of any of SAVE_STEPS raise Crash; returns the calls seen."""
    calls = []

    def wrap(real, name):
        def step(*args, **kwargs):
            calls.append(name)
            if len(calls) == k:
                raise Crash(f"crash at call {k}: {name}")
            return real(*args, **kwargs)
        return step

    for owner, name in SAVE_STEPS:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name), name))
    return calls


def test_a_crash_at_every_step_of_a_save_leaves_latest_on_a_whole_checkpoint(tmp_path, monkeypatch):
    saved = {1: models_and_optimizers(0), 2: models_and_optimizers(1)}
    template = tmp_path / "template"
    save_checkpoint(template, 1, *saved[1], {"data_pos": 1})
    with monkeypatch.context() as patch:  # count the steps of the second save
        shutil.copytree(template, tmp_path / "count")
        calls = crash_at_call(patch, 0)
        save_checkpoint(tmp_path / "count", 2, *saved[2], {"data_pos": 2})
    assert {"replace", "fsync", "rmtree", "save_model", "save"} <= set(calls)
    outcomes = []
    for k in range(1, len(calls) + 1):
        out = shutil.copytree(template, tmp_path / f"crash-{k}")
        with monkeypatch.context() as patch:
            crash_at_call(patch, k)
            with pytest.raises(Crash):
                save_checkpoint(out, 2, *saved[2], {"data_pos": 2})
        fresh = models_and_optimizers(2)
        step = load_checkpoint(out, *fresh)["data_pos"]  # raises if `latest` names anything but a whole checkpoint
        for name, model in saved[step][0].items():
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh[0][name].parameters())), (k, name)
        outcomes.append(step)
    assert outcomes == sorted(outcomes) and outcomes[0] == 1 and outcomes[-1] == 2, outcomes
