"""docs/scripting.md's example runs as written (on a tiny random checkpoint with the real Qwen2.5 vocabulary and
its tokenizer, the name in the example pointed at it, 16 tokens an attempt), and the silent cases the page lists
are errors.

    python -m pytest -q tests/test_scripting.py
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_scripting_example_runs(hf_checkpoint, qwen_tokenizer):
    ckpt, _ = hf_checkpoint(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    qwen_tokenizer.save_pretrained(ckpt)
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs/scripting.md").read_text(), re.DOTALL).group(1)
    code = code.replace('"Qwen2.5-0.5B-Instruct"', repr(str(ckpt))).replace("max_new_tokens=256", "max_new_tokens=16")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 1"], done.stdout
    assert all(re.fullmatch(r"step \d: score -?\d\.\d{3}, loss -?\d+\.\d{4}", line) for line in lines)


def test_what_the_update_cannot_do_is_an_error(torch_paths):
    import torch

    from nanoufo import demo
    from nanoufo.options import UpdateOptions
    from nanoufo.trainer import Scored, build_batch, check_models
    actor = demo.build_model(40, seed=0)
    with pytest.raises(ValueError, match="kl_coef=0.001 needs a reference model"):
        check_models(UpdateOptions(), critic=actor, ref=None, group_size=4)
    with pytest.raises(ValueError, match="algorithm='ufo_ppo' needs a critic"):
        check_models(UpdateOptions(kl_coef=0.0), critic=None, ref=None, group_size=4)
    with pytest.raises(ValueError, match="1 sample per problem"):
        check_models(UpdateOptions(algorithm="grpo", kl_coef=0.0), critic=None, ref=None, group_size=1)
    with pytest.raises(ValueError, match="reward_placement='per_turn' needs algorithm='ufo_ppo'"):
        UpdateOptions(algorithm="grpo", reward_placement="per_turn")
    tokens, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[0.0, 1.0, 1.0]])
    scored = Scored(tokens, torch.tensor([3]), mask, torch.zeros(1, 3), [[(1, 3)]], 0, 0, scores=torch.ones(1),
                    rewards=mask, group_size=1)
    with pytest.raises(ValueError, match="needs a reference model"):  # before any forward
        build_batch(UpdateOptions(), actor, demo.build_model(40, seed=0, value_head=True), None, scored)
