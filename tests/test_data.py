"""Data readers on small files written to tmp_path (good and bad rows) and on the bundled evaluation sets.
Run: `python -m pytest -q tests/test_data.py`."""
import json

import datasets
import pytest

from nanoufo.data import DEFAULT_EVAL_SETS, DataError, load_problems


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
    return path


def test_bundled_eval_sets():
    gsm8k, skipped = load_problems(DEFAULT_EVAL_SETS["gsm8k"])
    assert (len(gsm8k), skipped) == (1319, 0)
    assert gsm8k[0].answer == "18" and gsm8k[0].id == "gsm8k/test.jsonl:0"
    assert gsm8k[0].question.startswith("Janet")
    assert not any("," in p.answer for p in gsm8k)  # thousands separators removed
    math500, skipped = load_problems(DEFAULT_EVAL_SETS["math500"], limit=3)
    assert (len(math500), skipped) == (3, 0)
    assert math500[2].answer == r"\frac{14}{3}" and math500[2].id == "math500/test.jsonl:2"


def test_gsm8k_rows_and_bad_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"question": "How many?", "answer": "2+2=<<2+2=4>>4\n#### 1,450,000"},
        {"question": "Missing answer"},
        {"question": "", "answer": "#### 3"},
        {"question": "No marker", "answer": "the answer is 3"},
        {"question": ["not", "text"], "answer": "#### 3"},
        {"question": "Empty answer", "answer": "#### "},
        {"question": "Last marker wins", "answer": "#### 1 then\n#### -7"},
    ])
    problems, skipped = load_problems(path)  # detected as gsm8k from the "#### " answers
    assert [(p.question, p.answer, p.id) for p in problems] == [
        ("How many?", "1450000", f"{tmp_path.name}/train.jsonl:0"),
        ("Last marker wins", "-7", f"{tmp_path.name}/train.jsonl:6")]
    assert skipped == 5


def test_math500_and_metamath_formats(tmp_path):
    math500 = write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "Simplify.", "solution": r"\boxed{2}", "answer": "2"},
        {"problem": "Numeric answer field", "answer": 5},
        {"problem": "Null answer", "answer": None},
    ])
    problems, skipped = load_problems(math500)
    assert [(p.question, p.answer) for p in problems] == [("Simplify.", "2"), ("Numeric answer field", "5")]
    assert skipped == 1
    metamath = tmp_path / "mm.json"
    metamath.write_text(json.dumps([
        {"query": "What is x?", "response": r"So x = 3. The answer is: \frac{1}{2}", "type": "MATH_Rephrased"},
        {"query": "GSM row", "response": "The answer is: 4", "type": "GSM_AnsAug"},
        {"query": "No final line", "response": "It is 5.", "type": "MATH_AnsAug"},
        {"query": "Said twice", "response": "The answer is 4, we check.\nSo x = 2.\nThe answer is: 7",
         "type": "MATH_SV"},
        {"query": "Trailing text", "response": "The answer is 12.\nWe are done.", "type": "MATH_FOBAR"},
    ]))
    problems, skipped = load_problems(metamath, format="metamath")
    assert [(p.question, p.answer) for p in problems] == [("What is x?", r"\frac{1}{2}"), ("Said twice", "7"),
                                                          ("Trailing text", "12")]
    assert skipped == 1  # the GSM_ row is left out by design, not counted as skipped
    # UFO's code's reading: everything after the first "The answer is: " (colon and space), stripped
    problems, skipped = load_problems(metamath, format="metamath_first")
    assert [(p.question, p.answer) for p in problems] == [
        ("What is x?", r"\frac{1}{2}"), ("Said twice", "7")]  # "The answer is 4," has no colon: not a marker
    assert skipped == 2  # no "The answer is: " in the other two MATH_ rows
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"query": "q", "response": "The answer is: 5.\nThe answer is: 5\n",
                                  "type": "MATH_SV"}]))
    assert load_problems(twice, format="metamath_first")[0][0].answer == "5.\nThe answer is: 5"
    assert load_problems(twice, format="metamath")[0][0].answer == "5"


