"""Process reward models (PRMs) in the layout of Qwen2.5-Math-PRM: split a response into steps, build the
PRM's input with its own tokenizer, and score every step; the PRM as a training reward (PRMReward); and
ProcessBench-style evaluation (find the earliest wrong step). Best-of-N with a PRM is nanoufo/evaluate.py.

    scorer = PRMScorer.load("Qwen2.5-Math-PRM-7B", device="cuda", dtype=torch.bfloat16)
    steps = split_steps(response)                             # blank lines separate steps
    probs = scorer.step_scores([question], [steps])[0]        # (n_steps,) P(step correct)
    score = aggregate(probs, "min")                           # or "product"

The PRM reads a chat: the system prompt below, the question as the user turn, and the steps joined by the
separator token <extra_0> as the assistant turn, with one more separator after the last step. A step's
score is the softmax probability of label 1 of the `score` head at that step's separator. The separator's
id is read from the checkpoint's tokenizer (Qwen2.5-Math-PRM's names id 151651 <extra_0>; the general
Qwen2.5 tokenizer calls the same id <|quad_end|>, so it is refused rather than guessed).

Inputs of different lengths are packed several to a row, and a call's rows end to end in one forward whose
sequence lengths are given (nanoufo/model.py seq_lens: no host sync to find them, no padding computed); only
the hidden states at separators go through the head: no (T, V) logits.
Tests: python -m pytest -q tests/test_prm.py
"""
import bisect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoufo import rl
from nanoufo.model import PRM_ARCHITECTURE, Qwen2, to_device
from nanoufo.options import PRM_AGGREGATES
from nanoufo.parallel import SINGLE, ParallelContext
from nanoufo.tokenizer import load_tokenizer
from nanoufo.weights import load_model


SEPARATOR = "<extra_0>"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
STEP_BREAK = re.compile(r"\n[ \t]*\n")  # a blank line (possibly holding spaces) ends a step


def step_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character offsets of each step of a response: the non-blank stretches between blank
    lines, with surrounding whitespace left out. A response of only whitespace has no steps."""
    spans, start = [], 0
    for cut in [*STEP_BREAK.finditer(text), None]:
        end = len(text) if cut is None else cut.start()
        piece = text[start:end]
        if piece.strip():
            left = start + len(piece) - len(piece.lstrip())
            spans.append((left, start + len(piece.rstrip())))
        start = end if cut is None else cut.end()
    return spans


def split_steps(text: str) -> list[str]:
    """The steps of a response (see step_spans)."""
    return [text[a:b] for a, b in step_spans(text)]


def aggregate(scores: torch.Tensor, how: str) -> float:
    """One number per response from its step scores: the weakest step ("min") or all steps right ("product")."""
    if how == "min":
        return float(scores.min())
    if how == "product":
        return float(scores.prod())
    raise ValueError(f"unknown PRM aggregate {how!r} (one of {', '.join(PRM_AGGREGATES)})")


def separator_id(tokenizer, source: str) -> int:
    """The id of <extra_0> in the PRM's tokenizer; an error naming `source` when it has none."""
    token_id = tokenizer.convert_tokens_to_ids(SEPARATOR)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{source}: the tokenizer has no {SEPARATOR} token, the PRM's step separator (a "
                         "Qwen2.5-Math-PRM tokenizer has it; the general Qwen2.5 tokenizer does not)")
    if tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"] != [token_id]:
        raise ValueError(f"{source}: {SEPARATOR} does not encode as the single token {token_id}")
    return token_id


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items of each row: first fit, longest first; a row holds at most `capacity` tokens
    unless one item alone is longer (it gets a row of its own)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


