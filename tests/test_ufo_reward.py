"""UFO's reward, group-filter input and repetition metrics, worked by hand from UFO's code, against nanoufo's
under the UFO preset's options (config/ufo_qwen2.5_3b.py), and under nanoufo's defaults of the two options that
reproduce the code's quirks (repetition_charged, distinct_by) where those give another score.

UFO's code: lichengliu03/unary-feedback at b9eb4bd (2025-08-15); ENV = ragen/env/metamathqa/env.py,
ES = ragen/llm_agent/es_manager.py, CTX = ragen/llm_agent/ctx_manager.py, base.yaml = config/base.yaml. The rules
each hand-worked score follows:
  R1 an attempt is answered when its text, after the forced "<think>", holds <think>..</think><answer>X</answer>
     with X non-empty once the tags are removed and it is stripped (CTX:202-219, 381); else it yields no action;
  R2 a turn without an action never calls env.step (ES:155-156): its turn reward is 0, it does not advance
     step_num, and it adds format_penalty -0.1 to the episode's score (ES:157-158, base.yaml:124, CTX:268-272);
  R3 the k-th answered attempt (k from 0) earns 1/2^k when correct, else 0 (ENV:59, 68); correct means equal
     once lower-cased with whitespace removed (ENV:100-116);
  R4 the env ends on a correct answer or its 5th answered attempt (ENV:30, 75) and only then pays
     sum(step rewards) - 0.5 (1 - E/T) (ENV:29, 75-85), T the answered attempts, E their distinct answers
     lower-cased with whitespace removed (ENV:61-62, 93-98), the correct one included;
  R5 the rollout stops after 5 turns, answered or not (agent_proxy.py:148-155, base.yaml:111): an episode with an
     unanswered turn that is never solved stops before R4 pays, so its score is its format penalties alone;
  R6 the episode's score is the sum of its turn rewards plus its penalties, on its last token (CTX:108-111, 331),
     and the group filter ranks groups by the std of exactly that score (agent_trainer.py:331-341 reads
     original_rm_scores, the tensor CTX:269-278 wrote the penalty into in place).
The metrics: UFO's non-repetitive ratio is the running E/T after each answered attempt (ENV:65-67, 72), summed
over the episode's turns and divided by them (ES:186-194; an unanswered turn's info is empty, ES:117, 138).

    python -m pytest -q tests/test_ufo_reward.py
"""
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nanoufo import rl, trainer
from nanoufo.config import TrainConfig, read_config_file
from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.metrics import distinct_answer_ratio, non_repetitive_ratio
from nanoufo.model import Qwen2, QwenConfig
from nanoufo.options import EnvOptions
from nanoufo.rollout import Graded
from nanoufo.sampler import Rollout

PRESET = TrainConfig(**read_config_file(str(Path(__file__).resolve().parents[1] / "config" / "ufo_qwen2.5_3b.py")))
UFO_OPTIONS = PRESET.env_options(PRESET.instruction)
DEFAULT_OPTIONS = dataclasses.replace(UFO_OPTIONS, repetition_charged=EnvOptions.repetition_charged,
                                      distinct_by=EnvOptions.distinct_by)  # the preset with nanoufo's defaults


@dataclass(frozen=True)
class Raw:
    """An attempt's text as sampled after the forced "<think>", for the rows about reading an answer."""
    text: str


def attempt_text(answer: str | Raw | None) -> str:
    """An attempt that answers `answer` in UFO's format, or one without the format (None)."""
    if isinstance(answer, Raw):
        return answer.text
    return "I am not sure." if answer is None else f"Let me think.</think> <answer>{answer}</answer>"


@dataclass(frozen=True)
class Case:
    answers: tuple  # each attempt: an answer, None (no answer), or a Raw text
    ufo: float  # the score UFO's code gives (rules R1-R6 of the module docstring)
    default: float | None = None  # nanoufo's under its default options, where that differs (None: the same)
    gold: str = "7"


