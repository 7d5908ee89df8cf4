"""Atomic training checkpoints: out_dir/ckpt-<step>/ holds the actor (and critic) in Hugging Face format,
the optimizer states, the step, the data position and every RNG state; out_dir/latest names the newest.

    save_checkpoint(out_dir, step, {"actor": actor, "critic": critic}, optimizers, {"data_pos": 96})
    state = load_checkpoint(out_dir, {"actor": actor, "critic": critic}, optimizers)  # None if none yet

A checkpoint is written completely under a temporary name (files fsynced), renamed into place, and only
then is `latest` replaced (tmp + os.replace), so a crash at any moment leaves `latest` pointing at a whole
checkpoint. Older checkpoints are removed after the pointer moves. Every rank calls save and load: under
tensor parallelism the models are gathered into ordinary HF checkpoints (rank 0 writes them) and each TP
rank keeps its own slice of the optimizer state in optimizers-tp<r>.pt.
"""
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from nanoufo.parallel import ParallelContext, barrier
from nanoufo.weights import load_model, save_model

POINTER = "latest"


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_file(ctx: ParallelContext) -> str:
    return "optimizers.pt" if ctx.tp_size == 1 else f"optimizers-tp{ctx.tp_rank}.pt"


def save_checkpoint(out_dir: str | Path, step: int, models: dict, optimizers: dict, extra: dict) -> Path:
    """Write ckpt-<step> (models by name in HF format, optimizers, extra state, RNG), point `latest` at it,
    remove the older ones. Returns the checkpoint directory."""
    ctx = next(iter(models.values())).tp
    out_dir = Path(out_dir)
    final = out_dir / f"ckpt-{step}"
    tmp = out_dir / f"ckpt-{step}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash mid-write
        tmp.mkdir(parents=True)
    barrier(ctx)
    for name, model in models.items():
        save_model(model, tmp / name)
    if ctx.dp_rank == 0:  # the other DP groups hold the same optimizer state
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / optimizer_file(ctx))
    barrier(ctx)
    if not ctx.is_main:
        return final
    torch.save({"step": step, "rng": rng_states(), **extra}, tmp / "state.pt")
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    pointer_tmp = out_dir / (POINTER + ".tmp")
    pointer_tmp.write_text(final.name + "\n")
    with open(pointer_tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer_tmp, out_dir / POINTER)
    _fsync_dir(out_dir)
    for old in out_dir.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory `latest` points at, or None when out_dir has no checkpoint."""
    pointer = Path(out_dir) / POINTER
    if not pointer.is_file():
        return None
    path = Path(out_dir) / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{pointer}: points at {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(out_dir: str | Path, models: dict, optimizers: dict) -> dict | None:
    """Restore models (in place), optimizers and RNG states from the latest checkpoint; return its extra
    state (step, data position, ...) or None when there is none."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    for name, model in models.items():
        param = next(model.parameters())
        saved = load_model(path / name, device=param.device, dtype=param.dtype,
                           value_head=model.value_head is not None, tp=model.tp)
        model.load_state_dict(saved.state_dict())
    opt_path = path / optimizer_file(next(iter(models.values())).tp)
    opt_states = torch.load(opt_path, map_location="cpu", weights_only=False)
    for name, opt in optimizers.items():
        if name not in opt_states:
            raise KeyError(f"{opt_path}: no state for optimizer {name!r}")
        opt.load_state_dict(opt_states[name])
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    set_rng_states(state.pop("rng"))
    return state
