"""Answer extraction, normalization and math-verify grading on real GSM8K / MATH500 gold answers, including
a pathological answer that must time out. Run: `python -m pytest -q tests/test_grader.py`."""
import pytest

from grading_utils import contract_bound, grade_in_thread, started_grader
from nanoufo.data import DEFAULT_EVAL_SETS, load_problems
from nanoufo.grader import (count_distinct_answers, exact_match, extract_answer, extract_think_answer, grade_batch,
                            normalize_answer)


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{1}, then \boxed {x^{2^{3}}}", "x^{2^{3}}"),                  # last box, spaced, nested
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                                        # escaped braces are literal
    (r"\boxed{7} and a truncated \boxed{\frac{1}{", "7"),                      # unclosed last box skipped
    (r"\boxed{7}. Put it within \boxed{}", "7"),                                # empty box skipped
    ("<answer> 42 </answer> or <answer>43</answer>", "43"),
    (r"<answer>43</answer> but \boxed{44}", "44"),                             # a box wins over tags
    ("The answer is 18.", None),
    (r"\boxed{", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw, expected", [
    (r"\left( 3, \dfrac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"\$1,450,000.", "1450000"),
    ("18.00", "18"),
    (r"90^\circ", "90"),
    (r"50\%", "50"),
    (r"3.50", "3.50"),          # not a whole number: left alone
    ("1,2,3", "1,2,3"),         # a list, not a thousands separator
    ("(1,234)", "(1,234)"),     # a pair: only plain numbers lose their commas
    ("-12,345.5", "-12345.5"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_count_distinct_answers_merges_spellings_and_missing_answers():
    assert count_distinct_answers([r"\frac{1}{2}", r"\dfrac{1}{2}", " \\frac{1}{2} ", "3"]) == 2
    assert count_distinct_answers([None, "3", None]) == 2
    assert count_distinct_answers([]) == 0


@pytest.fixture(scope="module")
def golds():
    """Gold answers by problem id from the bundled evaluation sets."""
    problems = load_problems(DEFAULT_EVAL_SETS["gsm8k"])[0] + load_problems(DEFAULT_EVAL_SETS["math500"])[0]
    return {p.id: p.answer for p in problems}


# (problem id, equivalent written forms, wrong answers); the gold answers are asserted to catch data drift
CASES = [
    ("gsm8k/test.jsonl:0", "18", ["18", "18.0", r"\$18", r"\$18.00", r"\text{18}"], ["17", "1.8", "180"]),
    ("gsm8k/test.jsonl:230", "276000", ["276,000", "276000.0", r"2.76 \times 10^5"], ["276", "27600"]),
    ("math500/test.jsonl:219", r"\frac{1}{2}", ["0.5", "1/2", r"\dfrac{1}{2}", r"\tfrac12"], ["2", "0.05"]),
    ("math500/test.jsonl:162", r"\dfrac{17}{50}", ["0.34", "17/50", r"\frac{17}{50}"], ["0.35", r"\frac{50}{17}"]),
    ("math500/test.jsonl:0", r"\left( 3, \frac{\pi}{2} \right)", [r"(3, \frac{\pi}{2})", r"(3,\pi/2)"],
     [r"(3, \pi)", r"(\frac{\pi}{2}, 3)"]),
    ("math500/test.jsonl:383", r"x \in [-2,7]", ["[-2, 7]", r"\left[-2,7\right]"], ["(-2,7)", "[-2,8]"]),
    ("math500/test.jsonl:293", r"\left(\frac{3}{5},\frac{8}{3}\right]", [r"(0.6, 8/3]"], [r"[\frac35, \frac83]"]),
    ("math500/test.jsonl:380", r"(0,9) \cup (9,36)", [r"(0, 9)\cup(9, 36)"], ["(0,36)"]),
    ("math500/test.jsonl:96", r"1 \pm \sqrt{19}", [r"1+\sqrt{19}, 1-\sqrt{19}"], [r"1 + \sqrt{19}"]),
    ("math500/test.jsonl:8", r"3\sqrt{13}", [r"\sqrt{117}", r"3 \sqrt{13}"], [r"3\sqrt{14}", "13"]),
    ("math500/test.jsonl:7", r"90^\circ", ["90", r"90^{\circ}"], ["45"]),
    ("math500/test.jsonl:227", r"\text{(C)}", ["(C)", r"\text{C}"], ["(B)"]),
    ("math500/test.jsonl:4", r"\text{Evelyn}", ["Evelyn"], ["Bob"]),
]


def test_grading_real_gold_answers_in_equivalent_forms(golds):
    answers, gold_answers, expected = [], [], []
    for problem_id, gold, right, wrong in CASES:
        assert golds[problem_id] == gold
        for answer, verdict in [(a, True) for a in right] + [(a, False) for a in wrong]:
            answers.append(answer)
            gold_answers.append(gold)
            expected.append(verdict)
    # a test of verdicts, not of time: a generous timeout, so a loaded machine cannot turn a slow right answer
    # into a timed-out wrong one (the timeout itself is tested below)
    verdicts = grade_batch(answers, gold_answers, timeout=120)
    mistakes = [(a, g, v) for a, g, v, e in zip(answers, gold_answers, verdicts, expected) if v != e]
    assert not mistakes


def test_missing_and_empty_answers_are_wrong():
    assert grade_batch([None, "", "  "], ["18", "18", "18"]) == [False, False, False]
    assert grade_batch([extract_answer(r"$\boxed{18}$ dollars")], ["18"]) == [True]
    assert grade_batch([extract_answer("I think it is 18.")], ["18"]) == [False]


def test_pathological_answer_times_out_and_the_worker_recovers():
    grader, restart_s = started_grader()  # the worker starts outside the timed part; its start-up is measured
    # the repeated pathological answer is graded once per call (its verdict is reused, not timed out twice);
    # the answers after each timeout go to a freshly restarted worker, whose start-up `timeout` does not include
    answers, golds_ = ["3", "9^{9^{9^9}}", "4", "(10^{10^{8}})!", "9^{9^{9^9}}"], ["3", "3", "4", "4", "3"]
    bound = contract_bound(n_timeouts=2, timeout=1.0, restart_s=restart_s)
    verdicts, elapsed, hung = grade_in_thread(grader, answers, golds_, timeout=1.0, wall_limit=bound + 60)
    grader.close()
    assert not hung, "grading a pathological answer hung"
    assert verdicts == [True, False, True, False, False]
    assert elapsed < bound, f"grading took {elapsed:.1f}s (start-up {restart_s:.1f}s): a timeout did not fire in time"


@pytest.mark.parametrize("text, expected", [
    ("<think> 6 x 3 </think> <answer> 18 </answer>", "18"),
    ("<think>a</think><answer>1</answer> then <think>b</think><answer>2</answer>", "1"),  # the first, as re.search
    ("<think>a</think>\n<answer><answer>x + 1</answer></answer>", "x + 1"),  # nested tags removed
    ("<answer>18</answer>", None),  # no <think> part: UFO's code finds no action
    ("<think>a</think><answer> </answer>", None),
])
def test_extract_think_answer_as_ufos_code_parses(text, expected):
    assert extract_think_answer(text) == expected


def test_exact_match_lower_cases_and_drops_whitespace_only():
    assert exact_match(" 1 / 2 ", "1/2") and exact_match("X+1", "x + 1")
    assert not exact_match("0.5", "1/2") and not exact_match("18.0", "18") and not exact_match(None, "18")
    assert not exact_match(" ", "")  # an empty answer is not an action
