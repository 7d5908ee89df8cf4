"""UFO episodes on the cached sampler: the glue that training and evaluation share. The environment
writes the prompts, grades each attempt as it ends and answers a wrong one with its feedback turn.

    from nanoufo.rollout import run_episodes
    rollout, episodes = run_episodes(model, env, problems, n_samples_per_problem=4, max_new_tokens=512,
                                     temperature=1.0, seed=step)

Row i of the rollout is episodes[i]: problem i // n_samples_per_problem. With rows_per_wave, the episodes
are sampled in waves of that many rows, one after the other, so the KV cache holds one wave at a time
(continuous batching under a KV budget can replace the waves).
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_rollout.py
"""
import torch

from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.model import Qwen2
from nanoufo.sampler import Rollout, generate


def run_episodes(model: Qwen2, env: UFOEnv, problems: list[Problem], *, n_samples_per_problem: int = 1,
                 max_turns: int | None = None, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 seed: int = 0, tokenizer=None, max_len: int | None = None,
                 rows_per_wave: int = 0) -> tuple[Rollout, list[Episode]]:
    """Sample one episode per (problem, sample): up to max_turns attempts (default env.max_turns), ending on
    the first correct one. `tokenizer` decodes the attempts for grading (default env.tokenizer).
    rows_per_wave > 0 samples at most that many episodes at once (wave w seeded seed + w * 1_000_003)."""
    tokenizer = tokenizer or env.tokenizer
    episodes = [Episode(problem) for problem in problems for _ in range(n_samples_per_problem)]

    def next_turn(rows: list[int], responses: list[list[int]], stopped: list[bool]) -> list[list[int] | None]:
        texts = [tokenizer.decode(r[:-1] if s else r) for r, s in zip(responses, stopped)]  # without the stop token
        over = env.step_batch([episodes[b] for b in rows], texts)
        # an attempt closed by <|im_end|> keeps it; any other end needs the close from the feedback turn
        return [None if done else env.feedback_ids(s and r[-1] == env.turn_end_id)
                for done, r, s in zip(over, responses, stopped)]

    prompts = [env.prompt_ids(e.problem.question) for e in episodes]
    wave = rows_per_wave or len(episodes)
    waves = []
    for w, start in enumerate(range(0, len(episodes), wave)):
        offset_turn = lambda rows, responses, stopped, start=start: next_turn([start + r for r in rows], responses,
                                                                                stopped)
        waves.append(generate(model, prompts[start:start + wave], offset_turn, max_turns=max_turns or env.max_turns,
                              max_new_tokens=max_new_tokens, stop_ids=env.stop_ids, temperature=temperature,
                              top_p=top_p, seed=seed + w * 1_000_003, max_len=max_len))
    return concat_rollouts(waves), episodes


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """The rows of several rollouts, in order, right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    T = max(p.tokens.shape[1] for p in parts)
    pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))
    return Rollout(torch.cat([pad(p.tokens) for p in parts]), torch.cat([p.lengths for p in parts]),
                   torch.cat([pad(p.loss_mask) for p in parts]), torch.cat([pad(p.logprobs) for p in parts]),
                   [s for p in parts for s in p.turn_spans], sum(p.n_prefill_tokens for p in parts),
                   sum(p.n_decode_steps for p in parts))
