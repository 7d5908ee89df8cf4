"""Every option of the held-out evaluation reaches the sampler and the environment through the real entry
points: train.py's evaluations (at the start, every eval_interval steps and at the end; run in this process)
and sample.py (sample.main) on that run's checkpoint, with no flag (the run's settings: its table equals the
one train.py logged) and with each flag alone (that setting replaced, every other one the run's).

What is checked is what the evaluation did, recorded where it happens (Probe): the temperature and top-p of
every draw (nanoufo.decode.sample), the attempts and tokens of each evaluation batch's rollout, the prompt and
feedback text the sampler was given, and how the batch's environment grades. The run sets every option to a
value that is neither its default nor the training rollouts' (greedy evaluation at temperature 0 beside
training at 1, 3 attempts beside 2, ...), so an option dropped anywhere between the config and the sampler
fails its case. tests/mutation.py plants such drops.

    python -m pytest -q tests/test_eval_options.py
"""
import json
import math
import runpy
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import sample
from conftest import TINY_QWEN, make_hf_model
from nanoufo import decode, evaluate
from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.rollout import Graded

ROOT = Path(__file__).resolve().parent.parent
# option: (train.py's key, sample.py's flag, the run's value, a flag's value)
OPTIONS = {
    "temperature": ("eval_temperature", "temperature", 0.0, 0.7),  # the run evaluates greedily, trains at 1.0
    "top_p": ("eval_top_p", "top_p", 0.9, 0.8),  # trains at 1.0
    "turns": ("eval_k", "k", 3, 2),  # trains with max_turns 2
    "tokens": ("max_new_tokens", "max_new_tokens", 3, 2),  # per attempt (SamplingOptions' default: 16)
    "answer_format": ("answer_format", "answer_format", "think_answer", "boxed"),
    "grading": ("grading", "grading", "exact", "math_verify"),
    "system_prompt": ("system_prompt", "system_prompt", "You check sums.", "You add numbers."),
    "instruction": ("instruction", "instruction", "Put the sum in the answer.", "Answer with one number."),
    "user_template": ("user_template", "user_template", "Sum: {question} -- {instruction}",
                      "{instruction} Question: {question}"),
    "feedback": ("feedback", "feedback", "Not yet; attempt {turn} next.", "Wrong, again."),
}
RUN = {option: run_value for option, (_, _, run_value, _) in OPTIONS.items()}
TRAINING = dict(temperature=1.0, top_p=1.0, max_turns=2)
PROBLEMS = [{"problem": "What is 2+3?", "solution": r"\boxed{5}"}, {"problem": "What is 4*4?", "solution": r"\boxed{16}"}]


@dataclass
class Batch:
    """One evaluation batch (nanoufo.evaluate's call of run_episodes): its environment, its shape, what it
    sampled and the (temperature, top_p) of each draw."""
    env: UFOEnv
    samples: int  # per problem: 1 for Succ@k, k for Pass@k
    graded: Graded | None = None
    draws: list[tuple[float, float]] = field(default_factory=list)


class Probe:
    """Records each evaluation batch and every draw of the sampler, a draw under the batch it belongs to
    (draws outside an evaluation, the training rollouts', apart)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.batches: list[Batch] = []
        self.training_draws: list[tuple[float, float]] = []
        self.open: Batch | None = None
        draw, run_episodes = decode.sample, evaluate.run_episodes

        def recording_draw(logits, temperature, top_p, seed, noise_ids):
            (self.open.draws if self.open else self.training_draws).append((temperature, top_p))
            return draw(logits, temperature, top_p, seed, noise_ids)

        def recording_run(model, env, problems, sampling, *args, n_samples_per_problem=1, **kwargs):
            self.open = batch = Batch(env, n_samples_per_problem)
            self.batches.append(batch)
            try:
                batch.graded = run_episodes(model, env, problems, sampling, *args,
                                            n_samples_per_problem=n_samples_per_problem, **kwargs)
            finally:
                self.open = None
            return batch.graded

        monkeypatch.setattr(decode, "sample", recording_draw)
        monkeypatch.setattr(evaluate, "run_episodes", recording_run)


def fill(template: str, **values) -> str:
    for name, value in values.items():
        template = template.replace(f"{{{name}}}", str(value))
    return template


def rows(batch: Batch, tokenizer):
    """Each episode's (question, prompt text, attempt lengths, feedback texts) as the sampler held them."""
    rollout = batch.graded.rollout
    for b, episode in enumerate(batch.graded.episodes):
        tokens, spans = rollout.tokens[b].tolist(), rollout.turn_spans[b]
        feedback = [tokenizer.decode(tokens[end:start]) for (_, end), (start, _) in zip(spans, spans[1:])]
        yield episode.problem.question, tokenizer.decode(tokens[:spans[0][0]]), [e - s for s, e in spans], feedback


