"""A tiny random process reward model written by the tests in the Hugging Face layout of Qwen2.5-Math-PRM,
and the reference that scores steps with transformers' Qwen2Model plus the same head.

    path, reference = write_prm_checkpoint(tmp_path / "prm")
    probs = reference(input_ids)       # P(step correct) at each separator, fp32

The checkpoint: config.json naming Qwen2ForProcessRewardModel, model.safetensors with the trunk under
model.* and the head under score.0.* / score.2.* (Linear(H, H), ReLU, Linear(H, 2)), no LM head. Its
tokenizer is the bundled Qwen2.5 one with id 151651 renamed from <|quad_end|> to <extra_0>, which is how
the real PRM's tokenizer names that id (the vocabulary and every other token are unchanged).
Not a test file; its users: python -m pytest -q tests/test_prm.py tests/test_prm_eval.py tests/test_train_cli.py
"""
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2Model

from nanoufo.model import PRM_ARCHITECTURE
from nanoufo.tokenizer import QWEN_TOKENIZER_DIR

QWEN_VOCAB = 151665  # len() of the bundled tokenizer, specials included
TINY_PRM = dict(vocab_size=QWEN_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
SEPARATOR_ID = 151651


def write_prm_tokenizer(path: Path) -> None:
    """The bundled Qwen2.5 tokenizer with id 151651 named <extra_0>, as in Qwen2.5-Math-PRM's tokenizer."""
    shutil.copytree(QWEN_TOKENIZER_DIR, path, dirs_exist_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(SEPARATOR_ID)]["content"] == "<|quad_end|>"
    config["added_tokens_decoder"][str(SEPARATOR_ID)]["content"] = "<extra_0>"
    config["additional_special_tokens"] = ["<extra_0>" if t == "<|quad_end|>" else t
                                           for t in config.get("additional_special_tokens", [])]
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


class Reference(nn.Module):
    """transformers' Qwen2Model with the PRM head: step probabilities at the separators of one input."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.model = Qwen2Model(config)
        H = config.hidden_size
        self.score = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 2))

    @torch.no_grad()
    def forward(self, ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([ids])
        hidden = self.model(input_ids=ids).last_hidden_state[0]  # (T, H)
        return torch.softmax(self.score(hidden), dim=-1)[:, 1][ids[0] == SEPARATOR_ID]  # (n_steps,)


def write_prm_checkpoint(path: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> tuple[Path, Reference]:
    torch.manual_seed(seed)
    config = Qwen2Config(**{**TINY_PRM, **overrides})
    config._attn_implementation = "eager"
    reference = Reference(config).eval()
    with torch.no_grad():  # a wider head than nn.Linear's default, so step probabilities spread over (0, 1)
        for p in reference.score.parameters():
            p.normal_(0.0, 0.4)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    hf = config.to_dict()
    hf.update(architectures=[PRM_ARCHITECTURE], model_type="qwen2", torch_dtype="float32")
    hf.pop("_attn_implementation", None)
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer:
        write_prm_tokenizer(path)
    return path, reference
