"""Loading and saving Hugging Face checkpoint directories, and the error for each kind of bad input.

    python -m pytest -q tests/test_weights.py
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

from nanoufo.weights import load_model, save_model

TOL = 1e-5


def logits_of(model, ids):
    return model.logits(model(ids, torch.arange(ids.shape[1]).expand_as(ids)))


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_round_trip_opens_in_transformers_with_same_logits(hf_checkpoint, tmp_path, tied):
    path, hf = hf_checkpoint(tie_word_embeddings=tied)
    model = load_model(path)
    save_model(model, tmp_path / "saved")
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, 101, (2, 9))
    assert (reloaded(ids).logits - hf(ids).logits).abs().max() < TOL
    assert (logits_of(load_model(tmp_path / "saved"), ids) - hf(ids).logits).abs().max() < TOL
    assert ("lm_head.weight" in load_file(tmp_path / "saved" / "model.safetensors")) != tied


@torch.no_grad()
def test_sharded_checkpoints_load_and_save(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint(max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path)
    ids = torch.randint(0, 101, (1, 6))
    assert (logits_of(model, ids) - hf(ids).logits).abs().max() < TOL
    save_model(model, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
    assert (Qwen2ForCausalLM.from_pretrained(tmp_path / "out")(ids).logits - hf(ids).logits).abs().max() < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_in_any_dtype(hf_checkpoint, tmp_path, dtype):
    path, hf = hf_checkpoint()
    hf.to(dtype).save_pretrained(tmp_path / "half")
    assert load_model(tmp_path / "half").model.embed_tokens.weight.dtype == dtype  # config's dtype by default
    model32 = load_model(tmp_path / "half", dtype=torch.float32)
    assert torch.equal(model32.model.norm.weight, hf.model.norm.weight.float())
    save_model(load_model(tmp_path / "half"), tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]


def test_critic_starts_from_actor_checkpoint_and_round_trips(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint()
    critic = load_model(path, value_head=True)
    with torch.no_grad():
        critic.value_head.weight.fill_(0.5)
    save_model(critic, tmp_path / "critic")
    assert torch.equal(load_model(tmp_path / "critic", value_head=True).value_head.weight, critic.value_head.weight)


def test_a_critic_head_missing_from_the_checkpoint_starts_as_asked(hf_checkpoint, tmp_path):
    """head_init "zero" (the default), or "normal": N(0, initializer_range) weights from the seed and a zero bias,
    as transformers initialises the token-classification head verl's critic loads (UFO's code); a head the
    checkpoint holds is loaded whatever head_init says."""
    path, _ = hf_checkpoint(hidden_size=256, initializer_range=0.05)
    zero = load_model(path, value_head=True).value_head
    assert not zero.weight.any() and not zero.bias.any()
    normal = load_model(path, value_head=True, head_init="normal", seed=3).value_head
    assert normal.weight.shape == (1, 256) and not normal.bias.any()
    assert 0.04 < normal.weight.std().item() < 0.06 and abs(normal.weight.mean().item()) < 0.015
    head = lambda seed: load_model(path, value_head=True, head_init="normal", seed=seed).value_head.weight  # noqa: E731
    assert torch.equal(normal.weight, head(3)) and not torch.equal(normal.weight, head(4))
    critic = load_model(path, value_head=True, head_init="normal", seed=3)
    save_model(critic, tmp_path / "critic")  # a checkpoint with its head: loaded as saved
    loaded = load_model(tmp_path / "critic", value_head=True, head_init="normal", seed=9).value_head.weight
    assert torch.equal(loaded, critic.value_head.weight)


# --- bad input: each error names the file and the problem ---

def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json: not found"):
        load_model(tmp_path)


def test_missing_weights(hf_checkpoint):
    path, _ = hf_checkpoint()
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{path}: no model\.safetensors"):
        load_model(path)


def test_missing_shard(hf_checkpoint):
    path, _ = hf_checkpoint(max_shard_size="50KB")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}: shard listed in .*index\.json is missing"):
        load_model(path)


def edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(hf_checkpoint):
    path, _ = hf_checkpoint()
    edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' missing from the checkpoint"):
        load_model(path)


def test_unexpected_tensor(hf_checkpoint):
    path, _ = hf_checkpoint()
    edit_weights(path, lambda t: t.update(extra=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'extra'"):
        load_model(path)


def test_shape_mismatch(hf_checkpoint):
    path, _ = hf_checkpoint()
    edit_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[65\] "
                                         r"but config\.json implies \[64\]"):
        load_model(path)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, r"unsupported architecture \['LlamaForCausalLM'\]"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope scaling .* is not supported"),
    ({"use_sliding_window": True}, r"use_sliding_window=true is not supported"),
])
def test_unsupported_config(hf_checkpoint, change, message):
    path, _ = hf_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=rf"config\.json: {message}"):
        load_model(path)


def test_config_missing_key_and_bad_json(hf_checkpoint):
    path, _ = hf_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing key 'hidden_size'"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_corrupted_safetensors_file(hf_checkpoint):
    path, _ = hf_checkpoint()
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(path)