def user_turn(prompt: str) -> str:
    return prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def check_temperature(batches, expected, tokenizer):
    draws = [d for batch in batches for d in batch.draws]
    assert draws and {t for t, _ in draws} == {expected["temperature"]}


def check_top_p(batches, expected, tokenizer):
    draws = [d for batch in batches for d in batch.draws]
    assert draws and {p for _, p in draws} == {expected["top_p"]}


def check_turns(batches, expected, tokenizer):
    """Succ@k: every episode makes k attempts (a random model never solves); Pass@k: k one-attempt samples."""
    k = expected["turns"]
    for batch in batches:
        turns = [e.turns for e in batch.graded.episodes]
        if batch.samples == 1:
            assert turns == [k] * len(turns)
        else:
            assert batch.samples == k and turns == [1] * len(turns)


def check_tokens(batches, expected, tokenizer):
    """Every attempt ends at the token limit, or earlier on a stop token (rare for a random model)."""
    lengths = [n for batch in batches for _, _, attempts, _ in rows(batch, tokenizer) for n in attempts]
    assert max(lengths) == expected["tokens"] >= min(lengths) > 0


def check_answer_format(batches, expected, tokenizer):
    """think_answer starts every attempt with a forced <think>, after the prompt and after each feedback turn."""
    start = "<|im_start|>assistant\n" + ("<think>" if expected["answer_format"] == "think_answer" else "")
    for batch in batches:
        for _, prompt, _, feedback in rows(batch, tokenizer):
            assert prompt.endswith(start) and all(text.endswith(start) for text in feedback), (prompt, feedback)


def check_grading(batches, expected, tokenizer):
    """The batch's environment grades \\frac{1}{2} against 0.5: equal under math_verify, not under exact."""
    for env in {id(batch.env): batch.env for batch in batches}.values():
        episode = Episode(Problem("What is 1/2?", "0.5", "probe"))
        env.step_batch([episode], [r"x</think><answer>\frac{1}{2}</answer> \boxed{\frac{1}{2}}"])
        assert episode.answers == [r"\frac{1}{2}"] and episode.correct == [expected["grading"] == "math_verify"]


def check_system_prompt(batches, expected, tokenizer):
    for batch in batches:
        for _, prompt, _, _ in rows(batch, tokenizer):
            assert prompt.startswith(f"<|im_start|>system\n{expected['system_prompt']}<|im_end|>\n"), prompt


def check_instruction(batches, expected, tokenizer):
    for batch in batches:
        for _, prompt, _, _ in rows(batch, tokenizer):
            assert expected["instruction"] in user_turn(prompt), prompt


def check_user_template(batches, expected, tokenizer):
    for batch in batches:
        for question, prompt, _, _ in rows(batch, tokenizer):
            filled = fill(expected["user_template"], question=question, instruction=expected["instruction"])
            assert user_turn(prompt) == filled, prompt


def check_feedback(batches, expected, tokenizer):
    """Each feedback turn is the user turn the option says, {turn} being the next attempt's number."""
    texts = [(j, text) for batch in batches for *_, feedback in rows(batch, tokenizer) for j, text in enumerate(feedback)]
    assert texts and all(f"<|im_start|>user\n{fill(expected['feedback'], turn=j + 2)}<|im_end|>" in text
                         for j, text in texts), texts


CHECKS = {option: globals()[f"check_{option}"] for option in OPTIONS}


