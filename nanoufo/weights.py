"""Hugging Face checkpoint directories in and out: config.json plus model.safetensors, or shards listed
in model.safetensors.index.json. A directory saved here opens in transformers or vLLM unchanged.

    model = load_model("Qwen2.5-3B-Instruct/", device="cuda", dtype=torch.bfloat16)
    save_model(model, "out/step_200/")

Tensors are read one at a time straight onto the target device and cast there, so no full fp32 copy of
the model ever sits in CPU memory. Every problem is reported with the file and tensor it concerns.
Under tensor parallelism (par=ParallelContext from nanoufo/parallel.py) each rank reads only its slice of each
tensor (safetensors get_slice), so no rank ever holds the whole model; save_model gathers the slices and
global rank 0 writes one ordinary checkpoint.
Tests: python -m pytest -q tests/test_weights.py
"""
import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoufo.model import QwenConfig, Qwen2, param_shapes
from nanoufo.parallel import SINGLE, ParallelContext, barrier, check_tp_split, full_state_dict, hf_tensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def consecutive_runs(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive runs of indices whose sizes add up to at most limit (an item larger than limit goes alone):
    the shards of a saved checkpoint."""
    runs, total = [[]], 0
    for i, size in enumerate(sizes):
        if runs[-1] and total + size > limit:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += size
    return runs


def checkpoint_files(ckpt_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = [ckpt_dir / name for name in dict.fromkeys(weight_map.values())]
        if missing := [f for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{missing[0]}: shard listed in {index} is missing")
        return files
    if (ckpt_dir / SINGLE_NAME).is_file():
        return [ckpt_dir / SINGLE_NAME]
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint directory not found")
    hint = " (only .bin weights found: convert them to safetensors)" if any(ckpt_dir.glob("*.bin")) else ""
    raise FileNotFoundError(f"{ckpt_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")


@torch.no_grad()
def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               value_head: bool = False, par: ParallelContext = SINGLE, head_init: str = "zero",
               seed: int = 0) -> Qwen2:
    """Build a Qwen2 from a HF checkpoint directory. With value_head=True (the critic) a checkpoint without
    value_head.* tensors is accepted and the head starts as head_init says: "zero" (the critic's first values
    are 0), or "normal" (weights N(0, initializer_range) from a generator seeded with `seed`, the same on every
    rank; a zero bias), as transformers initialises a token-classification head that its checkpoint lacks.
    With par.tp_size > 1 this rank's slices of the weights are read, and nothing else."""
    ckpt_dir = Path(ckpt_dir)
    config = QwenConfig.from_json(ckpt_dir / "config.json")
    check_tp_split(config, par.tp_size, source=str(ckpt_dir / "config.json"))
    dtype = dtype or getattr(torch, config.torch_dtype)
    with torch.device("meta"):
        model = Qwen2(config, value_head=value_head, par=par).to(dtype)
    model.to_empty(device=device)
    params, full_shapes, layout = dict(model.named_parameters()), param_shapes(config, value_head), hf_tensors(model)
    loaded = set()
    for path in checkpoint_files(ckpt_dir):
        for name, part in _read_slices(path, device):
            if name not in layout:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some tied checkpoints store the head anyway; it equals the embedding
                raise ValueError(f"{path}: unexpected tensor {name!r} (not part of a {model.__class__.__name__} "
                                 f"with config {ckpt_dir / 'config.json'})")
            if part.get_shape() != list(full_shapes[name]):
                raise ValueError(f"{path}: tensor {name!r} has shape {part.get_shape()} but config.json implies "
                                 f"{list(full_shapes[name])}")
            where = layout[name]
            where.local(params).copy_(part[:] if where.shard is None else where.shard.take(part))
            loaded.add(name)
    missing = [n for n in layout if n not in loaded]
    if value_head and all(n.startswith("value_head.") for n in missing):
        for n in missing:
            layout[n].local(params).zero_()
        if head_init == "normal" and "value_head.weight" in missing:
            drawn = torch.empty(model.value_head.weight.shape)  # drawn on the CPU in fp32: equal on every device
            drawn.normal_(0.0, config.initializer_range, generator=torch.Generator().manual_seed(seed))
            model.value_head.weight.copy_(drawn)
    elif missing:
        raise ValueError(f"{ckpt_dir}: tensor {missing[0]!r} missing from the checkpoint"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return model


def _read_slices(path: Path, device):
    """(name, lazy safetensors slice) pairs; indexing a slice reads only the bytes asked for."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_slice(name)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def hf_config_dict(config: QwenConfig, dtype: torch.dtype) -> dict:
    """config.json for the model: the loaded file with nanoufo's fields written over it."""
    spelled_otherwise = ("architecture", "torch_dtype", "rope_theta", "hf")  # HF's keys for these are set below
    hf = dict(config.hf, architectures=[config.architecture], model_type="qwen2", hidden_act="silu")
    hf.update({f.name: getattr(config, f.name) for f in fields(config) if f.name not in spelled_otherwise})
    hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")  # older and newer readers' keys
    if "rope_parameters" in hf:
        hf["rope_parameters"] = dict(hf["rope_parameters"], rope_theta=config.rope_theta)
    else:
        hf["rope_theta"] = config.rope_theta
    return hf


def save_model(model: Qwen2, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and the weights (sharded past max_shard_bytes) into out_dir, each file atomically.
    Under tensor or data parallelism every rank must call it: the slices are gathered, global rank 0 writes
    one ordinary checkpoint, and every rank returns once it is on disk."""
    state = full_state_dict(model, model.par)  # None on every rank but global rank 0
    if state is not None:
        _write_checkpoint(state, model.config, Path(out_dir), max_shard_bytes)
    barrier(model.par)


def _write_checkpoint(state: dict[str, torch.Tensor], config: QwenConfig, out_dir: Path, max_shard_bytes: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    items = list(state.items())
    nbytes = [t.numel() * t.element_size() for _, t in items]
    shards = [dict(items[i] for i in run) for run in consecutive_runs(nbytes, max_shard_bytes)]
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        atomic_write(out_dir / fname, lambda tmp, shard=shard: save_file(
            {k: v.cpu() for k, v in shard.items()}, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes)},
                 "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}}
        atomic_write(out_dir / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    kept = set(names) | ({INDEX_NAME} if len(shards) > 1 else set())
    for p in [out_dir / SINGLE_NAME, out_dir / INDEX_NAME, *out_dir.glob("model-*-of-*.safetensors")]:
        if p.name not in kept:  # left by an earlier save with another number of shards
            p.unlink(missing_ok=True)
    hf_config = hf_config_dict(config, items[0][1].dtype)
    atomic_write(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2)))


def fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """write(tmp) fills a temporary file, which is fsynced and renamed onto path: no reader sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync(tmp)
    os.replace(tmp, path)
