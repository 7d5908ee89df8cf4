"""nanoufo.sampler: the cached multi-turn sampler against a full-recompute reference, transformers' generate,
full-forward log-probs and the real Qwen2.5 template; prefill work, rows leaving the batch, no two draws
sharing a noise id, edge cases (max_len reached exactly by a prompt or by feedback).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_sampler.py

The decode kernels are checked against their references in test_kernels_decode.py; here one test runs the
sampler on them (under the interpreter; skipped without it) and the others take the PyTorch paths, which
keeps this file fast.
"""
import dataclasses

import pytest
import torch

from nanoufo.kernels.dispatch import interpreting
from nanoufo.env import UFOEnv
from nanoufo.options import SamplingOptions
from nanoufo.sampler import generate
from nanoufo.weights import load_model

SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingOptions)}
PROMPTS = [[5, 17, 3, 88, 41, 9, 12], [7, 2], [60, 61, 62, 63, 64], [33, 34, 35]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_model
    hf = make_hf_model(seed=3)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return load_model(path).eval(), hf


class Script:
    """A deterministic environment: row b gets turns[b] attempts; feedback length varies with row and turn."""

    def __init__(self, turns: list[int]):
        self.turns, self.seen = turns, [0] * len(turns)
        self.calls: list[tuple[list[int], list[list[int]], list[bool]]] = []

    def __call__(self, rows, responses, ended_with_stop):
        self.calls.append((list(rows), [list(r) for r in responses], list(ended_with_stop)))
        replies = []
        for b in rows:
            self.seen[b] += 1
            replies.append(None if self.seen[b] >= self.turns[b] else [90 + b, 91, 92][: 1 + (b + self.seen[b]) % 3])
        return replies


@torch.no_grad()
def reference_greedy(model, prompts, turns, *, max_new_tokens, stop_ids, max_len):
    """The slow sampler: each row alone, the whole conversation recomputed for every token."""
    rows = []
    for b, prompt in enumerate(prompts):
        script, seq, mask = Script(turns), list(prompt), [0] * len(prompt)
        while True:
            start = len(seq)
            stopped = False
            while len(seq) < max_len and len(seq) - start < max_new_tokens and not stopped:
                ids = torch.tensor([seq])
                seq.append(int(model.logits(model(ids, torch.arange(len(seq))[None]))[0, -1].argmax()))
                mask.append(1)
                stopped = seq[-1] in stop_ids
            reply = script([b], [seq[start:]], [stopped])[0]
            if reply is None or len(seq) + len(reply) >= max_len:
                break
            seq, mask = seq + reply, mask + [0] * len(reply)
        rows.append((seq, mask))
    return rows


def first_emitted_token(model, prompt):
    """A token the tiny model emits greedily soon after the prompt, used as a stop token (so stops happen)."""
    ref = reference_greedy(model, [prompt], [1], max_new_tokens=3, stop_ids=set(), max_len=99)
    return ref[0][0][len(prompt) + 2]


def sampling_of(kw: dict) -> SamplingOptions:
    """The SamplingOptions keys of kw, taken out of it, as one SamplingOptions."""
    return SamplingOptions(**{key: kw.pop(key) for key in list(kw) if key in SAMPLING_KEYS})


def run(model, prompts, turns, **kw):
    script = Script(turns)
    kw = {"max_turns": 3, "max_new_tokens": 6, "temperature": 0.0, **kw}
    return generate(model, prompts, script, sampling_of(kw), **kw), script


def assert_matches_reference(model, rollout, turns, stop, max_len, max_new_tokens=6, prompts=PROMPTS):
    ref = reference_greedy(model, prompts, turns, max_new_tokens=max_new_tokens, stop_ids={stop}, max_len=max_len)
    for b, (seq, mask) in enumerate(ref):
        n = int(rollout.lengths[b])
        assert rollout.tokens[b, :n].tolist() == seq, f"row {b}"
        assert rollout.loss_mask[b, :n].tolist() == mask and rollout.loss_mask[b, n:].sum() == 0


def test_greedy_multi_turn_equals_full_recompute(tiny, torch_paths):
    model, _ = tiny
    stop, turns = first_emitted_token(model, PROMPTS[1]), [3, 2, 1, 3]
    rollout, script = run(model, PROMPTS, turns, stop_ids=[stop])
    assert_matches_reference(model, rollout, turns, stop, max_len=99)
    flags = [f for _, _, stops in script.calls for f in stops]
    assert True in flags and False in flags  # some attempts stopped, some hit the token limit
    assert [len(s) for s in rollout.turn_spans] == turns


@pytest.mark.skipif(not interpreting(), reason="the model is on the CPU, where only TRITON_INTERPRET=1 runs the "
                                                "decode kernels; without it this would test the PyTorch paths again")
def test_greedy_multi_turn_on_triton_kernels(tiny):
    """The same check with the decode kernels, run by the interpreter on the CPU."""
    model, _ = tiny
    stop, turns = first_emitted_token(model, PROMPTS[1]), [2, 1, 1, 2]
    rollout, _ = run(model, PROMPTS, turns, stop_ids=[stop], max_new_tokens=4)
    assert_matches_reference(model, rollout, turns, stop, max_len=99, max_new_tokens=4)


def test_single_turn_equals_transformers_generate(tiny, torch_paths):
    model, hf = tiny
    stop = first_emitted_token(model, PROMPTS[0])
    rollout, _ = run(model, PROMPTS, [1] * 4, stop_ids=[stop], max_new_tokens=8)
    for b, prompt in enumerate(PROMPTS):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=stop,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert rollout.tokens[b, :int(rollout.lengths[b])].tolist() == out[0].tolist(), f"row {b}"


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_full_forward(tiny, torch_paths, temperature, top_p):
    model, _ = tiny
    rollout, _ = run(model, PROMPTS, [3, 2, 1, 3], stop_ids=[7], temperature=temperature, top_p=top_p, seed=4)
    T = rollout.tokens.shape[1]
    with torch.no_grad():
        logits = model.logits(model(rollout.tokens, torch.arange(T).expand_as(rollout.tokens)))  # (B, T, V)
    full = torch.log_softmax(logits[:, :-1] / (temperature or 1.0), -1).gather(-1, rollout.tokens[:, 1:, None])[..., 0]
    mask = rollout.loss_mask[:, 1:].bool()
    assert mask.sum() > 10 and rollout.loss_mask[:, 0].sum() == 0
    assert (rollout.logprobs[:, 1:][mask] - full[mask]).abs().max() < 1e-5
    assert torch.all(rollout.logprobs[rollout.loss_mask == 0] == 0)


def test_same_seed_same_samples(tiny, torch_paths):
    model, _ = tiny
    a, _ = run(model, PROMPTS, [2] * 4, stop_ids=[7], temperature=1.0, seed=11)
    b, _ = run(model, PROMPTS, [2] * 4, stop_ids=[7], temperature=1.0, seed=11)
    c, _ = run(model, PROMPTS, [2] * 4, stop_ids=[7], temperature=1.0, seed=12)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_a_rows_samples_do_not_depend_on_the_other_rows(tiny, torch_paths):
    """Sampling noise is keyed per row (today by (step, row), after issue 14 by (episode, token index)); both
    keyings give these two properties, which noise keyed by batch position or shared by all rows breaks."""
    model, _ = tiny

    def rows(prompts, turns):
        rollout = run(model, prompts, turns, stop_ids=[], temperature=1.0, seed=5)[0]
        return [rollout.tokens[b, :n].tolist() for b, n in enumerate(rollout.lengths.tolist())]

    # row 0 leaves the batch after its first attempt instead of its third: rows 1-3 sample exactly as before
    assert rows(PROMPTS, [3, 3, 3, 3])[1:] == rows(PROMPTS, [1, 3, 3, 3])[1:]
    twins = rows([PROMPTS[1]] * 2, [1, 1])  # one prompt twice, one attempt each (a group): two different draws
    assert len(twins[0]) == len(twins[1]) and twins[0] != twins[1]


def test_the_noise_follows_the_episode_id_not_the_batch_row(tiny, torch_paths):
    model, _ = tiny
    sampling = SamplingOptions(max_new_tokens=6, temperature=1.0)
    sample = lambda prompts, ids: generate(model, prompts, Script([1, 1]), sampling, max_turns=1,  # noqa: E731
                                           stop_ids=[], seed=5, episode_ids=ids).tokens.tolist()
    assert sample([PROMPTS[1], PROMPTS[3]], [5, 9]) == sample([PROMPTS[3], PROMPTS[1]], [9, 5])[::-1]


def test_no_two_kept_draws_share_a_noise_id(tiny, torch_paths, kept_draws):
    """A draw is (seed, noise id) -> uniforms: two draws with one id are one draw, so a UFO retry that reused its
    first attempt's ids would repeat its noise. Every kept draw of a run has its own id, across the turns of
    an episode and the episodes of the batch, rows reused as episodes end; every sampled token is one draw."""
    from nanoufo.decode import kv_bytes_per_row
    model, _ = tiny
    prompts, turns = PROMPTS + [PROMPTS[1], PROMPTS[1]], [3, 2, 1, 3, 3, 2]  # a group of three on prompt 1
    rollout, _ = run(model, prompts, turns, stop_ids=[7], temperature=1.0, seed=3, max_len=40,
                     kv_budget_gb=4 * kv_bytes_per_row(model, 40) / 2**30)  # 3 rows for 6 episodes
    assert len(kept_draws) == rollout.loss_mask.sum() and sum(len(s) for s in rollout.turn_spans) == sum(turns)
    assert len(set(kept_draws)) == len(kept_draws), f"{len(kept_draws) - len(set(kept_draws))} draws repeat one"


@pytest.mark.parametrize("room", [0, 1])
def test_feedback_that_reaches_max_len_exactly_ends_the_episode(tiny, torch_paths, room):
    """Prompt 2 + attempt 3 + feedback 2 = 7 tokens. With max_len 7 the feedback leaves no slot to sample:
    the episode ends after its first attempt. With max_len 8 it goes on, and its second attempt is the one
    token that fits; the feedback after it (1 token) would fill the context again, so it ends there."""
    model, _ = tiny
    max_len = 7 + room
    rollout, script = run(model, [PROMPTS[1]], [3], stop_ids=[], max_new_tokens=3, max_len=max_len)
    assert [len(r) for r in script.calls[0][1]] == [3]  # the first attempt: 3 tokens
    assert rollout.turn_spans == ([[(2, 5)]] if room == 0 else [[(2, 5), (7, 8)]])
    assert int(rollout.lengths[0]) == max_len - 2 * (room == 0)
    assert rollout.tokens[0, 5:7].tolist() == ([] if room == 0 else [90, 91])  # Script's feedback of turn 1
    assert_matches_reference(model, rollout, [3], stop=-1, max_len=max_len, max_new_tokens=3, prompts=PROMPTS[1:2])


def test_max_turns_ends_an_episode_the_environment_would_continue(tiny, torch_paths):
    model, _ = tiny
    rollout, script = run(model, PROMPTS, [5] * 4, max_turns=2, stop_ids=[], max_new_tokens=2)
    assert [len(spans) for spans in rollout.turn_spans] == [2] * 4 and script.seen == [2] * 4


def test_prefill_grows_with_new_tokens_only_and_done_rows_leave(tiny, torch_paths, monkeypatch):
    model, _ = tiny
    events, forward, script = [], model.forward, Script([3, 1, 2, 3])
    monkeypatch.setattr(model, "forward", lambda ids, pos, cache=None, cache_rows=None, **kw: (
        events.append(("forward", ids.shape[1], cache_rows.tolist())) or forward(ids, pos, cache, cache_rows, **kw)))

    def next_turn(rows, responses, stopped):
        replies = script(rows, responses, stopped)
        events.extend(("end", b) for b, reply in zip(rows, replies) if reply is None)
        return replies

    rollout = generate(model, PROMPTS, next_turn, SamplingOptions(max_new_tokens=5, temperature=0.0), max_turns=3,
                       stop_ids=[])
    feedback = [1 + (b + t) % 3 for b in range(4) for t in range(1, script.turns[b])]  # Script's feedback lengths
    assert rollout.n_prefill_tokens == sum(map(len, PROMPTS)) + sum(n + 1 for n in feedback)  # + the token before
    forwards = [e for e in events if e[0] == "forward"]
    assert forwards[0] == ("forward", 7, [0, 1, 2, 3])  # the prompts, padded to the longest
    assert all(width <= 4 for _, width, _ in forwards[1:])  # a decode step, or feedback + the token before it
    assert rollout.n_decode_steps == sum(width == 1 for _, width, _ in forwards[1:])  # feedback calls are wider
    for i, event in enumerate(events):  # a row whose episode ended is in no later call
        if event[0] == "end":
            assert all(event[1] not in e[2] for e in events[i:] if e[0] == "forward")
    assert sorted(e[1] for e in events if e[0] == "end") == [0, 1, 2, 3]


def test_every_row_solved_at_turn_zero(tiny, torch_paths):
    model, _ = tiny
    rollout, script = run(model, PROMPTS, [1] * 4, stop_ids=[], max_new_tokens=3)
    assert rollout.n_prefill_tokens == sum(map(len, PROMPTS)) and rollout.n_decode_steps == 2
    assert [s for s in rollout.turn_spans] == [[(len(p), len(p) + 3)] for p in PROMPTS]
    assert rollout.loss_mask.sum() == 12 and len(script.calls) == 1 and script.calls[0][2] == [False] * 4


def test_context_limit_ends_rows_cleanly(tiny, torch_paths):
    model, _ = tiny
    max_len = len(PROMPTS[0])  # the longest prompt fills the cache: it gets an empty attempt
    rollout, script = run(model, PROMPTS, [3] * 4, stop_ids=[], max_new_tokens=4, max_len=max_len)
    assert rollout.turn_spans[0] == [(7, 7)] and rollout.loss_mask[0].sum() == 0
    assert int(rollout.lengths.max()) <= max_len
    assert_matches_reference(model, rollout, [3] * 4, stop=-1, max_len=max_len, max_new_tokens=4)
    # row 1: 4 tokens, then feedback that leaves no room is refused; row 2 stops at the limit after 2
    assert rollout.turn_spans == [[(7, 7)], [(2, 6)], [(5, 7)], [(3, 7)]]


def test_empty_batch_and_bad_prompts(tiny, torch_paths):
    model, _ = tiny
    empty, script = run(model, [], [], stop_ids=[1])
    assert empty.tokens.shape == (0, 0) and empty.turn_spans == [] and script.calls == []
    with pytest.raises(ValueError, match="prompt 1 has 9 tokens, more than max_len=8"):
        run(model, [[1, 2], list(range(9))], [1, 1], stop_ids=[1], max_len=8)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        run(model, [[]], [1], stop_ids=[1])


def test_loss_mask_covers_exactly_the_sampled_tokens_with_qwen_template(qwen_tokenizer, hf_checkpoint, torch_paths):
    tok = qwen_tokenizer
    path, _ = hf_checkpoint(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                            num_key_value_heads=1, num_hidden_layers=1)
    model, env = load_model(path).eval(), UFOEnv(tok)
    questions = ["What is 2 + 3?", "Natalia sold 48 clips in April and half as many in May. How many in all?"]
    prompts = [env.prompt_ids(q) for q in questions]
    turns = {0: 3, 1: 2}
    seen = {0: 0, 1: 0}
    attempts = {0: [], 1: []}

    def next_turn(rows, responses, stopped):
        out = []
        for b, r, s in zip(rows, responses, stopped):
            seen[b] += 1
            attempts[b].append(r)
            out.append(None if seen[b] == turns[b] else env.feedback_ids(s and r[-1] == env.turn_end_id))
        return out

    rollout = generate(model, prompts, next_turn, SamplingOptions(max_new_tokens=6, temperature=1.0), max_turns=3,
                       stop_ids=env.stop_ids, seed=1)
    for b, question in enumerate(questions):
        ids = rollout.tokens[b, :int(rollout.lengths[b])]
        mask = rollout.loss_mask[b, :len(ids)].bool()
        assert ids[mask].tolist() == [t for a in attempts[b] for t in a]  # every sampled token, nothing else
        context = tok.decode(ids[~mask])
        feedback = "<|im_end|>\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\n"  # after a token limit
        expected = tok.decode(prompts[b]) + feedback * (turns[b] - 1)
        assert context == expected and question in context
        for (start, end), attempt in zip(rollout.turn_spans[b], attempts[b]):
            assert ids[start:end].tolist() == attempt and mask[start:end].all() and not mask[end:end + 1].any()


def test_the_sampling_head_gives_fp32_logits_for_a_bf16_model():
    """The trainer's fused statistics compute the head in fp32; the sampler does too, so a bf16 policy's
    sampled log-probs are not rounded to bf16 logits first."""
    from nanoufo.model import QwenConfig, Qwen2
    from nanoufo.decode import Decoder, Sampling
    model = Qwen2(QwenConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.to(torch.bfloat16)
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # (R, H)
    logits = Decoder(model, 1, 4, Sampling(1.0, 1.0, 0), stop_ids=[], max_new_tokens=1).logits(hidden)
    expected = hidden.float() @ model.lm_head_weight.float().T  # (R, V)
    assert logits.dtype == torch.float32 and torch.allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_the_decode_head_reads_the_bf16_weight_itself_and_gives_fp32_logits(tiny, monkeypatch):
    """No fp32 copy of the LM head per step: the bf16 weight goes to mm_acc (on CUDA a bf16 product accumulated
    in fp32), and the logits are the fp32 product of the bf16 values."""
    import copy
    from nanoufo import decode
    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    decoder = decode.Decoder(model, 2, 16, decode.Sampling(1.0, 1.0, 0), [], 4)
    seen, real = [], decode.mm_acc
    monkeypatch.setattr(decode, "mm_acc", lambda a, b: seen.append(b) or real(a, b))
    hidden = torch.randn(3, model.config.hidden_size).to(torch.bfloat16)
    logits = decoder.logits(hidden)
    weight = model.lm_head_weight
    assert seen[0].dtype == torch.bfloat16 and seen[0].data_ptr() == weight.data_ptr()
    assert logits.dtype == torch.float32
    assert (logits - hidden.double() @ weight.double().T).abs().max() < 1e-4
