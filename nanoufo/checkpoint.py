"""Atomic training checkpoints: out_dir/ckpt-<step>/ holds the actor (and critic) in Hugging Face format (in
the compute dtype), the optimizer states (with a bf16 run's fp32 master weights, nanoufo/optim.py), the step,
the data position and every RNG state, and the run's whole config (run_config.json, which sample.py reads to
evaluate the checkpoint the way the run did); out_dir/latest names the newest.

    save_checkpoint(out_dir, step, {"actor": actor, "critic": critic}, optimizers, {"data_pos": 96}, config)
    state = load_checkpoint(out_dir, {"actor": actor, "critic": critic}, optimizers)  # None if none yet
    ckpt, run_config = find_checkpoint("out/ufo")   # a run's latest (or ckpt-N, or its actor/): the actor's directory

A checkpoint is written completely under a temporary name (files fsynced), renamed into place, and only
then is `latest` replaced (tmp + os.replace), so a crash at any moment leaves `latest` pointing at a whole
checkpoint; a directory `latest` names is never removed or replaced before the pointer has moved off it.
Older checkpoints are removed after the pointer moves. manifest.json, written last, holds every file's size
and CRC32; load verifies them first, so a truncated or corrupted file is named, never loaded (a flipped bit
in a tensor would otherwise load silently). Every rank calls save and load: under tensor parallelism the
models are gathered into ordinary HF checkpoints (rank 0 writes them) and each TP rank keeps its own slice
of the optimizer state in optimizers-tp<r>.pt.
Tests: python -m pytest -q tests/test_checkpoint.py tests/test_reliability.py
"""
import itertools
import json
import os
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from nanoufo.parallel import ParallelContext, barrier
from nanoufo.weights import atomic_write, fsync, load_model, save_model

POINTER = "latest"
MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.json"


def rng_states() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), **cuda}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(root: Path) -> None:
    """Size and CRC32 of every file under root (CRC32: about 4x faster than SHA-256 on CPU, and enough to
    catch truncation and accidental corruption)."""
    files = {path.relative_to(root).as_posix(): {"bytes": path.stat().st_size, "crc32": _crc32(path)}
             for path in sorted(root.rglob("*")) if path.is_file()}
    (root / MANIFEST).write_text(json.dumps(files, indent=1) + "\n")


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        if all(isinstance(e["bytes"], int) and isinstance(e["crc32"], int) for e in manifest.values()):
            return manifest
        error = "an entry without integer bytes and crc32"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        error = f"{type(e).__name__}: {e}"
    raise ValueError(f"{manifest_path}: unreadable ({error}); the checkpoint is damaged")


def verify_checkpoint(path: str | Path, parts: list[str]) -> None:
    """Check the files of `parts` (top-level entries: model directories, optimizer files, state.pt) against
    the manifest; raise naming the first file that is missing, truncated or corrupted."""
    path = Path(path)
    manifest = _read_manifest(path)
    for part in parts:
        listed = [name for name in manifest if name == part or name.startswith(part + "/")]
        if not listed:
            raise ValueError(f"{path / part}: not in {path / MANIFEST}; the checkpoint does not hold it")
        for name in listed:
            file, expected = path / name, manifest[name]
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing (listed in {path / MANIFEST})")
            if file.stat().st_size != expected["bytes"]:
                raise ValueError(f"{file}: {file.stat().st_size} bytes where {expected['bytes']} were written: "
                                 "the file is truncated or damaged")
            if _crc32(file) != expected["crc32"]:
                raise ValueError(f"{file}: CRC32 differs from the one written in {MANIFEST}: the file is corrupted")


def optimizer_file(par: ParallelContext) -> str:
    return "optimizers.pt" if par.tp_size == 1 else f"optimizers-tp{par.tp_rank}.pt"


def save_checkpoint(out_dir: str | Path, step: int, models: dict, optimizers: dict, extra: dict,
                    run_config: dict | None = None) -> Path:
    """Write ckpt-<step> (models by name in HF format, optimizers, extra state, RNG, the run's config as
    JSON), point `latest` at it, remove the older ones. Returns the checkpoint directory once it is in place,
    on every rank."""
    par = next(iter(models.values())).par
    out_dir = Path(out_dir)
    # a second save of one step (a resumed run that stops at once) takes a new name: the directory `latest`
    # names must stay whole until the pointer has moved
    names = itertools.chain([f"ckpt-{step}"], (f"ckpt-{step}-{n}" for n in itertools.count(1)))
    final = next(out_dir / name for name in names if not (out_dir / name).exists())
    tmp = final.with_name(final.name + ".tmp")
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash mid-write
        tmp.mkdir(parents=True)
    barrier(par)
    for name, model in models.items():
        save_model(model, tmp / name)
    if par.dp_rank == 0:  # the other DP groups hold the same optimizer state
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / optimizer_file(par))
    barrier(par)
    if par.is_main:
        torch.save({"step": step, "rng": rng_states(), **extra}, tmp / "state.pt")
        if run_config is not None:
            (tmp / RUN_CONFIG).write_text(json.dumps(run_config, indent=2) + "\n")
        _commit(tmp, final)
    barrier(par)  # no rank picks the next checkpoint's name before this one is committed
    return final


def _commit(tmp: Path, final: Path) -> None:
    """Manifest, fsync, rename into place, move `latest` (tmp + os.replace), then remove the older ones."""
    _write_manifest(tmp)
    for path in [*tmp.rglob("*"), tmp]:
        fsync(path)
    os.replace(tmp, final)
    fsync(final.parent)
    atomic_write(final.parent / POINTER, lambda pointer_tmp: pointer_tmp.write_text(final.name + "\n"))
    fsync(final.parent)
    for old in final.parent.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The directory `latest` points at, or None when out_dir has no checkpoint."""
    pointer = Path(out_dir) / POINTER
    if not pointer.is_file():
        return None
    path = Path(out_dir) / pointer.read_text(errors="replace").strip()
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{pointer}: points at {path}, which is not a complete checkpoint")
    return path


def find_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(the actor's Hugging Face directory, the run's config file or None) for a path that names a run's
    out_dir (its latest checkpoint), a checkpoint ckpt-<step>, that checkpoint's actor/, or a plain Hugging
    Face directory (no run config)."""
    path = Path(path)
    if (path / POINTER).is_file():
        path = latest_checkpoint(path)
    if (path / "actor" / "config.json").is_file():
        path = path / "actor"
    run_config = path.parent / RUN_CONFIG
    return path, run_config if run_config.is_file() and (path.parent / MANIFEST).is_file() else None


def load_checkpoint(out_dir: str | Path, models: dict, optimizers: dict) -> dict | None:
    """Restore models (in place), optimizers and RNG states from the latest checkpoint; return its extra
    state (step, data position, ...) or None when there is none."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    opt_name = optimizer_file(next(iter(models.values())).par)
    verify_checkpoint(path, [*models, opt_name, "state.pt"])
    for name, model in models.items():
        param = next(model.parameters())
        saved = load_model(path / name, device=param.device, dtype=param.dtype,
                           value_head=model.value_head is not None, par=model.par)
        model.load_state_dict(saved.state_dict())
    opt_path = path / opt_name
    opt_states = torch.load(opt_path, map_location="cpu", weights_only=False)
    for name, opt in optimizers.items():
        if name not in opt_states:
            raise KeyError(f"{opt_path}: no state for optimizer {name!r}")
        opt.load_state_dict(opt_states[name])
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    set_rng_states(state.pop("rng"))
    return state