class PRMScorer:
    """Step scores from a PRM (a Qwen2 whose config names PRM_ARCHITECTURE) and its own tokenizer.

    tokens_per_row and rows_per_call bound one forward pass (a row packs several inputs); under tensor
    parallelism every rank of the group makes the same calls and gets the same scores."""

    def __init__(self, model: Qwen2, tokenizer, source: str = "tokenizer", system_prompt: str = SYSTEM_PROMPT,
                 tokens_per_row: int = 2048, rows_per_call: int = 4):
        if not model.config.is_prm:
            raise ValueError(f"{source}: the model is a {model.config.architecture}, not a {PRM_ARCHITECTURE}")
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.separator = separator_id(tokenizer, source)
        if self.separator >= model.config.vocab_size:
            raise ValueError(f"{source}: {SEPARATOR} is id {self.separator}, outside the model's vocabulary "
                             f"of {model.config.vocab_size}")
        self.tokens_per_row, self.rows_per_call = tokens_per_row, rows_per_call

    @classmethod
    def load(cls, ckpt_dir: str | Path, device="cpu", dtype: torch.dtype | None = None, par: ParallelContext = SINGLE,
             **options) -> "PRMScorer":
        """The PRM checkpoint directory's weights and its own tokenizer (the separator is read from it)."""
        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{ckpt_dir}: a PRM checkpoint needs its own tokenizer (tokenizer_config.json), "
                                    f"which defines the {SEPARATOR} step separator")
        tokenizer = load_tokenizer(ckpt_dir)
        separator_id(tokenizer, str(ckpt_dir))  # before any weight is read
        model = load_model(ckpt_dir, device=device, dtype=dtype, par=par).eval()
        return cls(model, tokenizer, str(ckpt_dir), **options)

    def input_ids(self, question: str, steps: list[str]) -> list[int]:
        """The PRM's tokens for a question and its steps, one separator after each step. A separator
        spelled inside a step's text is removed, so separators and steps stay one to one."""
        steps = [s.replace(SEPARATOR, "") for s in steps]
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question},
                    {"role": "assistant", "content": SEPARATOR.join(steps) + SEPARATOR}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.separator) != len(steps):
            raise ValueError(f"the PRM input has {ids.count(self.separator)} separators for {len(steps)} steps "
                             "(the chat template or system prompt holds one)")
        return ids

    @torch.no_grad()
    def step_scores(self, questions: list[str], step_lists: list[list[str]]) -> list[torch.Tensor | None]:
        """P(step correct) for every step, one fp32 CPU tensor (n_steps,) per item; None for an item with
        no steps or whose input is longer than the model's context (callers count those)."""
        limit = self.model.config.max_position_embeddings
        inputs = [self.input_ids(q, s) if s else None for q, s in zip(questions, step_lists, strict=True)]
        scorable = [i for i, ids in enumerate(inputs) if ids is not None and len(ids) <= limit]
        rows = [[scorable[j] for j in row] for row in pack([len(inputs[i]) for i in scorable], self.tokens_per_row)]
        results: list[torch.Tensor | None] = [None] * len(inputs)
        for start in range(0, len(rows), self.rows_per_call):
            chunk = rows[start:start + self.rows_per_call]
            for i, probs in zip(sum(chunk, []), self._score_rows([[inputs[i] for i in row] for row in chunk])):
                results[i] = probs
        return results

    def _score_rows(self, rows: list[list[list[int]]]) -> list[torch.Tensor]:
        """One forward over the rows' inputs packed end to end, each a sequence of its own (lengths known on the
        host: no device read to find them); the step probabilities of each input in order."""
        device = self.model.model.norm.weight.device
        inputs = [item for row in rows for item in row]
        lengths, flat = [len(item) for item in inputs], sum(inputs, [])
        ids = torch.tensor([flat])  # (1, N)
        positions = torch.tensor([[p for n in lengths for p in range(n)]])  # (1, N)
        at_separators = torch.tensor([t for t, token in enumerate(flat) if token == self.separator])
        ids, positions, at_separators = (to_device(x, device) for x in (ids, positions, at_separators))
        hidden = self.model(ids, positions, seq_lens=lengths)[0]  # (N, H)
        counts = [item.count(self.separator) for item in inputs]
        return list(self.model.step_probs(hidden[at_separators]).cpu().split(counts))

    def response_scores(self, questions: list[str], responses: list[str], how: str) -> list[float | None]:
        """One score per response (its steps' scores aggregated); None where step_scores gives None."""
        scores = self.step_scores(questions, [split_steps(r) for r in responses])
        return [None if s is None else aggregate(s, how) for s in scores]


# ------------------------------------------------------------------ the PRM as a training reward
def blend(attempt_scores: list[float], gold_turn_rewards: list[float], gold_weight: float) -> list[float]:
    """Each attempt's reward: (1 - gold_weight) times its PRM score divided by the number of attempts (an
    episode's PRM part is the mean over its attempts, so a wrong first try costs), plus gold_weight times
    its gold reward (env.turn_rewards). The episode's score is their sum."""
    n = len(attempt_scores)
    return [(1.0 - gold_weight) * score / n + gold_weight * gold
            for score, gold in zip(attempt_scores, gold_turn_rewards, strict=True)]


