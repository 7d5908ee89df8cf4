"""Answer extraction and grading for the UFO environment.

    from nanoufo.grader import extract_answer, grade_batch, parse_batch
    answer = extract_answer(response_text)            # last balanced \\boxed{...}, else last <answer>...</answer>
    oks = grade_batch([answer], ["\\frac{1}{2}"], timeout=5.0)  # math equivalence with math-verify, never hangs
    readable = parse_batch([answer])                  # whether math-verify reads a mathematical expression in it
    answer = extract_think_answer(text)               # UFO's code: <think>...</think><answer>...</answer>
    ok = exact_match(answer, "18")                    # UFO's code: equal once lower-cased, whitespace removed

Grading runs math-verify in one persistent worker process (started on first use, reused for every call).
A pathological answer such as 9^{9^{9^9}} can hang sympy inside C code where no signal reaches it, so the
parent waits at most `timeout` seconds per answer, then kills the worker, counts the answer as wrong and
starts a fresh worker for the rest. Where math-verify is not installed (a GPU image that cannot install it),
grading says so once on stderr and falls back to comparing normalize_answer's spellings, which misses
equivalent forms (0.5 against \\frac{1}{2}). Run `python -m pytest -q tests/test_grader.py` to test it.
"""
import atexit
import contextlib
import functools
import importlib.util
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

BOXED_OPEN = re.compile(r"\\boxed\s*\{")
BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def _closed_boxes(text: str) -> list[tuple[int, str]]:
    """(start, content) of every \\boxed{...} whose brace closes, in one pass over the braces (linear time:
    a response of 12,000 unclosed boxes must not cost 12,000 scans to its end). A backslash-escaped brace
    (\\{, \\}) is a literal set brace, not a group, so it is not counted."""
    box_at = {match.end() - 1: match.start() for match in BOXED_OPEN.finditer(text)}  # "{" position -> box start
    open_braces, boxes = [], []
    for token in BRACE_OR_ESCAPE.finditer(text):
        if token[0] == "{":
            open_braces.append(token.start())
        elif token[0] == "}" and open_braces:
            opened = open_braces.pop()
            if opened in box_at:
                boxes.append((box_at[opened], text[opened + 1:token.start()]))
    return boxes


def _last_answer_tag(text: str) -> str | None:
    """The content of the last non-empty <answer>...</answer> pair (linear time: str.find, no backtracking)."""
    last, pos = None, 0
    while (start := text.find("<answer>", pos)) != -1 and (end := text.find("</answer>", start + 8)) != -1:
        last = text[start + 8:end].strip() or last
        pos = end + 9
    return last


def last_boxed(text: str) -> str | None:
    """The content of the last balanced, non-empty \\boxed{...} (nested braces kept), else None. An unclosed
    box (a truncated response) or an empty one is passed over in favour of an earlier complete one."""
    boxes = [(start, content.strip()) for start, content in _closed_boxes(text) if content.strip()]
    return max(boxes, key=lambda box: box[0])[1] if boxes else None  # the box that starts last


def extract_answer(text: str) -> str | None:
    """The answer of last_boxed (an empty box, the model echoing the instruction's "\\boxed{}", is passed
    over), else the content of the last non-empty <answer>...</answer>, else None."""
    return last_boxed(text) or _last_answer_tag(text)


THINK_ANSWER = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
SPECIAL_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>")


def extract_think_answer(text: str) -> str | None:
    """UFO's code's format: the content of the <answer> of the first <think>...</think> <answer>...</answer>
    (tags and chat markers inside it removed), None without that pattern or with an empty answer. UFO's
    code also splits the content at "||" into several actions; here it stays one answer."""
    match = THINK_ANSWER.search(text)
    if match is None:
        return None
    answer = match.group(2)
    for tag in SPECIAL_TAGS:
        answer = answer.replace(tag, "")
    return answer.strip() or None


def squeeze_answer(answer: str) -> str:
    """UFO's code's normalisation, for grading and for counting distinct answers: lower-cased, no whitespace."""
    return re.sub(r"\s+", "", answer.lower())


def exact_match(answer: str | None, gold: str) -> bool:
    """UFO's code's grading: equal once squeezed (squeeze_answer; no math equivalence), and not empty."""
    squeezed = None if answer is None else squeeze_answer(answer)
    return bool(squeezed) and squeezed == squeeze_answer(gold)


