"""The built-in demo task (nanoufo/demo.py): its problems, held-out split, tokenizer and warm-up episodes.

Run: python -m pytest -q tests/test_demo.py
"""
import random

import pytest

from nanoufo import demo
from nanoufo.env import UFOEnv
from nanoufo.options import EnvOptions


@pytest.fixture(scope="module")
def tokenizer():
    return demo.build_tokenizer()


def test_problems_are_reproducible_and_the_splits_disjoint():
    train, test = demo.make_problems("train", 400, seed=3), demo.make_problems("test", 100, seed=3)
    assert train == demo.make_problems("train", 400, seed=3)
    assert not {p.question for p in train} & {p.question for p in test}
    for p in train + test:
        options = demo.candidates(p.question)
        assert 3 <= len(options) <= 5 and p.answer in options
        assert [int(d) for d in options] == list(range(int(options[0]), int(options[-1]) + 1))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        demo.make_problems("dev", 1, seed=0)


def test_an_attempt_is_acceptable_when_it_is_one_boxed_digit_of_the_range():
    problem = demo.make_problems("test", 1, seed=0)[0]
    low, high = int(demo.candidates(problem.question)[0]), int(demo.candidates(problem.question)[-1])
    boxed = lambda answer: f"\\boxed{{{answer}}}"  # noqa: E731
    assert [demo.accepts(problem, str(d), boxed(d)) for d in range(10)] == [low <= d <= high for d in range(10)]
    assert not any(demo.accepts(problem, a, boxed(a)) for a in (str(low) * 2, f"{low}.0", f" {low}", ""))
    # the grader reads the last box, but an attempt is one box and nothing else
    for attempt in (f"\\boxed{{{high}D" + boxed(low), boxed(low) * 2, f"{high} " + boxed(low)):
        assert not demo.accepts(problem, str(low), attempt), attempt


def test_feedback_and_boxed_are_single_tokens(tokenizer):
    assert tokenizer.tokenize("\\boxed{7}Try again.") == ["\\boxed{", "7", "}", "Try again."]
    env = UFOEnv(tokenizer, EnvOptions(instruction=""))
    feedback = "\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(env.feedback_ids(True)) == feedback


@pytest.mark.parametrize("forget", [0.0, 1.0])
def test_warmup_episode(tokenizer, monkeypatch, forget):
    """forget 0: the careful guesser never repeats and always finds the gold within 5 turns (3-5 candidates);
    forget 1: the independent guesser repeats somewhere. The loss mask covers exactly the attempts."""
    monkeypatch.setattr(demo, "WARMUP_FORGET", forget)
    env = UFOEnv(tokenizer, EnvOptions(instruction=""))
    rng, repeated = random.Random(0), 0
    for problem in demo.make_problems("train", 50, seed=0):
        ids, mask = demo.warmup_episode(env, tokenizer, problem, rng, max_turns=5)
        attempts = tokenizer.decode([i for i, m in zip(ids, mask) if m]).split("<|im_end|>")[:-1]
        guesses = [a.removeprefix("\\boxed{").removesuffix("}") for a in attempts]
        assert all(a == f"\\boxed{{{g}}}" for a, g in zip(attempts, guesses))
        assert set(guesses) <= set(demo.candidates(problem.question))
        repeated += len(set(guesses)) < len(guesses)
        if forget == 0.0:
            assert len(set(guesses)) == len(guesses) and guesses[-1] == problem.answer
    assert (repeated > 0) == (forget == 1.0)
