"""nanoufo.rollout and nanoufo.evaluate on a tiny random model with the real Qwen2.5 tokenizer and template;
an evaluation's draws never share a noise id; an attempt ends where stop_tokens says (a checkpoint's
generation_config.json under "generation_config").

    TRITON_INTERPRET=1 python -m pytest -q tests/test_rollout.py

The grader is replaced by a schedule in the tests that need solved episodes (a random model never
solves); the real grader runs in the first test. PyTorch paths (the kernels have their own tests).
"""
import json

import pytest
import torch

import nanoufo.env
from nanoufo.data import Problem
from nanoufo.env import UFOEnv
from nanoufo.evaluate import evaluate, held_out_metrics
from nanoufo.options import EnvOptions, SamplingOptions
from nanoufo.rollout import Noise, run_episodes
from nanoufo.task import generation_eos_ids
from nanoufo.tokenizer import load_tokenizer
from nanoufo.weights import load_model

PROBLEMS = [Problem("What is 2 + 3?", "5", "p0"), Problem("What is 10 / 4?", "2.5", "p1"),
            Problem("Natalia sold 48 clips in April and half as many in May. How many in all?", "72", "p2")]


pytestmark = pytest.mark.usefixtures("torch_paths")  # the kernels' PyTorch references (tests/conftest.py)


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory, qwen_tokenizer):
    from conftest import make_hf_model
    hf = make_hf_model(seed=1, vocab_size=len(qwen_tokenizer), hidden_size=16, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    path = tmp_path_factory.mktemp("qwen_tiny")
    hf.save_pretrained(path)
    return load_model(path).eval()


def saying_only(path, token_id: int, vocab_size: int):
    """A tiny checkpoint at `path` that greedily says token_id every step (every token embeds as the first unit
    vector, the layers add nothing, only token_id's lm_head row reads it), with a base Qwen2.5's
    generation_config.json (eos_token_id 151643); loaded as nanoufo's model."""
    import torch
    from conftest import TINY_QWEN, make_hf_model
    hf = make_hf_model(seed=1, vocab_size=vocab_size, **TINY_QWEN)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.model.embed_tokens.weight.zero_()
        hf.model.embed_tokens.weight[:, 0] = 1.0
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[token_id, 0] = 1.0
    hf.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    return load_model(path).eval()


@pytest.mark.parametrize("stop_tokens", ["turn_end", "generation_config"])
@pytest.mark.parametrize("says", ["<|im_end|>", "<|endoftext|>"])
def test_an_attempt_ends_where_stop_tokens_says(tmp_path, says, stop_tokens):
    """A base Qwen2.5 (tokenizer eos <|endoftext|>, generation_config eos 151643): under "generation_config" an
    <|im_end|> does not end the attempt, which runs to max_new_tokens, as vLLM runs Intuitor's base model; its
    <|endoftext|> does, and the attempt (and its loss mask) holds that token. Under "turn_end" either ends it."""
    base = load_tokenizer()
    base.eos_token = "<|endoftext|>"
    said = base.convert_tokens_to_ids(says)
    model = saying_only(tmp_path, said, len(base))
    assert generation_eos_ids(tmp_path) == (151643,)
    env = UFOEnv(base, EnvOptions(max_turns=2, grading="exact", stop_tokens=stop_tokens),
                 generation_eos_ids=generation_eos_ids(tmp_path))
    graded = run_episodes(model, env, PROBLEMS[:1], SamplingOptions(max_new_tokens=5, temperature=0.0), Noise())
    runs_on = stop_tokens == "generation_config" and says == "<|im_end|>"
    rollout, length = graded.rollout, 5 if runs_on else 1
    assert [e - s for s, e in rollout.turn_spans[0]] == [length, length]  # two wrong attempts
    for s, e in rollout.turn_spans[0]:
        assert rollout.tokens[0, s:e].tolist() == [said] * length
        assert rollout.loss_mask[0, s:e].tolist() == [1.0] * length
    assert rollout.loss_mask[0].sum().item() == 2 * length


@pytest.fixture
def solve_at(monkeypatch):
    """Grade by schedule: a problem whose gold is g is judged correct at its {g: turn}-th grading (0-based)."""
    def install(schedule: dict[str, int]):
        graded = {}

        def grade_batch(answers, golds, timeout=5.0):
            verdicts = []
            for g in golds:  # one at a time: a batch may hold several samples of one problem
                verdicts.append(graded.get(g, 0) == schedule.get(g, -1))
                graded[g] = graded.get(g, 0) + 1
            return verdicts
        monkeypatch.setattr(nanoufo.env, "grade_batch", grade_batch)
    return install


def test_episodes_follow_the_rollout_rows(qwen_tiny, qwen_tokenizer):
    env = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=3))
    graded = run_episodes(qwen_tiny, env, PROBLEMS[:2], SamplingOptions(max_new_tokens=5, temperature=1.0), Noise(3),
                          n_samples_per_problem=2)
    episodes, rollout = graded.episodes, graded.rollout
    assert [e.problem.id for e in episodes] == ["p0", "p0", "p1", "p1"]
    for b, episode in enumerate(episodes):
        assert episode.turns == 3 and not episode.solved  # a random model: every attempt wrong
        ids = rollout.tokens[b]
        texts = [qwen_tokenizer.decode(ids[s:e]) for s, e in rollout.turn_spans[b]]
        assert episode.responses == texts  # graded text = the sampled tokens (no stop token: none sampled)
        assert rollout.tokens[b, :len(env.prompt_ids(episode.problem.question))].tolist() == \
            env.prompt_ids(episode.problem.question)