def test_generic_format_from_parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"q": "One?", "a": "1"}, {"q": "Two?", "a": " "}]).to_parquet(str(path))
    problems, skipped = load_problems(path, format="generic", question_key="q", answer_key="a")
    assert [(p.question, p.answer) for p in problems] == [("One?", "1")] and skipped == 1
    with pytest.raises(DataError, match="rows.parquet: no column question.*columns found: a, q") as error:
        load_problems(path, format="generic")
    assert error.value.message(lambda key: f"--train_{key}=").endswith("set --train_question_key=...")
    with pytest.raises(DataError, match="no answer column 'answer'.*columns found: a, q.*set answer_key="):
        load_problems(path, format="generic", question_key="q")


def test_directory_source_picks_the_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "Train?", "answer": "1"}])
    write_jsonl(tmp_path / "test.jsonl", [{"problem": "Test?", "answer": "2"}])
    problems, skipped = load_problems(tmp_path, split="test")
    assert [(p.question, p.answer) for p in problems] == [("Test?", "2")] and skipped == 0


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_problems(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match="auto, gsm8k, math500, math, metamath, metamath_first, generic"):
        load_problems(DEFAULT_EVAL_SETS["gsm8k"], format="csv")
    good = {"question": "a", "answer": "#### 1"}
    latin1_line = b'{"question": "caf\xe9", "answer": "#### 2"}\n'
    for rows in ([good, latin1_line], [good, latin1_line, good]):  # fails on reading, or only on decoding
        latin1 = write_jsonl(tmp_path / "latin1.jsonl", rows)
        with pytest.raises(ValueError, match=r"latin1.jsonl: line 2: UnicodeDecodeError"):
            load_problems(latin1)
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"question": "a", "answer": "#### 1"}, b'{"question": \n'])
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2: JSONDecodeError"):
        load_problems(broken)
    unknown = write_jsonl(tmp_path / "other.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="other.jsonl: cannot detect the format.*columns found: text"):
        load_problems(unknown)


def test_math_format_takes_the_last_boxed_answer_and_is_detected(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "Add.", "solution": r"First \boxed{1}, then $\boxed{\frac{1}{2}}$.", "level": "Level 2",
         "type": "Algebra"},
        {"problem": "Nested.", "solution": r"So $x = \boxed{\{1, 2\}^{2}}$", "level": "Level 5", "type": "Algebra"},
        {"problem": "No box.", "solution": "It is 3.", "level": "Level 1", "type": "Geometry"},
    ])
    problems, skipped = load_problems(path)  # no answer column: detected as MATH from problem + solution
    assert [(p.question, p.answer) for p in problems] == [("Add.", r"\frac{1}{2}"), ("Nested.", r"\{1, 2\}^{2}")]
    assert skipped == 1
    assert load_problems(path, format="math")[0] == problems


def test_unlabeled_rows_are_kept_only_when_answers_are_not_needed(tmp_path):
    unlabeled = write_jsonl(tmp_path / "prompts.jsonl",
                            [{"question": "Why?"}, {"question": "  "}, {"question": "How?"}])
    problems, skipped = load_problems(unlabeled, need_answers=False)
    assert [(p.question, p.answer) for p in problems] == [("Why?", None), ("How?", None)] and skipped == 1
    with pytest.raises(DataError, match=r"prompts.jsonl: cannot detect the format.*columns found: question"):
        load_problems(unlabeled)  # evaluation and gold rewards need answers
    math_prompts = write_jsonl(tmp_path / "math.jsonl", [{"problem": "P?"}])
    assert [p.answer for p in load_problems(math_prompts, need_answers=False)[0]] == [None]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"problem": "A", "solution": r"\boxed{3}"},
                                                   {"problem": "B", "solution": "none"}])
    assert [p.answer for p in load_problems(mixed, need_answers=False)[0]] == ["3", None]
