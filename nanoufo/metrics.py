"""Evaluation metrics for UFO episodes, as pure functions.

    from nanoufo.metrics import summarize, pass_at_k
    table = summarize(episodes, k=5, lengths=sampled_tokens_per_episode)   # Succ@1..k, turns, failure modes
    baseline = pass_at_k(correct_per_problem, k=5)                           # k independent single-turn samples
    maj, rm = maj_at_n(answers, correct), rm_at_n(prm_scores, correct)      # Best-of-N over the same samples

Succ@k counts an episode solved within its first k sequential attempts (with feedback in between);
Pass@k is the baseline: any of k independent single-turn samples correct. Over N such samples, Maj@N
grades the most frequent answer and RM@N the sample a reward model scores highest. The failure modes count the
episodes with an attempt that gave no answer, with an answer given twice, and with an answer the task cannot
accept (UFOEnv's `accepts`), so a policy that trades one for another shows in the table where it starts.
Ratios are in [0, 1]; a metric with nothing to average over is NaN. Tests: `python -m pytest -q tests/test_metrics.py`.
"""
from math import comb, nan

from nanoufo.env import Episode, distinct_answer_share
from nanoufo.grader import count_distinct_answers, normalize_answer, squeeze_answer


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else nan


def succ_at_k(episodes: list[Episode], k: int) -> float:
    """Fraction of episodes solved within their first k attempts."""
    return _mean([float(e.solved_turn is not None and e.solved_turn < k) for e in episodes])


def pass_at_k(correct: list[list[bool]], k: int) -> float:
    """Mean over problems of the unbiased estimate 1 - C(n-c, k) / C(n, k) that at least one of k samples is
    correct, from n >= k independent samples of which c are correct (Chen et al. 2021)."""
    for index, samples in enumerate(correct):
        if len(samples) < k:
            raise ValueError(f"pass_at_k: problem {index} has {len(samples)} samples, fewer than k={k}")
    return _mean([1.0 - comb(len(s) - sum(s), k) / comb(len(s), k) for s in correct])


def majority_pick(answers: list[str | None]) -> int | None:
    """The sample whose answer wins the vote: the most frequent normalized answer, ties going to the answer
    seen first; samples without an answer do not vote (None when none has one). Answers are compared as
    normalized strings (grader.normalize_answer), so "1/2" and "0.5" are two candidates."""
    votes: dict[str, list[int]] = {}
    for index, answer in enumerate(answers):
        if answer is not None:
            votes.setdefault(normalize_answer(answer), []).append(index)
    return max(votes.values(), key=len)[0] if votes else None  # max keeps the first of equal counts


def maj_at_n(answers: list[list[str | None]], correct: list[list[bool]]) -> float:
    """Maj@N: mean over problems of whether the majority answer of its samples is correct."""
    picks = [majority_pick(a) for a in answers]
    return _mean([pick is not None and c[pick] for pick, c in zip(picks, correct, strict=True)])


def best_pick(scores: list[float | None]) -> int:
    """The sample with the highest score, the first among equals; unscored samples (None) rank last."""
    return max(range(len(scores)), key=lambda i: (scores[i] is not None, scores[i] or 0.0, -i))


def rm_at_n(scores: list[list[float | None]], correct: list[list[bool]]) -> float:
    """RM@N (Best-of-N): mean over problems of whether the sample its reward model scores highest is correct."""
    return _mean([c[best_pick(s)] for s, c in zip(scores, correct, strict=True)])


def mean_turns(episodes: list[Episode]) -> float:
    """Mean attempts made per episode, solved or not (unsolved episodes count all their attempts)."""
    return _mean([e.turns for e in episodes])


def mean_turns_to_solve(episodes: list[Episode]) -> float:
    """Mean attempts used by the solved episodes, counting the correct one (solved at once = 1)."""
    return _mean([e.solved_turn + 1 for e in episodes if e.solved])


def non_repetitive_ratio(episodes: list[Episode]) -> float:
    """The UFO paper's non-repetitive ratio as UFO's code computes it: per episode, the mean over its attempts
    of the running share of distinct answers after each answered one (answers lower-cased, whitespace removed;
    an attempt without an answer counts 0), then the mean over episodes."""
    def per_turn(episode: Episode) -> float:
        seen, answered, total = set(), 0, 0.0
        for answer in episode.answers:
            if answer is not None:
                seen.add(squeeze_answer(answer))
                answered += 1
                total += len(seen) / answered
        return total / episode.turns
    return _mean([per_turn(e) for e in episodes if e.turns])


def distinct_answer_ratio(episodes: list[Episode], distinct_by: str = "normalized") -> float:
    """The share the repetition penalty measures, E / T (env.distinct_answer_share, answers spelled as
    distinct_by says: the run's), averaged over the episodes that gave an answer: below 1 exactly where the
    episode repeated itself by the reward's measure (which charges it as repetition_charged says)."""
    shares = [distinct_answer_share(e, distinct_by) for e in episodes]
    return _mean([share for share in shares if share is not None])


def no_answer_rate(episodes: list[Episode]) -> float:
    """Fraction of episodes with an attempt that gave no extractable answer."""
    return _mean([float(None in e.answers) for e in episodes])


def repeat_rate(episodes: list[Episode], distinct_by: str = "normalized") -> float:
    """Fraction of episodes that give one answer twice (spelled as distinct_by says; attempts without an answer
    left out)."""
    answered = [[a for a in e.answers if a is not None] for e in episodes]
    return _mean([float(count_distinct_answers(a, distinct_by) < len(a)) for a in answered])


def invalid_rate(episodes: list[Episode]) -> float:
    """Fraction of episodes with an answer the task cannot accept (an attempt with an answer that is not
    acceptable: out of the demo's range, or unreadable to math-verify)."""
    for e in episodes:
        if len(e.acceptable) != len(e.answers):
            raise ValueError(f"episode {e.problem.id}: {len(e.answers)} answers but {len(e.acceptable)} verdicts")
    return _mean([float(any(a is not None and not ok for a, ok in zip(e.answers, e.acceptable))) for e in episodes])


def failure_modes(episodes: list[Episode], distinct_by: str = "normalized") -> dict[str, float]:
    return {"no_answer_rate": no_answer_rate(episodes), "repeat_rate": repeat_rate(episodes, distinct_by),
            "invalid_rate": invalid_rate(episodes)}


def tokens_per_episode(lengths: list[int]) -> float:
    """Mean sampled tokens per episode (policy tokens only: prompt and feedback tokens are not sampled)."""
    return _mean([float(n) for n in lengths])


def summarize(episodes: list[Episode], k: int, lengths: list[int] | None = None,
              distinct_by: str = "normalized") -> dict[str, float]:
    """All multi-turn metrics in one table row; tokens_per_episode given per-episode sampled token counts;
    repeats counted with the run's distinct_by (EnvOptions)."""
    table = {"episodes": float(len(episodes)), **{f"succ@{j}": succ_at_k(episodes, j) for j in range(1, k + 1)},
             "mean_turns": mean_turns(episodes), "mean_turns_to_solve": mean_turns_to_solve(episodes),
             "non_repetitive_ratio": non_repetitive_ratio(episodes),
             "distinct_answer_ratio": distinct_answer_ratio(episodes, distinct_by),
             **failure_modes(episodes, distinct_by)}
    if lengths is not None:
        table["tokens_per_episode"] = tokens_per_episode(lengths)
    return table