# normalize_answer: rewrite rules applied in order; each removes a way of writing that does not change the answer.
_NORMALIZE_RULES = [
    (re.compile(r"\\(?:left|right)\b"), ""),                         # \left( -> (
    (re.compile(r"\\[,;:! ]|~"), ""),                                # LaTeX spacing commands
    (re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}"), r"\1"),  # \text{cm} -> cm
    (re.compile(r"\\[dt]frac"), r"\\frac"),                          # \dfrac, \tfrac -> \frac
    (re.compile(r"\^\s*\{?\\circ\}?|\\\$|\$|\\%|%"), ""),             # degrees, dollars, percent signs
    (re.compile(r"\s+"), ""),                                        # all whitespace
    (re.compile(r"\.$"), ""),                                        # a trailing full stop
    (re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$"), lambda m: m[0].replace(",", "")),  # 1,000 -> 1000
    (re.compile(r"(?<=\d)\.0+$"), ""),                               # 18.0 -> 18 (whole numbers only)
]


def normalize_answer(answer: str) -> str:
    """A canonical spelling of an answer (the rules above), used only to count distinct answers for the
    repetition penalty; grading uses math-verify. Case is kept (x and X may be different answers)."""
    for pattern, replacement in _NORMALIZE_RULES:
        answer = pattern.sub(replacement, answer)
    return answer


def answer_key(answer: str, by: str = "normalized") -> str:
    """The spelling under which answers count as one when repeats are counted: normalize_answer's ("normalized":
    \\dfrac and \\frac one answer, X and x two) or squeeze_answer's ("squeezed", UFO's code's: X and x one answer,
    \\dfrac and \\frac two)."""
    assert by in ("normalized", "squeezed"), by  # checked by nanoufo.options (distinct_by)
    return normalize_answer(answer) if by == "normalized" else squeeze_answer(answer)


def count_distinct_answers(answers: list[str | None], by: str = "normalized") -> int:
    """Distinct answers among attempts, spelled as answer_key(answer, by) spells them. Attempts with no
    extractable answer (None) all count as ONE more value, so repeating "no answer" is repetition too (the
    format penalty is separate)."""
    return len({None if answer is None else answer_key(answer, by) for answer in answers})


def _serve(memory_limit_mb: int) -> None:
    """The worker's main loop: one JSON line [answer, gold] in, one line b"1" or b"0" out, until stdin closes;
    gold null asks whether the answer parses instead (math-verify finds an expression in it, not only its
    text). Timeouts are the parent's job (it kills this process), so math-verify's own signal timeouts are off."""
    import logging
    import resource

    limit = memory_limit_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a memory bomb fails fast instead of swapping
    protocol = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints from sympy/math-verify go to stderr, never into the protocol
    from math_verify import parse, verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parsed_golds: dict[str, list] = {}
    # math-verify's first call sets itself up (lazy imports, the LaTeX grammar; about 0.3 s idle, seconds on
    # a loaded machine): done here, it is part of the start-up, and `timeout` bounds each answer's own work
    verify(parse("\\boxed{1}", parsing_timeout=None), parse("\\boxed{1}", parsing_timeout=None), timeout_seconds=None)
    protocol.write(b"ready\n")
    for line in sys.stdin.buffer:
        answer, gold = json.loads(line)
        try:
            target = parse("\\boxed{" + answer + "}", parsing_timeout=None)
            if gold is None:  # parse returns [expression, text] when it reads one, else [text] or []
                verdict = any(not isinstance(x, str) for x in target)
            else:
                if gold not in parsed_golds:
                    parsed_golds[gold] = parse("\\boxed{" + gold + "}", parsing_timeout=None)
                verdict = verify(parsed_golds[gold], target, timeout_seconds=None)
        except Exception:  # math-verify on odd input (or a MemoryError): the answer is not shown correct
            verdict = False
        protocol.write(b"1\n" if verdict else b"0\n")


class Grader:
    """math-verify in a persistent worker process (see the module docstring); a timeout costs one worker
    restart (a few seconds). Results are cached per (answer, gold); the worker's address space is capped
    at `memory_limit_mb`."""

    WINDOW = 64  # jobs in flight at once: bounded so neither pipe can fill up and deadlock
    WINDOW_BYTES = 32 << 10  # and bytes (Linux pipes hold 64 KiB): a write must never wait on a stuck worker
    CACHE_SIZE = 100_000

    def __init__(self, startup_timeout: float = 120.0, memory_limit_mb: int = 4096):
        self.startup_timeout, self.memory_limit_mb = startup_timeout, memory_limit_mb
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._cache: dict[tuple[str, str], bool] = {}

    def _start(self) -> None:
        package_parent = str(Path(__file__).resolve().parent.parent)
        code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                f"from nanoufo.grader import _serve; _serve({self.memory_limit_mb})")
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)
        self._buffer = b""
        if self._read_line(self.startup_timeout) != b"ready":
            self.close()
            raise RuntimeError("nanoufo/grader.py: the math-verify worker did not start (see its stderr above)")

    def _read_line(self, timeout: float) -> bytes | None:
        """The worker's next line, or None if it does not come within `timeout` seconds or the worker died."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()  # read the raw descriptor, so select() sees every byte not yet read
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        """Kill the worker (the next call starts a fresh one)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(BrokenPipeError):  # jobs still buffered for the dead worker: dropped
                    pipe.close()
            self._proc = None

    def _window_end(self, lines: list[bytes], pos: int) -> int:
        """Jobs pos..end-1 go out in one write: at most WINDOW jobs and WINDOW_BYTES, so the write fits in
        the pipe even when the worker hangs on the first. A longer job goes alone: the worker, idle at the
        start of a window, reads a whole line before it works on it."""
        end, size = pos + 1, len(lines[pos])
        while end < min(len(lines), pos + self.WINDOW) and size + len(lines[end]) <= self.WINDOW_BYTES:
            size += len(lines[end])
            end += 1
        return end

    def grade(self, answers: list[str | None], golds: list[str | None], timeout: float = 5.0) -> list[bool]:
        """Whether each answer equals its gold answer (gold None: whether it parses); None or blank answers
        are wrong without a look."""
        if len(answers) != len(golds):
            raise ValueError(f"grade: {len(answers)} answers but {len(golds)} gold answers")
        if not has_math_verify():
            return [_spelled_alike(answer, gold) for answer, gold in zip(answers, golds)]
        pairs = list(zip(answers, golds))
        verdicts = {pair: self._cache[pair] for pair in pairs if pair in self._cache}
        todo = list(dict.fromkeys(p for p in pairs if p[0] and p[0].strip() and p not in verdicts))
        lines = [json.dumps(pair).encode() + b"\n" for pair in todo]
        pos = 0
        while pos < len(todo):
            if self._proc is None:
                self._start()
            window = todo[pos:self._window_end(lines, pos)]
            try:
                self._proc.stdin.write(b"".join(lines[pos:pos + len(window)]))
                self._proc.stdin.flush()
            except BrokenPipeError:  # the worker died between calls (killed from outside): start another
                self.close()
                continue
            for pair in window:
                line = self._read_line(timeout)
                pos += 1
                verdicts[pair] = line == b"1"
                if line is None:  # too slow (or the worker died): wrong, and the rest of the window is resent
                    self.close()
                    break
        if len(self._cache) + len(verdicts) > self.CACHE_SIZE:
            self._cache.clear()
        self._cache.update(verdicts)
        return [verdicts.get(pair, False) for pair in pairs]


