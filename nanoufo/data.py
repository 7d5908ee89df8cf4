"""Math problem sets for UFO episodes: (question, gold answer) pairs from local files, or with the `datasets`
library from a hub name, a directory or a parquet file.

    from nanoufo.data import load_problems, DEFAULT_EVAL_SETS
    problems, n_skipped = load_problems(DEFAULT_EVAL_SETS["gsm8k"])              # format detected
    problems, n_skipped = load_problems("MetaMathQA-395K.json", format="metamath")
    problems, n_skipped = load_problems("my.parquet", format="generic", question_key="q", answer_key="a")

Sources: a local .jsonl/.json file (read with the json module, so `datasets` is not needed for them), a
.parquet file, a directory of files (`split` picks the files), or a hub name when online (those three with
`datasets`, imported only then). Formats: gsm8k (answer after the last "#### "), math500 (problem/answer
fields), metamath (MetaMathQA: query, a response ending in "The answer is: ...", only MATH_ rows; metamath_first reads
its gold as UFO's code does), math (hendrycks MATH:
problem, and the gold is the last \\boxed{} of the solution) and generic. A row without a usable answer is
skipped and counted, never a crash; with need_answers=False (label-free training) it is kept, answer None.
Tests: `python -m pytest -q tests/test_data.py`.
"""
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanoufo.grader import last_boxed

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EVAL_SETS = {  # held-out evaluation sets bundled with the project (attribution: data/SOURCES.md)
    "gsm8k": REPO_ROOT / "data" / "gsm8k" / "test.jsonl",
    "math500": REPO_ROOT / "data" / "math500" / "test.jsonl",
}
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # datasets' builder per suffix
METAMATH_MARKER = re.compile(r"The answer is:?")
METAMATH_FIRST = re.compile(r"The answer is: (.*)", re.DOTALL)
THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass
class Problem:
    question: str
    answer: str | None  # None: an unlabeled row (label-free training only); never graded as correct
    id: str  # the source row, e.g. "gsm8k/test.jsonl:17" (0-based row index in the loaded split)


def _gsm8k_answer(solution: str) -> str | None:
    _, marker, answer = solution.rpartition("#### ")
    return THOUSANDS_SEPARATOR.sub("", answer.strip()) if marker else None


def _metamath_answer(response: str) -> str | None:
    """The text after the LAST "The answer is" (colon optional), up to the end of its line, without a final
    full stop: a response that states an answer twice has its final one as gold, not several sentences."""
    markers = list(METAMATH_MARKER.finditer(response))
    if not markers:
        return None
    rest = response[markers[-1].end():].strip()
    return rest.split("\n", 1)[0].strip().removesuffix(".").strip() or None


def _metamath_first_answer(response: str) -> str | None:
    """UFO's code's gold (ragen/env/metamathqa/env.py, _extract_answer): everything after the FIRST "The answer
    is: " (colon and space required) to the end of the response, stripped: a response that states its answer
    twice keeps both statements, and "5." keeps its full stop (which exact grading then requires)."""
    match = METAMATH_FIRST.search(response)
    return match[1].strip() or None if match else None


@dataclass(frozen=True)
class Format:
    question_key: str
    answer_key: str
    parse_answer: Callable[[str], str | None]  # the gold answer from the answer field, None if unusable
    keep_row: Callable[[dict], bool] = lambda row: True  # rows a format leaves out by design (not "skipped")
    extra_columns: tuple[str, ...] = ()  # other columns keep_row reads


FORMATS = {
    "gsm8k": Format("question", "answer", _gsm8k_answer),
    "math500": Format("problem", "answer", str.strip),
    "math": Format("problem", "solution", last_boxed),  # hendrycks MATH: the gold is the solution's last \boxed{}
    "metamath": Format("query", "response", _metamath_answer,
                       keep_row=lambda row: isinstance(row["type"], str) and row["type"].startswith("MATH_"),
                       extra_columns=("type",)),
    "metamath_first": Format("query", "response", _metamath_first_answer,
                             keep_row=lambda row: isinstance(row["type"], str) and row["type"].startswith("MATH_"),
                             extra_columns=("type",)),
    "generic": Format("question", "answer", str.strip),
}


