"""nanoufo.model against transformers' Qwen2ForCausalLM on tiny random models (fp32, CPU, 1e-5).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_model.py
"""
import pytest
import torch

from nanoufo.model import KVCache
from nanoufo.weights import load_model

CONFIGS = {
    "untied_gqa2": dict(),
    "tied_mha": dict(tie_word_embeddings=True, num_key_value_heads=4),  # 1 query head per KV head
    "gqa4_odd_vocab": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, vocab_size=257),
    "gqa2_theta_1e4": dict(rope_theta=1e4, vocab_size=97),
}
TOL = 1e-5


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, hf_checkpoint):
    path, hf = hf_checkpoint(**CONFIGS[request.param])
    return load_model(path).eval(), hf


def right_padded_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    positions = torch.arange(T).expand(len(lengths), T)
    return ids, mask, positions


@torch.no_grad()
def test_single_sequence_logits_match_transformers(pair):
    model, hf = pair
    ids, _, pos = right_padded_batch([13], hf.config.vocab_size)
    ours = model.logits(model(ids, pos))
    assert (ours - hf(ids).logits).abs().max() < TOL


@torch.no_grad()
def test_padded_batch_logits_match_transformers(pair):
    model, hf = pair
    ids, mask, pos = right_padded_batch([11, 4, 7], hf.config.vocab_size)
    ours = model.logits(model(ids, pos))  # (B, T, V)
    ref = hf(ids, attention_mask=mask.long()).logits
    assert (ours - ref)[mask].abs().max() < TOL
    for b, n in enumerate([11, 4, 7]):  # and each row equals that sequence on its own
        alone = hf(ids[b:b + 1, :n]).logits[0]
        assert (ours[b, :n] - alone).abs().max() < TOL


@torch.no_grad()
def test_packed_sequences_match_separate_forwards(pair):
    model, hf = pair
    lengths = [5, 9, 3]
    ids = torch.randint(0, hf.config.vocab_size, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # restarts at 0 per sequence
    ours = model.logits(model(ids, pos))[0]
    start = 0
    for n in lengths:
        ref = hf(ids[:, start:start + n]).logits[0]
        assert (ours[start:start + n] - ref).abs().max() < TOL
        start += n


@torch.no_grad()
def test_kv_cache_prefill_then_decode_matches_full_forward(pair):
    model, hf = pair
    lengths, n_decode = [6, 2, 9], 5
    ids, mask, _ = right_padded_batch([n + n_decode for n in lengths], hf.config.vocab_size, seed=1)
    full = model.logits(model(ids, torch.arange(ids.shape[1]).expand_as(ids)))  # (B, T, V)
    cache = KVCache.allocate(model.config, batch=3, max_len=ids.shape[1] + 2)
    prefill_len = max(lengths)
    prompt = torch.stack([torch.cat([ids[b, :n], ids.new_zeros(prefill_len - n)]) for b, n in enumerate(lengths)])
    pos = torch.arange(prefill_len).expand(3, prefill_len)  # padding writes slots that later tokens overwrite
    out = model.logits(model(prompt, pos, cache=cache))
    for b, n in enumerate(lengths):
        assert (out[b, :n] - full[b, :n]).abs().max() < TOL
    for step in range(n_decode):
        cur = torch.tensor(lengths) + step  # (B,) position of each row's next token
        tok = ids[torch.arange(3), cur][:, None]  # (B, 1)
        out = model.logits(model(tok, cur[:, None], cache=cache))[:, 0]  # (B, V)
        assert (out - full[torch.arange(3), cur]).abs().max() < TOL
    assert (full[mask] - hf(ids, attention_mask=mask.long()).logits[mask]).abs().max() < TOL


@torch.no_grad()
def test_kv_cache_rows_subset_and_multi_token_append(pair):
    """A feedback turn appends several tokens to some rows only; the cache is addressed by row."""
    model, hf = pair
    V = hf.config.vocab_size
    ids = torch.randint(0, V, (3, 12))
    full = model.logits(model(ids, torch.arange(12).expand(3, 12)))
    cache = KVCache.allocate(model.config, batch=3, max_len=12)
    model(ids[:, :5], torch.arange(5).expand(3, 5), cache=cache)
    rows = torch.tensor([2, 0])  # row 1 has finished: it leaves the batch
    out = model.logits(model(ids[rows, 5:9], torch.arange(5, 9).expand(2, 4), cache=cache, cache_rows=rows))
    assert (out - full[rows, 5:9]).abs().max() < TOL


def test_value_head_is_a_scalar_per_token(hf_checkpoint):
    path, _ = hf_checkpoint()
    critic = load_model(path, value_head=True)
    ids = torch.randint(0, 101, (2, 7))
    values = critic.values(critic(ids, torch.arange(7).expand(2, 7)))
    assert values.shape == (2, 7) and values.dtype == torch.float32
    assert torch.all(values == 0)  # a critic starts from the actor with a zero head


def test_tokenizer_chat_template_drives_model(qwen_tokenizer, hf_checkpoint):
    """The real Qwen2.5 tokenizer's chat-templated ids run through a model with its vocab size."""
    tok = qwen_tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is 7 * 6? Put it in \\boxed{}."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = torch.tensor(tok(text)["input_ids"])[None]
    assert tok.decode(ids[0]) == text and ids[0, -3:].tolist() == tok.encode("<|im_start|>assistant\n")
    path, hf = hf_checkpoint(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_attention_heads=2,
                             num_key_value_heads=1)
    model = load_model(path).eval()
    with torch.no_grad():
        ours = model.logits(model(ids, torch.arange(ids.shape[1])[None]))
        assert ours.shape == (1, ids.shape[1], len(tok))
        assert (ours - hf(ids).logits).abs().max() < TOL