CASES = {  # gold "7" unless given; format penalty 0.1, decay 1/2^k, repetition 0.5 (1 - E/T)
    "solved at turn 0": Case(("7",), 1.0),  # R3: k=0; R4: E/T = 1/1
    "solved at turn 1": Case(("1", "7"), 0.5),  # R3: k=1; R4: E/T = 2/2
    "solved at turn 2": Case(("1", "2", "7"), 0.25),
    "solved at turn 3": Case(("1", "2", "3", "7"), 0.125),
    "solved at turn 4": Case(("1", "2", "3", "4", "7"), 0.0625),
    "solved at turn 4 after repeats": Case(("1", "1", "1", "1", "7"), 0.0625 - 0.5 * (1 - 2 / 5)),  # R4: E=2, T=5
    "never solved, 5 distinct": Case(("1", "2", "3", "4", "5"), 0.0),  # R4 at the 5th answer: E/T = 1
    "never solved, 5 the same": Case(("5",) * 5, -0.5 * (1 - 1 / 5)),  # R4: E=1, T=5
    "never solved, 2 distinct": Case(("1", "1", "2", "2", "2"), -0.5 * (1 - 2 / 5)),
    "unanswered turns at the start, solved": Case((None, None, "7"), 1.0 - 0.2),  # R2 twice; R3: k=0
    # R5: 4 answers, never solved: R4 never pays; nanoufo's default charges 0.5 (1 - 1/4)
    "unanswered turn at the start, unsolved": Case((None, "1", "1", "1", "1"), -0.1, default=-0.1 - 0.375),
    "unanswered turn in the middle, solved": Case(("1", None, "7"), 0.5 - 0.1),  # R3: k=1 (R2: no advance)
    "unanswered turn in the middle, repeat, solved": Case(("1", None, "1", "7"), 0.25 - 0.1 - 0.5 * (1 - 2 / 3)),
    "unanswered turn in the middle, unsolved": Case(("1", None, "1", "1", "1"), -0.1, default=-0.1 - 0.375),  # R5
    "the issue's 5, none, 5, 5, none": Case(("5", None, "5", "5", None), -0.2, default=-0.2 - 0.5 * (1 - 1 / 3)),
    "unanswered turn at the end, distinct": Case(("1", "2", "3", "4", None), -0.1),  # R5; E/T = 1 anyway
    "unanswered turn at the end, repeats": Case(("1", "1", "1", "1", None), -0.1, default=-0.1 - 0.375),  # R5
    "no answer at all": Case((None,) * 5, -0.5),  # R2 five times; T = 0: no repetition anywhere
    # E counts answers lower-cased, whitespace removed (R4); nanoufo's default keeps case and folds LaTeX forms
    "the issue's X, x, then correct": Case(("X", "x", "7"), 0.25 - 0.5 * (1 - 2 / 3), default=0.25),
    "the issue's dfrac, frac, then correct": Case((r"\dfrac{1}{2}", r"\frac{1}{2}", "7"), 0.25,
                                                 default=0.25 - 0.5 * (1 - 2 / 3)),
    "dfrac then frac, frac the gold": Case((r"\dfrac{1}{2}", r"\frac{1}{2}"), 0.5, default=0.5 - 0.5 * (1 - 1 / 2),
                                           gold=r"\frac{1}{2}"),  # R3: \dfrac is wrong, \frac right at k=1
    "a repeat differing in spacing and case": Case(("a b", "AB", "7"), 0.25 - 0.5 * (1 - 2 / 3), default=0.25),
    "a repeat differing in spacing only": Case(("1 / 2", "1/2", "7"), 0.25 - 0.5 * (1 - 2 / 3)),
    "a repeat with a full stop": Case(("5", "5.", "7"), 0.25, default=0.25 - 0.5 * (1 - 2 / 3)),  # "5." is new (R4)
    "the gold in another case": Case(("X",), 1.0, gold="x"),  # R3: lower-cased before comparing
    "an empty answer": Case((Raw("Hmm.</think><answer>  </answer>"), "7"), 1.0 - 0.1),  # R1: no action
    "an answer without </think>": Case((Raw("<answer>7</answer>"), "7"), 1.0 - 0.1),  # R1: the pattern fails
    "tags inside the answer": Case((Raw("x</think><answer><answer>7</answer>"),), 1.0),  # R1: tags removed
}


@pytest.fixture(scope="module")
def ufo_env(qwen_tokenizer):
    return {"preset": UFOEnv(qwen_tokenizer, UFO_OPTIONS), "defaults": UFOEnv(qwen_tokenizer, DEFAULT_OPTIONS)}


def play(env: UFOEnv, case: Case) -> Episode:
    """The case's attempts through env.step_batch; the episode must end exactly at its last attempt, as
    UFO's does (a correct answer, or 5 turns)."""
    episode = Episode(Problem("q", case.gold, "case"))
    for turn, answer in enumerate(case.answers):
        assert not env.is_over(episode), f"the episode ended before attempt {turn}"
        env.step_batch([episode], [attempt_text(answer)])
    assert env.is_over(episode), "the episode goes on after the case's last attempt"
    return episode


def test_the_preset_sets_the_codes_reward():
    assert (UFO_OPTIONS.turn_decay, UFO_OPTIONS.repetition_penalty, UFO_OPTIONS.format_penalty) == (0.5, 0.5, 0.1)
    assert (UFO_OPTIONS.repetition_charged, UFO_OPTIONS.distinct_by) == ("solved_or_all_answered", "squeezed")
    assert (UFO_OPTIONS.max_turns, UFO_OPTIONS.answer_format, UFO_OPTIONS.grading) == (5, "think_answer", "exact")