def test_episodes_end_on_the_first_correct_attempt(qwen_tiny, qwen_tokenizer, solve_at):
    solve_at({"5": 0, "2.5": 2})  # p0 at once, p1 at its third attempt, p2 never
    env = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=4))
    graded = run_episodes(qwen_tiny, env, PROBLEMS, SamplingOptions(max_new_tokens=3, temperature=1.0), Noise())
    episodes = graded.episodes
    assert [e.turns for e in episodes] == [1, 3, 4]
    assert graded.turn_rewards == [env.turn_rewards(e) for e in episodes]  # the rewards travel with the rows
    assert graded.scores.tolist() == [sum(env.turn_rewards(e)) for e in episodes]
    assert [len(spans) for spans in graded.rollout.turn_spans] == [1, 3, 4]
    assert [e.solved_turn for e in episodes] == [0, 2, None]
    assert graded.rollout.loss_mask.sum(dim=1).tolist() == [3.0, 9.0, 12.0]


def test_evaluate_succ_at_k_and_jsonl(qwen_tiny, qwen_tokenizer, solve_at, tmp_path):
    solve_at({"5": 0, "2.5": 2})
    out = tmp_path / "eval.jsonl"
    table = evaluate(qwen_tiny, UFOEnv(qwen_tokenizer), PROBLEMS, SamplingOptions(max_new_tokens=3), k=3, batch_size=2,
                     out=out, progress=False)
    assert table["succ@1"] == pytest.approx(1 / 3) and table["succ@2"] == pytest.approx(1 / 3)
    assert table["succ@3"] == pytest.approx(2 / 3)
    assert table["mean_turns"] == pytest.approx((1 + 3 + 3) / 3) and table["tokens_per_episode"] == 7.0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["turns"], r["solved"], r["sampled_tokens"]) for r in lines] == \
        [("p0", 1, True, 3), ("p1", 3, True, 9), ("p2", 3, False, 9)]
    assert lines[2]["gold"] == "72" and len(lines[2]["responses"]) == 3