class DataError(ValueError):
    """A source that cannot be read as problems. It names the source (`where`), what is wrong, the columns
    found and the load_problems arguments that fix it (`fix`); a script words those as its own flags with
    message(flag), so the one line it prints names the flag to use."""

    def __init__(self, where: str, problem: str, columns: list[str] | None = None, fix: tuple[str, ...] = ()):
        self.where, self.problem, self.columns, self.fix = where, problem, columns, fix
        super().__init__(self.message())

    def message(self, flag: Callable[[str], str] = lambda key: f"{key}=") -> str:
        parts = [f"{self.where}: {self.problem}"]
        if self.columns is not None:
            parts.append(f"columns found: {', '.join(self.columns) or 'none'}")
        if self.fix:
            parts.append("set " + " and/or ".join(f"{flag(key)}..." for key in self.fix))
        return "; ".join(parts)


def error_line(error: Exception, flag: Callable[[str], str]) -> str:
    """A reading error as the one line a script prints: a DataError names the script's flag (flag(key))."""
    text = error.message(flag) if isinstance(error, DataError) else str(error)
    return " ".join(text.split())


def _as_text(value) -> str | None:
    """A field's text: strings as they are, numbers written out; anything else (None, lists, bools) is unusable."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass
class Rows:
    """A source's rows as dicts, and its columns (every key any row has, in order of first appearance)."""
    rows: list[dict]
    columns: list[str]

    @classmethod
    def of(cls, rows: list[dict]) -> "Rows":
        return cls(rows, list(dict.fromkeys(key for row in rows for key in row)))


def _read_json(path: Path) -> list[dict]:
    """A .jsonl file's rows, or a .json file's (a list of objects, or JSON lines); a line or file that is not
    UTF-8 JSON is a ValueError naming the file (and the line)."""
    raw = path.read_bytes()
    if path.suffix == ".json":
        try:
            rows = json.loads(raw.decode("utf-8"))
            if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
                return rows
            raise ValueError(f"{path}: not a list of JSON objects (one per row) nor JSON lines")
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # JSON lines in a .json file, as `datasets` reads them
    rows = []
    for line_number, line in enumerate(raw.split(b"\n"), 1):
        try:
            row = json.loads(line.decode("utf-8")) if line.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: line {line_number}: {type(error).__name__}: {error}") from None
        if row is not None and not isinstance(row, dict):
            raise ValueError(f"{path}: line {line_number}: not a JSON object")
        if row is not None:
            rows.append(row)
    return rows


def _with_datasets(what: str):
    """The `datasets` library, which only hub names, directories and parquet files need."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{what} needs the `datasets` library (pip install datasets); .jsonl and .json files "
                          "are read without it") from None
    datasets.disable_progress_bars()  # arrow's per-split bars would bury the counts and errors printed here
    return datasets


def _read(source: str | Path, split: str, name: str | None) -> tuple[Rows, str]:
    """The rows and a short label for Problem ids: a file's last two path parts, else directory or hub name/split."""
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _with_datasets(f"{path} (a directory)").load_dataset(str(path), split=split)
        return Rows(rows.to_list(), rows.column_names), f"{path.resolve().name}/{split}"
    if path.exists():
        if path.suffix not in LOCAL_BUILDERS:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use one of {sorted(LOCAL_BUILDERS)})")
        label = "/".join(path.resolve().parts[-2:])
        if path.suffix in (".jsonl", ".json"):
            return Rows.of(_read_json(path)), label
        datasets = _with_datasets(str(path))
        try:
            rows = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
        except Exception as error:
            raise ValueError(f"{path}: could not be read: {error}") from error
        return Rows(rows.to_list(), rows.column_names), label
    if path.suffix in LOCAL_BUILDERS or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path}: no such file or directory")
    datasets = _with_datasets(f"{source} (a Hugging Face hub name)")
    try:
        rows = datasets.load_dataset(str(source), name, split=split)
    except Exception as error:
        raise FileNotFoundError(f"{source}: not a local file or directory, and loading it from the "
                                f"Hugging Face hub failed ({type(error).__name__}: {error})") from error
    return Rows(rows.to_list(), rows.column_names), f"{source}/{split}"


