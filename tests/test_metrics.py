"""Metrics against hand-computed values. Run: `python -m pytest -q tests/test_metrics.py`."""
import math

import pytest

from nanoufo.data import Problem
from nanoufo.env import Episode
from nanoufo.metrics import (best_pick, distinct_answer_ratio, failure_modes, maj_at_n, majority_pick, mean_turns,
                             mean_turns_to_solve, non_repetitive_ratio, pass_at_k, rm_at_n, succ_at_k, summarize,
                             tokens_per_episode)


def episode(answers: list[str | None], correct: list[bool], acceptable: list[bool] | None = None) -> Episode:
    """An episode record; every given answer acceptable unless `acceptable` says otherwise."""
    acceptable = [a is not None for a in answers] if acceptable is None else acceptable
    return Episode(Problem("q", "a", "test:0"), [f"response {i}" for i in range(len(answers))], answers, correct,
                   acceptable)


EPISODES = [
    episode(["1"], [True]),                                           # solved at turn 0
    episode(["2", "2", "5"], [False, False, True]),                   # solved at turn 2, E/T = 2/3
    episode([None, "3", "3.0", "4", None], [False] * 5),              # unsolved, E/T = 3/5 (None, 3, 4)
    episode(["7", "8"], [False, True]),                               # solved at turn 1, E/T = 1
]


def test_succ_at_k_counts_solves_within_k_turns():
    assert [succ_at_k(EPISODES, k) for k in (1, 2, 3, 5)] == [0.25, 0.5, 0.75, 0.75]


def test_pass_at_k_unbiased_estimator():
    correct = [[True, False, False, False], [False] * 4, [True, True, False, False]]
    assert pass_at_k(correct, 1) == pytest.approx((1 / 4 + 0 + 2 / 4) / 3)
    # k=2: 1 - C(3,2)/C(4,2) = 1/2; 0; 1 - C(2,2)/C(4,2) = 5/6
    assert pass_at_k(correct, 2) == pytest.approx((1 / 2 + 0 + 5 / 6) / 3)
    assert pass_at_k(correct, 4) == pytest.approx(2 / 3)  # n == k: any of the samples correct
    with pytest.raises(ValueError, match="problem 0 has 4 samples, fewer than k=5"):
        pass_at_k(correct, 5)


def test_succ_at_k_and_pass_at_k_differ_on_the_same_problem():
    # one problem: 3 sequential attempts with feedback solve it at the third; 3 independent samples never do
    assert succ_at_k([episode(["1", "2", "3"], [False, False, True])], 3) == 1.0
    assert pass_at_k([[False, False, False]], 3) == 0.0
    # and 1 of 3 independent samples right gives pass@1 = 1/3 but pass@3 = 1
    assert pass_at_k([[False, True, False]], 1) == pytest.approx(1 / 3)
    assert pass_at_k([[False, True, False]], 3) == 1.0


def test_turns_repetition_and_tokens():
    assert mean_turns(EPISODES) == pytest.approx((1 + 3 + 5 + 2) / 4)
    assert mean_turns_to_solve(EPISODES) == pytest.approx((1 + 3 + 2) / 3)
    # UFO's code: per turn the running share of distinct answers (0 without an answer), averaged over turns:
    # 1; (1 + 1/2 + 2/3) / 3; (0 + 1 + 1 + 1 + 0) / 5 ("3.0" is not "3" once lower-cased); 1
    assert non_repetitive_ratio(EPISODES) == pytest.approx((1 + (1 + 1 / 2 + 2 / 3) / 3 + 3 / 5 + 1) / 4)
    # the repetition penalty's E / T over answered attempts ("3.0" is "3" to normalize_answer): 1, 2/3, 2/3, 1
    assert distinct_answer_ratio(EPISODES) == pytest.approx((1 + 2 / 3 + 2 / 3 + 1) / 4)
    assert tokens_per_episode([10, 20, 30, 40]) == 25.0
    assert math.isnan(mean_turns_to_solve([episode(["0"], [False])]))
    assert math.isnan(distinct_answer_ratio([episode([None], [False])]))


def test_summarize():
    table = summarize(EPISODES, k=3, lengths=[10, 20, 30, 40])
    assert table == pytest.approx({"episodes": 4.0, "succ@1": 0.25, "succ@2": 0.5, "succ@3": 0.75,
                                   "mean_turns": 2.75, "mean_turns_to_solve": 2.0,
                                   "non_repetitive_ratio": (1 + (1 + 1 / 2 + 2 / 3) / 3 + 3 / 5 + 1) / 4,
                                   "distinct_answer_ratio": (1 + 2 / 3 + 2 / 3 + 1) / 4, "tokens_per_episode": 25.0,
                                   "no_answer_rate": 0.25, "repeat_rate": 0.5, "invalid_rate": 0.0})
    assert "tokens_per_episode" not in summarize(EPISODES, k=1)


def test_failure_modes_count_episodes_not_attempts():
    episodes = [episode(["3433", "3433", "1"], [False, False, True], [False, False, True]),  # invalid and repeated
                episode([None, None, "2", "4"], [False] * 4, [False, False, True, False]),  # no answer, invalid
                episode(["1", "2"], [False, True]),                                         # clean
                episode(["5", None, "5.0"], [False] * 3)]                                   # repeated, no answer
    assert failure_modes(episodes) == {"no_answer_rate": 0.5, "repeat_rate": 0.5, "invalid_rate": 0.5}
    with pytest.raises(ValueError, match="episode test:0: 2 answers but 1 verdicts"):
        failure_modes([episode(["1", "2"], [False, False], [True])])


def test_maj_at_n_votes_on_normalized_answers_ties_to_the_first():
    answers = [["1", "2", "2 ", None], ["3", "4", None, None], [None, None],
               ["1/2", "\\dfrac{1}{2}", "0.5", "\\frac{1}{2}"]]
    correct = [[True, False, False, False], [True, False, False, False], [False, False], [False, True, False, True]]
    # "2 " counts as "2" and \dfrac{1}{2} as \frac{1}{2} (normalized), but 1/2 and 0.5 are other candidates
    assert [majority_pick(a) for a in answers] == [1, 0, None, 1]
    assert maj_at_n(answers, correct) == 0.5


def test_rm_at_n_picks_the_best_scored_sample_unscored_last():
    scores = [[0.1, 0.9, None, 0.2], [None, None, None, None], [0.5, 0.5], [0.3, None, 0.2], [None, 0.0]]
    correct = [[False, False, True, True], [True, False, False, False], [False, True], [True, False, False],
               [True, False]]
    assert [best_pick(s) for s in scores] == [1, 0, 0, 0, 1]
    assert rm_at_n(scores, correct) == pytest.approx(2 / 5)