def step_last_tokens(tokenizer, ids: list[int], char_ends: list[int]) -> list[int]:
    """For each character offset of the text decode(ids) (ascending), the index of the token that writes
    the character before it: the smallest i with len(decode(ids[:i + 1])) >= end, found by bisection
    (the last token when none is; each search starts where the previous one ended)."""
    decoded_length = lambda i: len(tokenizer.decode(ids[:i + 1]))  # noqa: E731
    found, low = [], 0
    for end in char_ends:
        low = bisect.bisect_left(range(len(ids) - 1), end, lo=low, key=decoded_length)
        found.append(low)
    return found


@dataclass
class PRMRewards:
    """A batch's PRM rewards; for every placement, the rewards an episode places sum to its score."""
    scores: torch.Tensor  # (B,) episode scores (group filter, GRPO, "last" placement)
    turn_rewards: list[list[float]]  # per episode and attempt, for "per_turn" (on the attempt's last token)
    step_points: list[list[tuple[int, float]]]  # per episode, (token index, reward) pairs for "per_step"
    prm_mean: float  # the mean PRM score of the attempts (before blending)
    unscored: int  # attempts the PRM could not score (no steps, or longer than its context): scored 0


class PRMReward:
    """Scores UFO episodes with a PRM: every attempt is read with the question as its context (as the PRM
    was trained: one question, one solution), its step scores aggregated by "min" or "product", and blended
    with the gold reward (see blend). For "per_step" placement an attempt's PRM part is spread over its
    steps' last tokens by rl.step_rewards and its gold part put on its last token. `tokenizer` is the
    policy's: it maps each step's end in the attempt's text back to a sampled token."""

    def __init__(self, scorer: PRMScorer, tokenizer, aggregate: str = "min", gold_weight: float = 0.0):
        assert aggregate in PRM_AGGREGATES and 0.0 <= gold_weight <= 1.0, "checked by nanoufo.config.validate"
        self.scorer, self.tokenizer, self.aggregate, self.gold_weight = scorer, tokenizer, aggregate, gold_weight

    def __call__(self, graded) -> PRMRewards:
        """A graded rollout's episodes (nanoufo.rollout.Graded) scored; the gold part is the environment's
        reward of each attempt (graded.turn_rewards)."""
        episodes, rollout = graded.episodes, graded.rollout
        attempts = [(b, t) for b, e in enumerate(episodes) for t in range(e.turns)]
        spans = [step_spans(episodes[b].responses[t]) for b, t in attempts]
        step_scores = self.scorer.step_scores([episodes[b].problem.question for b, _ in attempts],
                                              [[episodes[b].responses[t][i:j] for i, j in s]
                                               for (b, t), s in zip(attempts, spans)])
        prm, points = [[0.0] * e.turns for e in episodes], [[] for _ in episodes]
        for (b, t), scores, text_spans in zip(attempts, step_scores, spans):
            if scores is not None:
                prm[b][t] = aggregate(scores, self.aggregate)
                points[b] += self._step_points(rollout, b, t, text_spans, scores, episodes[b].turns)
        turn_rewards = []
        for b, (turn_spans, gold) in enumerate(zip(rollout.turn_spans, graded.turn_rewards, strict=True)):
            turn_rewards.append(blend(prm[b], gold, self.gold_weight))
            points[b] += [(end - 1, self.gold_weight * g) for (_, end), g in zip(turn_spans, gold, strict=True)
                          if self.gold_weight * g]
        return PRMRewards(torch.tensor([sum(r) for r in turn_rewards], dtype=torch.float32), turn_rewards, points,
                          sum(map(sum, prm)) / max(len(attempts), 1), step_scores.count(None))

    def _step_points(self, rollout, b: int, t: int, text_spans, scores: torch.Tensor, turns: int):
        """(token index, reward) at the last token of each step of attempt t of row b."""
        start, end = rollout.turn_spans[b][t]
        ids = rollout.tokens[b, start:end].tolist()  # its text was decoded without a closing stop token, which
        last = step_last_tokens(self.tokenizer, ids, [e for _, e in text_spans])  # the bisection never needs
        share = (1.0 - self.gold_weight) / turns
        return [(start + i, share * r) for i, r in zip(last, rl.step_rewards(scores.tolist(), self.aggregate))]


# ------------------------------------------------------------------ ProcessBench: the earliest wrong step
@dataclass
class BenchRow:
    problem: str
    steps: list[str]
    label: int  # index of the earliest wrong step, -1 when every step is right
    id: str  # "file:line"


def _bench_problem(row, where: str) -> BenchRow | str:
    """The row, or why it is skipped."""
    if not isinstance(row, dict):
        return f"{where}: not a JSON object"
    problem, steps, label = row.get("problem"), row.get("steps"), row.get("label")
    if not isinstance(problem, str) or not problem.strip():
        return f"{where}: no 'problem' text"
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        return f"{where}: 'steps' is not a list of strings"
    if not [s for s in steps if s.strip()]:
        return f"{where}: no steps"
    if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
        return f"{where}: label {label!r} is out of range for {len(steps)} steps (-1, or 0 to {len(steps) - 1})"
    return BenchRow(problem, steps, label, where)


