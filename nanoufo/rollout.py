"""UFO episodes on the cached sampler: the glue that training and evaluation share. The environment
writes the prompts, grades each attempt as it ends and answers a wrong one with its feedback turn; the
rollout comes back with each row's record and the reward of each attempt, so nothing downstream asks the
environment again.

    from nanoufo.rollout import Noise, run_episodes
    noise = Noise(seed=0)                       # once per run: every call draws noise no earlier call drew
    graded = run_episodes(model, env, problems, SamplingOptions(max_new_tokens=512), noise, n_samples_per_problem=4)
    graded.rollout.tokens[i], graded.episodes[i], graded.turn_rewards[i]  # row i: problem i // n_samples_per_problem

Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_rollout.py
"""
from dataclasses import dataclass

import torch

from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.model import Qwen2
from nanoufo.options import SamplingOptions
from nanoufo.sampler import Decoders, Rollout, generate


@dataclass
class Noise:
    """Where a run's sampling noise comes from: a token's noise is keyed by (seed, its episode's id, its index),
    and each run_episodes call takes the next ids, so no two calls draw the same noise unless a caller builds
    two Noise objects with the same seed and start on purpose (to replay a rollout). A run that resumes, or
    splits its episodes over data-parallel ranks, gives each call's start explicitly (train.py)."""
    seed: int = 0
    next_episode: int = 0

    def take(self, n: int) -> range:
        """The ids of the next n episodes."""
        ids = range(self.next_episode, self.next_episode + n)
        self.next_episode += n
        return ids


@dataclass
class Graded:
    """A rollout of UFO episodes and what the environment made of them: row b's record (its attempts and
    their grades) and the environment's reward of each of its attempts (env.turn_rewards). Rows come in
    groups of group_size samples of one problem."""
    rollout: Rollout
    episodes: list[Episode]
    turn_rewards: list[list[float]]
    group_size: int

    @property
    def scores(self) -> torch.Tensor:
        """(B,) fp64: each episode's reward, the sum of its attempts'."""
        return torch.tensor([sum(r) for r in self.turn_rewards], dtype=torch.float64)


def run_episodes(model: Qwen2, env: UFOEnv, problems: list[Problem], sampling: SamplingOptions, noise: Noise, *,
                 n_samples_per_problem: int = 1, max_turns: int | None = None, tokenizer=None,
                 max_len: int | None = None, decoders: Decoders | None = None) -> Graded:
    """Sample one episode per (problem, sample) as `sampling` says: up to max_turns attempts (default
    env.max_turns), ending on the first correct one: the sampler's rollout, the graded records and each
    attempt's reward. The episodes take their noise ids from `noise` (Noise.take). `tokenizer` decodes the
    attempts for grading (default env.tokenizer); max_len and decoders: see nanoufo.sampler.generate."""
    tokenizer = tokenizer or env.tokenizer
    episodes = [Episode(problem) for problem in problems for _ in range(n_samples_per_problem)]

    def next_turn(rows: list[int], responses: list[list[int]], stopped: list[bool]) -> list[list[int] | None]:
        texts = [tokenizer.decode(r[:-1] if s else r) for r, s in zip(responses, stopped)]  # without the stop token
        over = env.step_batch([episodes[b] for b in rows], texts)
        # an attempt closed by <|im_end|> keeps it; any other end needs the close from the feedback turn
        return [None if done else env.feedback_ids(s and r[-1] == env.turn_end_id, episodes[b])
                for b, done, r, s in zip(rows, over, responses, stopped)]

    rollout = generate(model, [env.prompt_ids(e.problem.question) for e in episodes], next_turn, sampling,
                       max_turns=max_turns or env.max_turns, stop_ids=env.stop_ids, seed=noise.seed, max_len=max_len,
                       episode_ids=noise.take(len(episodes)), decoders=decoders, feedback_len=env.max_feedback_tokens())
    return Graded(rollout, episodes, [env.turn_rewards(e) for e in episodes], n_samples_per_problem)