def _detect_format(rows: Rows, where: str, need_answers: bool, question_key: str | None) -> str:
    """The format whose columns the rows have; without need_answers a question column alone will do; rows
    of no known layout whose question field the caller named are generic."""
    columns = set(rows.columns)
    if {"query", "response", "type"} <= columns:
        return "metamath"
    if {"problem", "answer"} <= columns:
        return "math500"
    if {"problem", "solution"} <= columns:
        return "math"
    if {"question", "answer"} <= columns:
        answers = [_as_text(row.get("answer")) or "" for row in rows.rows[:20]]
        return "gsm8k" if any("#### " in a for a in answers) else "generic"
    if not need_answers and "problem" in columns:
        return "math"
    if (not need_answers and "question" in columns) or (question_key and question_key in columns):
        return "generic"
    detectable = [name for name in FORMATS if name != "metamath_first"]  # metamath_first: never guessed
    raise DataError(where, f"cannot detect the format ({', '.join(detectable)}) from the columns",
                    sorted(columns), ("format", "question_key", "answer_key"))


def _check_columns(rows: Rows, where: str, format: str, question_key: str, answer_key: str,
                   chosen: Format, need_answers: bool) -> None:
    """A DataError naming the missing columns before any row is read."""
    columns = sorted(rows.columns)
    missing = [key for key in (question_key, *chosen.extra_columns) if key not in columns]
    if missing:
        raise DataError(where, f"no column {', '.join(missing)} for the {format} format", columns,
                        ("question_key",) if question_key in missing else ("format",))
    if need_answers and answer_key not in columns:
        raise DataError(where, f"no answer column {answer_key!r} (the {format} format's): evaluation and gold "
                        "rewards need answers", columns, ("answer_key",))


def _problems_from_rows(rows: Rows, label: str, where: str, format: str, limit: int | None,
                        question_key: str | None, answer_key: str | None,
                        need_answers: bool) -> tuple[list[Problem], Counter]:
    format = _detect_format(rows, where, need_answers, question_key) if format == "auto" else format
    chosen = FORMATS[format]
    question_key, answer_key = question_key or chosen.question_key, answer_key or chosen.answer_key
    _check_columns(rows, where, format, question_key, answer_key, chosen, need_answers)
    has_answers = answer_key in rows.columns
    problems, skipped = [], Counter()
    for index, row in enumerate(rows.rows):
        if limit is not None and len(problems) >= limit:
            break
        if not chosen.keep_row({key: row.get(key) for key in chosen.extra_columns}):
            continue
        question = _as_text(row.get(question_key))
        answer_field = _as_text(row.get(answer_key)) if has_answers else None
        answer = (chosen.parse_answer(answer_field) if answer_field is not None else None) or None
        if question is None or (need_answers and answer_field is None):
            skipped["missing field or wrong type"] += 1
        elif not question.strip():
            skipped["empty question"] += 1
        elif need_answers and not answer:
            skipped["no parsable answer"] += 1
        else:
            problems.append(Problem(question.strip(), answer, f"{label}:{index}"))
    return problems, skipped


def load_problems(source: str | Path, format: str = "auto", split: str = "train", limit: int | None = None,
                  question_key: str | None = None, answer_key: str | None = None,
                  name: str | None = None, need_answers: bool = True) -> tuple[list[Problem], int]:
    """Problems from `source` and the number of rows skipped for want of a usable question and answer.
    `question_key`/`answer_key` override the format's field names; `name` is a hub data set's config
    (e.g. "main" for openai/gsm8k); `limit` stops after that many problems. need_answers=False (label-free
    training) keeps rows without a usable answer, with answer None, and accepts a file with no answer
    column. Text that is not UTF-8 is an error naming the file (and, for jsonl, the line): it points at a
    broken file, not a bad row. A source whose columns do not fit raises DataError."""
    if format not in FORMATS and format != "auto":
        raise DataError(str(source), f"unknown data format {format!r} (valid: auto, {', '.join(FORMATS)})",
                        fix=("format",))
    rows, label = _read(source, split, name)
    problems, skipped = _problems_from_rows(rows, label, str(source), format, limit, question_key, answer_key,
                                            need_answers)
    if skipped:
        log.warning("%s: skipped %d rows (%s)", label, sum(skipped.values()), dict(skipped))
    return problems, sum(skipped.values())