@functools.cache
def has_math_verify() -> bool:
    """Whether math-verify can be imported; the first call without it says once how grading falls back."""
    try:
        found = importlib.util.find_spec("math_verify") is not None
    except (ImportError, ValueError):  # a broken install, or one blocked (sys.modules["math_verify"] = None)
        found = False
    if not found:
        print("nanoufo.grader: math-verify is not installed: answers are graded by comparing normalize_answer's "
              "spellings (no math equivalence); pip install math-verify", file=sys.stderr)
    return found


def _spelled_alike(answer: str | None, gold: str | None) -> bool:
    """The fallback without math-verify: the same normalize_answer spelling (gold None: any non-blank answer)."""
    if answer is None or not answer.strip():
        return False
    return gold is None or normalize_answer(answer) == normalize_answer(gold)


_default_grader = Grader()
atexit.register(_default_grader.close)


def grade_batch(answers: list[str | None], golds: list[str], timeout: float = 5.0) -> list[bool]:
    """Whether each answer (e.g. from extract_answer) equals its gold answer mathematically: 0.5 ==
    \\frac{1}{2}, \\$18 == 18.0 == 18, [-2,7] == [-2, 7]; an answer that takes longer than `timeout` seconds
    is wrong. The shared worker grades them in one round trip per window of 64, not per answer."""
    return _default_grader.grade(answers, golds, timeout)


def parse_batch(answers: list[str | None], timeout: float = 5.0) -> list[bool]:
    """Whether math-verify reads a mathematical expression in each answer ("3433", "\\frac{1}{2}", "\\{1, 2\\}"
    do; "x+", an unclosed brace, a blank answer or None do not; one that takes longer than `timeout` seconds
    does not), in the shared worker like grade_batch."""
    return _default_grader.grade(answers, [None] * len(answers), timeout)