@pytest.mark.parametrize("name", CASES)
def test_nanoufo_under_the_preset_gives_the_codes_score(ufo_env, name):
    case = CASES[name]
    assert sum(ufo_env["preset"].turn_rewards(play(ufo_env["preset"], case))) == pytest.approx(case.ufo, abs=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_nanoufo_under_its_defaults_differs_only_where_the_row_says(ufo_env, name):
    case = CASES[name]
    want = case.ufo if case.default is None else case.default
    assert sum(ufo_env["defaults"].turn_rewards(play(ufo_env["defaults"], case))) == pytest.approx(want, abs=1e-12)


def test_each_option_alone_moves_its_rows(qwen_tokenizer):
    """repetition_charged alone fixes the rows about unanswered turns, distinct_by alone the spelling rows."""
    timing = UFOEnv(qwen_tokenizer, dataclasses.replace(DEFAULT_OPTIONS, repetition_charged="solved_or_all_answered"))
    spelling = UFOEnv(qwen_tokenizer, dataclasses.replace(DEFAULT_OPTIONS, distinct_by="squeezed"))
    score = lambda env, name: sum(env.turn_rewards(play(env, CASES[name])))  # noqa: E731
    assert score(timing, "the issue's 5, none, 5, 5, none") == pytest.approx(-0.2)
    assert score(timing, "the issue's X, x, then correct") == pytest.approx(0.25)  # still nanoufo's spelling
    assert score(spelling, "the issue's X, x, then correct") == pytest.approx(0.25 - 0.5 / 3)
    assert score(spelling, "the issue's 5, none, 5, 5, none") == pytest.approx(-0.2 - 0.5 * (1 - 1 / 3))


# The group filter's input: three groups of two episodes. With the format penalty (R6) the spreads are 0.1 (A),
# 0.125 (B) and 0.25 (C), and C is kept; without it A and C would not vary at all and B would be kept.
GROUPS = [("unanswered turns at the start, solved", "solved at turn 0"),  # 0.8, 1.0
          ("solved at turn 1", "solved at turn 2"),  # 0.5, 0.25
          ("no answer at all", "never solved, 5 distinct")]  # -0.5, 0.0


def test_the_group_filter_ranks_on_the_score_with_the_format_penalty(ufo_env):
    env = ufo_env["preset"]
    episodes = [play(env, CASES[name]) for group in GROUPS for name in group]
    B, T = len(episodes), 4
    mask = torch.zeros(B, T)
    mask[:, 2:] = 1.0
    rollout = Rollout(tokens=torch.ones(B, T, dtype=torch.long), lengths=torch.full((B,), T), loss_mask=mask,
                      logprobs=torch.zeros(B, T), turn_spans=[[(2, 4)]] * B, n_prefill_tokens=0, n_decode_steps=0)
    graded = Graded(rollout, episodes, [env.turn_rewards(e) for e in episodes], group_size=2)
    actor = Qwen2(QwenConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1))
    scored, _ = trainer.score_rollout(TrainConfig(reward="gold"), actor, graded)  # what build_batch filters on
    assert scored.scores.tolist() == pytest.approx([CASES[name].ufo for group in GROUPS for name in group])
    assert rl.group_filter(scored.scores, 2, 1).tolist() == [4, 5]  # group C, spread only by the penalty
    assert scored.rewards.sum(1).tolist() == pytest.approx(scored.scores.tolist())  # the score on the last token


def episode(answers: list[str | None]) -> Episode:
    """A record as UFOEnv leaves it under exact grading: every answer acceptable, none correct."""
    return Episode(Problem("q", "7", "m"), responses=[""] * len(answers), answers=answers,
                   correct=[False] * len(answers), acceptable=[a is not None for a in answers])


@pytest.mark.parametrize("answers, ufo_ratio, squeezed, normalized", [
    (["X", "x"], (1 + 1 / 2) / 2, 1 / 2, 2 / 2),  # case: one answer for UFO's code, two for normalize_answer
    (["a b", "ab"], (1 + 1 / 2) / 2, 1 / 2, 1 / 2),  # spacing: one answer for both
    ([r"\dfrac{1}{2}", r"\frac{1}{2}"], (1 + 1) / 2, 2 / 2, 1 / 2),  # LaTeX forms: two for UFO's code, one folded
    (["5", "5."], (1 + 1) / 2, 2 / 2, 1 / 2),  # a full stop
    ([None, "1", None, "1"], (1 + 1 / 2) / 4, 1 / 2, 1 / 2),  # unanswered turns: 0 in the ratio, not in E/T
    ([None, None], 0.0, math.nan, math.nan),  # no answer: the ratio is 0, E/T undefined
])
def test_repetition_metrics_on_the_normalisation_branches(answers, ufo_ratio, squeezed, normalized):
    """non_repetitive_ratio is UFO's code's metric whatever the options; distinct_answer_ratio is the reward's
    E/T, spelled as the run's distinct_by."""
    episodes = [episode(answers)]
    assert non_repetitive_ratio(episodes) == pytest.approx(ufo_ratio)
    for by, want in (("squeezed", squeezed), ("normalized", normalized)):
        got = distinct_answer_ratio(episodes, distinct_by=by)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), by