def load_processbench(path: str | Path) -> tuple[list[BenchRow], list[str]]:
    """Rows of a ProcessBench-style file (.jsonl, or .json holding a list) with fields problem, steps (a list
    of strings) and label, and one message per skipped row (missing fields, no steps, label out of range).
    A line that is not JSON is an error naming the file and line: the file is broken, not a row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ProcessBench file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            listed = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
        if not isinstance(listed, list):
            raise ValueError(f"{path}: a .json ProcessBench file must hold a list of rows, "
                             f"not a {type(listed).__name__}")
        rows = [(f"{path}:{i}", row) for i, row in enumerate(listed)]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number}: not JSON ({error})") from None
    parsed = [_bench_problem(row, where) for where, row in rows]
    return [r for r in parsed if isinstance(r, BenchRow)], [r for r in parsed if isinstance(r, str)]


def first_flagged(scores: torch.Tensor, threshold: float) -> int:
    """The index of the first step scored below threshold, -1 when none is."""
    low = (scores < threshold).nonzero()
    return int(low[0]) if len(low) else -1


PROCESSBENCH_SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")  # the data set's four splits, in its order


def processbench_files(data: str) -> list[tuple[str, Path]]:
    """(subset name, file) for --data: a directory holding the four subsets (<name>.jsonl, or .json: the paper's
    "Avg." is their mean, so all four must be there), a comma-separated list of files, or one file; a file's
    subset is its name without the extension. A missing file is a FileNotFoundError naming it."""
    if Path(data).is_dir():
        files = []
        for name in PROCESSBENCH_SUBSETS:
            found = [Path(data) / f"{name}{suffix}" for suffix in (".jsonl", ".json")
                     if (Path(data) / f"{name}{suffix}").is_file()]
            if not found:
                raise FileNotFoundError(f"{data}: no {name}.jsonl (or {name}.json): a ProcessBench directory holds "
                                        f"the four subsets {', '.join(PROCESSBENCH_SUBSETS)}")
            files.append((name, found[0]))
        return files
    files = [Path(entry.strip()) for entry in data.split(",")]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ProcessBench file not found")
    return [(path.stem, path) for path in files]


def processbench_metrics(predicted: list[int | None], labels: list[int]) -> dict[str, float]:
    """Accuracy on erroneous samples (the earliest wrong step found exactly), on correct ones (none flagged),
    and their harmonic mean (F1), as ProcessBench's code computes them; a prediction of None (a row the PRM
    could not score) is wrong whatever the label. NaN where a kind of sample is absent."""
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    erroneous = mean([p == y for p, y in zip(predicted, labels, strict=True) if y != -1])
    correct = mean([p == -1 for p, y in zip(predicted, labels) if y == -1])
    # ProcessBench's harmonic mean; NaN when a kind of sample is absent (NaN + x is not > 0), 0 when both are 0
    f1 = 2 * erroneous * correct / (erroneous + correct) if erroneous + correct > 0 else erroneous + correct
    return {"samples": float(len(labels)), "erroneous": float(sum(y != -1 for y in labels)),
            "acc_erroneous": erroneous, "acc_correct": correct, "f1": f1}


def evaluate_processbench(scorer: PRMScorer, rows: list[BenchRow], threshold: float = 0.5,
                          batch_size: int = 16) -> tuple[dict[str, float], list[dict]]:
    """The metrics table and one record per row (id, label, prediction, step scores). A row the PRM cannot
    read (longer than its context) is predicted None, so it counts as wrong, as a critique without a readable
    verdict does in ProcessBench's code; the table counts those rows as `unscored`."""
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        for row, scores in zip(batch, scorer.step_scores([r.problem for r in batch], [r.steps for r in batch])):
            records.append({"id": row.id, "label": row.label,
                            "predicted": None if scores is None else first_flagged(scores, threshold),
                            "scores": None if scores is None else scores.tolist()})
    table = processbench_metrics([r["predicted"] for r in records], [r["label"] for r in records])
    return table | {"unscored": float(sum(r["predicted"] is None for r in records))}, records


def mean_f1(tables: list[dict[str, float]]) -> float:
    """The mean of the subsets' F1 (the ProcessBench paper's "Avg."); NaN if any subset's F1 is NaN."""
    return sum(table["f1"] for table in tables) / len(tables)
