"""Tokenizers: the real Qwen2.5 tokenizer bundled in nanoufo/assets (for tests and as the default), or
the one saved beside a checkpoint.

    tok = load_tokenizer()                 # bundled Qwen2.5 tokenizer
    tok = load_tokenizer("Qwen2.5-3B/")    # the checkpoint's own
"""
from pathlib import Path

from transformers import AutoTokenizer

QWEN_TOKENIZER_DIR = Path(__file__).parent / "assets" / "qwen2.5-tokenizer"


def load_tokenizer(path: str | Path | None = None):
    path = Path(path or QWEN_TOKENIZER_DIR)
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path / 'tokenizer_config.json'}: not found (no tokenizer in {path})")
    return AutoTokenizer.from_pretrained(str(path))