@pytest.mark.parametrize("mode", ["succ", "pass"])
def test_no_two_draws_of_an_evaluation_share_a_noise_id(qwen_tiny, qwen_tokenizer, kept_draws, mode):
    """Every episode of every batch draws its own noise: (seed, noise id) never repeats over an evaluation
    (batches of other problems that reused one another's noise would err together)."""
    table = evaluate(qwen_tiny, UFOEnv(qwen_tokenizer), PROBLEMS, SamplingOptions(max_new_tokens=2, temperature=1.0),
                     k=2, mode=mode, batch_size=2, progress=False)
    assert len(kept_draws) == table["tokens_per_episode"] * 3 * (2 if mode == "pass" else 1)
    assert len(set(kept_draws)) == len(kept_draws)


def test_evaluate_pass_at_k_uses_single_turn_samples(qwen_tiny, qwen_tokenizer, solve_at):
    solve_at({"5": 1, "2.5": 0})  # p0's second sample, p1's first, none of p2's
    table = evaluate(qwen_tiny, UFOEnv(qwen_tokenizer), PROBLEMS, SamplingOptions(max_new_tokens=2), k=2, mode="pass",
                     batch_size=4, progress=False)
    assert table["problems"] == 3.0 and table["tokens_per_episode"] == 2.0  # one attempt per sample
    assert table["pass@1"] == pytest.approx((0.5 + 0.5 + 0) / 3) and table["pass@2"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="mode='best'"):
        evaluate(qwen_tiny, UFOEnv(qwen_tokenizer), PROBLEMS, SamplingOptions(), mode="best")


def test_held_out_metrics_are_means_over_evaluation_seeds_with_their_spread():
    from nanoufo import demo  # its random tiny model stops now and then: lengths vary from seed to seed
    tokenizer = demo.build_tokenizer()
    model, env = demo.build_model(len(tokenizer), seed=0), UFOEnv(tokenizer, EnvOptions(max_turns=2, instruction=""))
    problems, sampling = demo.make_problems("test", 8, seed=0), SamplingOptions(max_new_tokens=16, temperature=1.0)
    tables = [evaluate(model, env, problems, sampling, k=2, seed=seed, progress=False) for seed in (3, 4)]
    lengths = [t["tokens_per_episode"] for t in tables]
    assert lengths[0] != lengths[1]
    row = held_out_metrics(model, env, problems, sampling, k=2, seeds=[3, 4], progress=False)
    assert row["tokens_per_episode"] == pytest.approx(sum(lengths) / 2)
    assert row["tokens_per_episode_sd"] == pytest.approx(abs(lengths[0] - lengths[1]) / 2 ** 0.5)
    assert row["invalid_rate"] == pytest.approx((tables[0]["invalid_rate"] + tables[1]["invalid_rate"]) / 2)
    assert "succ_at_k_sd" not in held_out_metrics(model, env, problems, sampling, k=2, seeds=[3], progress=False)


def test_one_noise_per_run_never_draws_the_same_noise_twice(qwen_tiny, qwen_tokenizer, kept_draws):
    """Two rollouts from one Noise take consecutive episode ids, so every token draws its own noise; a fresh Noise
    with the same seed replays the first rollout's draws (and tokens), which is what a replay is for."""
    env, sampling = UFOEnv(qwen_tokenizer, EnvOptions(max_turns=1)), SamplingOptions(max_new_tokens=3, temperature=1.0)
    noise = Noise(seed=5)
    first = run_episodes(qwen_tiny, env, PROBLEMS, sampling, noise)
    second = run_episodes(qwen_tiny, env, PROBLEMS, sampling, noise)
    assert noise.next_episode == 6 and len(set(kept_draws)) == len(kept_draws) == 18
    replay = run_episodes(qwen_tiny, env, PROBLEMS, sampling, Noise(seed=5))
    assert torch.equal(replay.rollout.tokens, first.rollout.tokens)
    assert not torch.equal(second.rollout.tokens, first.rollout.tokens)