@dataclass
class TrainRun:
    out_dir: Path
    probe: Probe


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, qwen_tokenizer) -> TrainRun:
    """train.py itself, in this process (a subprocess's draws cannot be recorded): two steps on a tiny random
    checkpoint with the Qwen2.5 vocabulary, evaluated at the start, after step 1 (eval_interval) and at the
    end, every evaluation option set to the run's value above."""
    root = tmp_path_factory.mktemp("eval_options")
    make_hf_model(vocab_size=len(qwen_tokenizer), **TINY_QWEN).save_pretrained(root / "init")
    data = root / "math.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS))
    options = [f"--{key}={RUN[option]}" for option, (key, *_) in OPTIONS.items()]
    argv = ["train.py", f"--init_from={root / 'init'}", f"--train_data={data}", f"--eval_data={data}",
            f"--out_dir={root / 'run'}", "--device=cpu", "--dtype=float32", "--tp=1", "--max_steps=2",
            "--eval_interval=1", "--ckpt_interval=0", "--problems_per_step=2", "--n_samples_per_problem=2",
            "--minibatch_size=2", "--ppo_epochs=1", "--n_eval_problems=2", *options,
            *(f"--{key}={value}" for key, value in TRAINING.items())]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch references (tests/conftest.py)
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(signal, "signal", lambda *args: None)  # train.py's Ctrl-C handler stays out of pytest
        monkeypatch.setattr(sys, "argv", argv)
        probe = Probe(monkeypatch)
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    return TrainRun(root / "run", probe)


def test_train_py_evaluates_at_the_start_each_interval_and_the_end_apart_from_its_training(train_run):
    """Three evaluations of Succ@k and Pass@k (one batch each: two problems); the training rollouts keep
    their own temperature, top-p and turns."""
    assert [batch.samples for batch in train_run.probe.batches] == [1, RUN["turns"]] * 3
    assert set(train_run.probe.training_draws) == {(TRAINING["temperature"], TRAINING["top_p"])}
    log = [json.loads(line) for line in (train_run.out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 1, 2]
    assert all(f"succ@{TRAINING['max_turns']}" in r for r in log if r["kind"] == "train")


@pytest.mark.parametrize("option", OPTIONS)
def test_train_py_evaluates_with_the_runs_option(train_run, qwen_tokenizer, option):
    CHECKS[option](train_run.probe.batches, RUN, qwen_tokenizer)


def sample_py(train_run: TrainRun, monkeypatch, capsys, *flags: str) -> tuple[Probe, str]:
    """sample.py on the run's out_dir (its latest checkpoint, with run_config.json): (what it did, its stdout)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    probe = Probe(monkeypatch)
    sample.main([f"--ckpt={train_run.out_dir}", *flags])
    return probe, capsys.readouterr().out


def printed_table(stdout: str) -> dict[str, float]:
    rows = [line.split() for line in stdout.split("math:\n", 1)[1].splitlines()]
    return {row[0]: math.nan if row[1] == "n/a" else float(row[1]) for row in rows if len(row) == 2}


def test_sample_py_on_a_run_evaluates_as_the_run_did(train_run, qwen_tokenizer, monkeypatch, capsys):
    """No flag: every option is the run's, and the table is the one train.py logged at its end."""
    probe, stdout = sample_py(train_run, monkeypatch, capsys)
    for option, check in CHECKS.items():
        check(probe.batches, RUN, qwen_tokenizer)
    assert all(f"{key}={value!r} (run)" in stdout for key, _, value, _ in OPTIONS.values())
    logged = [json.loads(line) for line in (train_run.out_dir / "log.jsonl").read_text().splitlines()][-1]
    table = printed_table(stdout)
    assert table.keys() >= {f"succ@{RUN['turns']}", "mean_turns"}
    for key, value in table.items():  # printed to 4 decimals; the log writes NaN as null
        logged_value = logged[f"eval/math/{key}"]
        assert value == pytest.approx(math.nan if logged_value is None else logged_value, abs=5e-5, nan_ok=True), key


@pytest.mark.parametrize("option", OPTIONS)
def test_sample_py_flag_replaces_the_runs_option_and_keeps_the_others(train_run, qwen_tokenizer, monkeypatch, capsys,
                                                                     option):
    _, flag, _, value = OPTIONS[option]
    probe, stdout = sample_py(train_run, monkeypatch, capsys, f"--{flag}={value}")
    expected = RUN | {option: value}
    for checked, check in CHECKS.items():
        check(probe.batches, expected, qwen_tokenizer)
    assert f"{OPTIONS[option][0]}={value!r} (flag)" in stdout
