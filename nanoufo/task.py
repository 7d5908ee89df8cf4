"""What a run learns from and is evaluated on: a tokenizer, training problems, held-out sets, and how the
task reads answers. The scripts choose the task (a data set's, load_task; the built-in demo's, nanoufo/demo.py)
and hand it to the library, so nothing in nanoufo/ imports the demo.

    task = load_task(cfg, context=32768)            # train.py on a data set run (sample.py: train=False)
    env = task.env(cfg)                             # training episodes: max_turns attempts
    eval_env = task.env(cfg, evaluation=True)       # held-out episodes: eval_k attempts

A data set that cannot be read raises ValueError (or FileNotFoundError) with the one line a script prints:
the file, the columns found and the --train_* / --eval_* flag to set.
Tests: python -m pytest -q tests/test_train_cli.py tests/test_sample_cli.py
"""
import importlib
import json
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanoufo.config import TrainConfig, eval_sets
from nanoufo.data import Problem, error_line, load_problems
from nanoufo.env import Episode, UFOEnv
from nanoufo.options import BOXED_INSTRUCTION
from nanoufo.tokenizer import load_tokenizer


@dataclass
class Task:
    tokenizer: object  # a transformers tokenizer with the Qwen chat template
    train: list[Problem]
    evals: dict[str, list[Problem]]  # held-out sets by name (eval/<name>/... in the logs)
    instruction: str = BOXED_INSTRUCTION  # what instruction "auto" stands for
    accepts: Callable[[Problem, str, str], bool] | None = None  # UFOEnv's: which answers the task can accept
    generation_eos_ids: tuple[int, ...] = ()  # the checkpoint's generation_config.json eos ids (stop_tokens)

    def env(self, cfg: TrainConfig, evaluation: bool = False) -> UFOEnv:
        """The run's training environment, or its held-out one (eval_k attempts), with cfg.reward_fn's reward."""
        reward = load_reward(cfg.reward_fn) if cfg.reward_fn else None
        return UFOEnv(self.tokenizer, cfg.env_options(self.instruction, evaluation), self.accepts, reward,
                      self.generation_eos_ids)


def load_reward(spec: str) -> Callable[[Episode], float | list[float]]:
    """The reward function a run names: "path/to/file.py:function" or "package.module:function" (it gets an
    nanoufo.env.Episode and returns its reward, or one per attempt). ValueError naming what is missing."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"config: reward_fn={spec!r}: write it as file.py:function or module:function")
    try:
        module = (runpy.run_path(where) if where.endswith(".py") else vars(importlib.import_module(where)))
    except (OSError, ImportError) as error:
        raise ValueError(f"config: reward_fn={spec!r}: cannot load {where}: {error}") from None
    if not callable(module.get(name)):
        raise ValueError(f"config: reward_fn={spec!r}: {where} defines no function {name!r}")
    return module[name]


def run_tokenizer(cfg: TrainConfig):
    """The run's tokenizer: cfg.tokenizer, else init_from's own, else the bundled Qwen2.5 one."""
    has_own = cfg.init_from and (Path(cfg.init_from) / "tokenizer_config.json").is_file()
    return load_tokenizer(cfg.tokenizer or (cfg.init_from if has_own else None))


def generation_eos_ids(checkpoint: str | Path) -> tuple[int, ...]:
    """eos_token_id of the checkpoint's generation_config.json (an id or a list of ids; () without the file or
    the key): with the tokenizer's eos, where vLLM ends a response (verl's rollouts name no stop tokens)."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        ids = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path}: not a JSON object ({error})") from None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else ids
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{path}: eos_token_id {ids!r} is not a token id or a list of them")
    return tuple(ids)


def load_task(cfg: TrainConfig, context: int, train: bool = True, report: Callable[[str], None] = print,
              flag: Callable[[str, str], str] = lambda kind, key: f"--{kind}_{key}") -> Task:
    """A data set run's task: the training problems (train=False: none) and every held-out set of
    cfg.eval_data. Problems whose prompt leaves no room for one whole attempt in the model's `context`, and
    training problems whose prompt is longer than max_prompt_tokens (as verl's filter_overlong_prompts drops
    them), are skipped and counted here (report gets one line per set), so the sampler never meets them; a
    held-out set keeps every problem that fits the context (MATH500's 500 stay 500 with a 512-token limit).
    Under stop_tokens "generation_config" the eos ids come from init_from's generation_config.json (report
    says which). An error names the script's flags: flag(kind, key), kind "train" or "eval", key "data",
    "format", "question_key", ..."""
    eos_ids = generation_eos_ids(cfg.init_from) if cfg.stop_tokens == "generation_config" else ()
    task = Task(run_tokenizer(cfg), [], {}, generation_eos_ids=eos_ids)
    prompts = task.env(cfg)  # the prompts' chat template
    if cfg.stop_tokens == "generation_config":
        report(f"an attempt ends at {task.tokenizer.convert_ids_to_tokens(prompts.stop_ids)} (stop_tokens="
               f"generation_config: the tokenizer's eos and {Path(cfg.init_from) / 'generation_config.json'}'s "
               f"eos_token_id {list(eos_ids) or 'none'})")
    fits_context = (context - cfg.max_new_tokens, f"max_position_embeddings {context} - max_new_tokens")

    def read(kind: str, source: str, format: str, question_key: str, answer_key: str, **options) -> list[Problem]:
        try:
            problems, skipped = load_problems(source, format, question_key=question_key or None,
                                              answer_key=answer_key or None, **options)
        except (OSError, ValueError) as error:
            message = error_line(error, lambda key: f"{flag(kind, key)}=")
            raise ValueError(f"{flag(kind, 'data')}: {message}") from None
        report(f"{source}: {len(problems)} {kind} problems ({skipped} rows skipped)")
        if not problems:
            raise ValueError(f"{source}: no usable problems (every row lacks a question"
                             + (" or a parsable answer)" if options.get("need_answers", True) else ")"))
        limit, why = fits_context if kind == "eval" else min((cfg.max_prompt_tokens, "max_prompt_tokens"), fits_context)
        kept = [p for p, fits in zip(problems, prompts.prompts_fit([p.question for p in problems], limit)) if fits]
        if len(kept) < len(problems):
            report(f"{source}: skipped {len(problems) - len(kept)} problems whose prompt is longer than {limit} "
                   f"tokens ({why})")
        if not kept:
            raise ValueError(f"{source}: no problem fits the model's context")
        return kept

    if train:  # label-free training (self-certainty) needs only questions; evaluation always needs gold answers
        task.train = read("train", cfg.train_data, cfg.train_format, cfg.train_question_key, cfg.train_answer_key,
                          need_answers=cfg.reward != "self_certainty")
    task.evals = {s.name: read("eval", s.source, s.format, s.question_key, s.answer_key, split="test",
                               limit=cfg.n_eval_problems or None) for s in eval_sets(cfg)}
    return task
