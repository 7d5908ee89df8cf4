"""The training configuration: one typed dataclass of defaults, config files, command-line overrides.

    python train.py                                   # the built-in CPU demo (these defaults)
    python train.py config/ufo_qwen2.5_3b.py --max_steps=50 --actor_lr=2e-6
    python train.py --help                            # every key with its default, section by section

TrainConfig inherits the option classes the library reads (nanoufo/options.py: EnvOptions, SamplingOptions,
UpdateOptions), so each of their keys is declared once, with its default; the fields below are the run's own.
A config file is a small Python file that assigns known keys (`max_turns = 5`); it is run with runpy and every
name it defines is checked against the fields. Command-line values are converted with the field's type.
Unknown keys, wrong types and impossible combinations fail before any work starts. train.py saves the run's
config with every checkpoint (run_config.json), so that sample.py evaluates a trained model as train.py did.
Tests: python -m pytest -q tests/test_config.py
"""
import ast
import dataclasses
import difflib
import json
import math
import runpy
import types
from dataclasses import dataclass
from pathlib import Path

from nanoufo.options import (PRM_AGGREGATES, EnvOptions, LossOptions, SamplingOptions, UpdateOptions,
                             check_env_options, check_sampling_options, check_update_options)
from nanoufo.schedule import SCHEDULES as LR_SCHEDULES

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
LOG_SINKS = ("jsonl", "tensorboard", "wandb")  # where a run's metrics go (nanoufo/logger.py)
VALUE_HEAD_INITS = ("zero", "normal")  # the critic's value head where its checkpoint has none (nanoufo/weights.py)
CHOICES = dict(lr_schedule=LR_SCHEDULES, device=DEVICES, dtype=DTYPES, prm_aggregate=PRM_AGGREGATES,
               critic_head_init=VALUE_HEAD_INITS)


@dataclass
class TrainConfig(EnvOptions, SamplingOptions, UpdateOptions):
    """A run: the library's options (inherited) and the run's own keys. The defaults are the built-in demo's."""
    # run
    out_dir: str = "out/demo"
    resume: bool = False
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"
    tp: int = 2  # tensor-parallel ranks per group under torchrun (1 for a single process); DP = world / tp
    # model, tokenizer, data ("" and "demo" mean the built-in tiny model, char tokenizer and synthetic task)
    init_from: str = ""  # HF checkpoint directory; "" = the demo's tiny model with a supervised warm-up
    tokenizer: str = ""  # tokenizer directory; "" = the checkpoint's own, else the bundled Qwen2.5 one
    # the critic's scalar head (its trunk is init_from's): "zero", or "normal": weights N(0, initializer_range) drawn
    # with the run's seed and a zero bias, as transformers initialises verl's token-classification critic head
    critic_head_init: str = "zero"
    train_data: str = "demo"  # "demo", or a jsonl/parquet file or HF dataset for nanoufo.data.load_problems
    train_format: str = "auto"  # row format for load_problems (e.g. "metamath", "gsm8k", "math")
    train_question_key: str = ""  # the data's field names where they differ from the format's ("" = the format's)
    train_answer_key: str = ""
    eval_data: str = "demo"  # comma-separated for several sets ("math500,gsm8k"), each logged as eval/<name>/...
    eval_format: str = "auto"  # these three: one value for every eval set, or one per set, comma-separated
    eval_question_key: str = ""
    eval_answer_key: str = ""
    n_eval_problems: int = 200  # 0 = the whole eval set
    instruction: str = "auto"  # the user turn's {instruction}; "auto": the task's (none for the demo, else \\boxed{})
    system_prompt: str = "auto"  # "auto": the chat template's own default system message (Qwen's), if any
    warmup_steps: int = 2500  # demo only: supervised steps before RL when init_from is ""
    warmup_lr: float = 3e-3
    # rollouts and evaluation
    problems_per_step: int = 32  # questions sampled per step, before the group filter
    n_samples_per_problem: int = 4  # episodes per question (the group)
    eval_temperature: float = 0.5  # held-out evaluations sample with these, not temperature and top_p; 0: greedy
    eval_top_p: float = 1.0
    eval_k: int = 5  # attempts of a held-out episode (Succ@k), and samples of Pass@k
    max_prompt_tokens: int = 512  # longer prompts are skipped; with the attempts it bounds the sampler's max_len
    eval_seeds: int = 0  # evaluations per held-out set (seeds seed, seed+1, ...), reported as mean and spread;
    # 0 = 4 for the demo (a second each), 1 for a dataset
    # process reward model (reward = "prm")
    prm: str = ""  # a process reward model directory (Qwen2.5-Math-PRM layout, with its tokenizer)
    prm_aggregate: str = "min"  # an attempt's PRM score from its steps' scores: "min" or "product"
    prm_gold_weight: float = 0.0  # reward = (1 - w) * PRM score (mean over attempts) + w * gold reward
    # your own reward instead of the environment's: "file.py:function" or "module:function", given each graded
    # nanoufo.env.Episode, returning its reward or one per attempt (nanoufo.task.load_reward)
    reward_fn: str = ""
    # optimizer
    actor_lr: float = 5e-4
    critic_lr: float = 1e-3
    lr_schedule: str = "constant"  # after the warm-up: "constant" or "cosine" (towards min_lr_ratio * lr at max_steps)
    lr_warmup_ratio: float = 0.0  # linear warm-up from 0 over int(ratio x the schedule's steps) steps, as verl's
    min_lr_ratio: float = 0.0
    lr_schedule_steps: int = 0  # the steps the schedule spans; 0 = max_steps (set it to extend a run unchanged)
    weight_decay: float = 0.0
    # memory (nanoufo/plan.py predicts the peak per GPU from these and refuses a config that cannot fit)
    gpu_mem_gib: float = 0.0  # the memory plan's budget per GPU; 0 = the device's own (no check on the CPU)
    # loop and logging
    max_steps: int = 250
    eval_interval: int = 0  # 0 = only at the start and the end
    ckpt_interval: int = 20  # 0 = only at the end (and on Ctrl-C / SIGTERM)
    plot_interval: int = 0  # steps between plot refreshes; 0 = only at the end
    max_bad_steps: int = 3  # consecutive non-finite updates before the run aborts
    log_to: str = "jsonl"  # comma-separated: jsonl (always, with the PNG plot), tensorboard, wandb
    wandb_project: str = "nanoufo"  # log_to=wandb; WANDB_MODE=offline works without internet

    def __post_init__(self):  # each option class's own checks; the run's combinations are validate()'s
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"config: {key}=nan is not a number")
        check_env_options(self)
        check_sampling_options(self)
        check_update_options(self)

    @property
    def batch_episodes(self) -> int:
        groups = self.keep_groups or self.problems_per_step
        return groups * self.n_samples_per_problem

    @property
    def is_demo(self) -> bool:
        return self.train_data == "demo"

    @property
    def evaluation_seeds(self) -> list[int]:
        """The sampling seeds of each held-out evaluation (eval_seeds of them, from seed on)."""
        return [self.seed + i for i in range(self.eval_seeds or (4 if self.is_demo else 1))]

    def env_options(self, task_instruction: str, evaluation: bool = False) -> EnvOptions:
        """The environment of training (max_turns attempts) or of held-out evaluation (eval_k attempts);
        task_instruction stands for instruction "auto" (nanoufo.task.Task.instruction)."""
        return options_of(EnvOptions, self, max_turns=self.eval_k if evaluation else self.max_turns,
                          instruction=task_instruction if self.instruction == "auto" else self.instruction,
                          system_prompt=None if self.system_prompt == "auto" else self.system_prompt)

    def sampling(self, evaluation: bool = False) -> SamplingOptions:
        """The rollouts' sampling, or the held-out evaluations' (eval_temperature, eval_top_p, and eager: each
        evaluation batch has its own seed, which a CUDA graph would hold)."""
        if not evaluation:
            return options_of(SamplingOptions, self)
        return options_of(SamplingOptions, self, temperature=self.eval_temperature, top_p=self.eval_top_p,
                          cuda_graphs="false")

    def update_options(self) -> UpdateOptions:
        return options_of(UpdateOptions, self)


def options_of(cls: type, cfg: TrainConfig, **replaced):
    """An option class (EnvOptions, SamplingOptions, UpdateOptions) as the run sets it: each field from the
    config key of the same name, the ones in `replaced` replaced."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)} | replaced)


def _close(name: str) -> str:
    matches = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(TrainConfig)], n=3)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def _field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}


def parse_value(key: str, text: str, source: str):
    """Convert a command-line string to the type of field `key`."""
    kind = _field_types()[key]
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{source}: --{key}={text!r} is not a boolean (use true or false)")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{source}: --{key}={text!r} is not a valid {kind.__name__}") from None


def check_value(key: str, value, source: str):
    """Type-check a value assigned in a config file; ints are accepted for float fields."""
    kind = _field_types()[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise TypeError(f"{source}: {key} = {value!r} has type {type(value).__name__}, expected {kind.__name__}")
    return value


def read_config_file(path: str) -> dict:
    """The known keys assigned in a Python config file (modules, functions and _private names ignored)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    known = _field_types()
    values = {}
    for name, value in runpy.run_path(path).items():
        if name.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if name not in known:
            raise KeyError(f"{path}: unknown config key {name!r}{_close(name)}")
        values[name] = check_value(name, value, path)
    return values


def help_text(argv: list[str], script_doc: str) -> str:
    """--help: the script's docstring, then the docstring of each config file named in argv (the paper configs'
    tables: each setting, its reference value and source, and where this config departs from it), then every
    key with the value it takes (the defaults, those files and the other flags applied), part by part."""
    docs = [script_doc.strip()]
    files = [arg for arg in argv if not arg.startswith("-")]
    for path in files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        docs.append(f"{path}:\n{ast.get_docstring(ast.parse(Path(path).read_text())) or '(no docstring)'}")
    cfg = parse_args(argv, check_paths=False)
    docs.append(f"every key, as {' '.join(argv) or 'the defaults'} set it (--key=value to change one):\n"
                + format_config(cfg))
    return "\n\n".join(docs + [PER_ALGORITHM])


PER_ALGORITHM = """per algorithm: algorithm='grpo' changes how advantages are made (group-normalised scores, no critic); the
loss keys keep the values above, which are UFO's PPO's (clip_high 0.28, dual_clip 3.0, entropy_coef 0.001, kl_coef
0.001 as k1 in the reward). Plain GRPO (DeepSeekMath's loss) is --algorithm=grpo --clip_high=0.2 --dual_clip=0
--entropy_coef=0 --kl_in=loss --kl_estimator=k3 (--kl_coef=0: no KL and no reference model); Intuitor's is
config/intuitor_qwen2.5_3b.py. A KL coefficient above 0 loads a frozen reference model."""


def parse_args(argv: list[str], check_paths: bool = True) -> TrainConfig:
    """TrainConfig from `[config.py ...] [--key=value ...]`: files first, then overrides, left to right.
    check_paths=False skips the existence checks of checkpoint and data paths (the memory planner)."""
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            values.update(read_config_file(arg))
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in _field_types():
            raise KeyError(f"command line: unknown config key {key!r}{_close(key)}")
        if not eq:
            if _field_types()[key] is not bool:
                raise ValueError(f"command line: --{key} needs a value (--{key}=...)")
            text = "true"
        values[key] = parse_value(key, text, "command line")
    cfg = TrainConfig(**values)
    validate(cfg, check_paths)
    return cfg


def validate(cfg: TrainConfig, check_paths: bool = True) -> None:
    """Reject impossible settings before any model is loaded: the run's combinations (the option classes' own
    checks ran when cfg was made, TrainConfig.__post_init__)."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config: {key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    sinks = cfg.log_to.split(",")
    if not set(sinks) <= set(LOG_SINKS) or "jsonl" not in sinks:
        raise ValueError(f"config: log_to={cfg.log_to!r} must list jsonl and any of {', '.join(LOG_SINKS[1:])}, "
                         "comma-separated")
    if cfg.dtype == "float16":  # fp16 gradients underflow and overflow without dynamic loss scaling
        raise ValueError("config: dtype='float16' cannot train (no loss scaling); use bfloat16 or float32 "
                         "(sample.py --dtype=float16 still samples and evaluates in float16)")
    for key in ("tp", "problems_per_step", "n_samples_per_problem", "max_prompt_tokens", "eval_k", "max_steps",
                "max_bad_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config: {key}={getattr(cfg, key)} must be at least 1")
    for key in ("actor_lr", "critic_lr", "warmup_lr", "gpu_mem_gib", "eval_seeds", "lr_schedule_steps"):
        if not 0 <= getattr(cfg, key) < math.inf:  # an infinite rate would make Adam write inf/NaN weights
            raise ValueError(f"config: {key}={getattr(cfg, key)} must be a finite number >= 0")
    for key in ("lr_warmup_ratio", "min_lr_ratio", "prm_gold_weight"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"config: {key}={getattr(cfg, key)} must be in [0, 1]")
    if 0 < cfg.micro_batch_tokens < cfg.max_turns * cfg.max_new_tokens:
        raise ValueError(f"config: micro_batch_tokens={cfg.micro_batch_tokens} is smaller than an episode's "
                         f"attempts alone (max_turns x max_new_tokens = {cfg.max_turns * cfg.max_new_tokens}); "
                         f"a micro-batch must hold the longest episode")
    if cfg.keep_groups > cfg.problems_per_step:
        raise ValueError(f"config: keep_groups={cfg.keep_groups} must be between 0 and "
                         f"problems_per_step={cfg.problems_per_step}")
    if cfg.batch_episodes % cfg.minibatch_size:
        raise ValueError(f"config: the batch of {cfg.batch_episodes} episodes (kept groups x "
                         f"n_samples_per_problem) is not divisible by minibatch_size={cfg.minibatch_size}")
    if cfg.algorithm == "grpo" and cfg.n_samples_per_problem < 2:
        raise ValueError("config: algorithm='grpo' normalizes within groups; n_samples_per_problem must be >= 2")
    if not (0.0 < cfg.temperature and 0.0 <= cfg.eval_temperature and 0.0 < cfg.eval_top_p <= 1.0):
        raise ValueError("config: temperature must be > 0, eval_temperature >= 0 (0: greedy) and "
                         "eval_top_p in (0, 1]")
    if cfg.reward_fn and cfg.reward == "self_certainty":
        raise ValueError("config: reward_fn replaces the environment's reward; reward='self_certainty' reads none "
                         "(use reward='gold', or 'prm' whose gold part it replaces)")
    if cfg.reward == "prm" and not cfg.prm:
        raise ValueError("config: reward='prm' needs prm=<process reward model directory>")
    if (cfg.train_data == "demo") != (cfg.eval_data == "demo"):
        raise ValueError("config: train_data and eval_data must both be 'demo' or both be datasets")
    if cfg.is_demo and cfg.tokenizer:
        raise ValueError("config: the demo task uses its own character tokenizer; leave tokenizer empty")
    if not cfg.is_demo and not cfg.init_from:
        raise ValueError("config: a dataset run needs init_from=<HF checkpoint directory>")
    if not check_paths:
        return
    for key in ("init_from", "tokenizer", "prm"):
        path = getattr(cfg, key)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"config: {key}={path!r}: directory not found")
    reward_file = cfg.reward_fn.rpartition(":")[0]
    if reward_file.endswith(".py") and not Path(reward_file).is_file():
        raise FileNotFoundError(f"config: reward_fn={cfg.reward_fn!r}: {reward_file} not found")
    for key, path in [("train_data", cfg.train_data)] + [("eval_data", s.source) for s in eval_sets(cfg)]:
        looks_local = path.endswith((".jsonl", ".json", ".parquet")) or path.startswith((".", "/"))
        if path != "demo" and looks_local and not Path(path).exists():
            raise FileNotFoundError(f"config: {key}={path!r}: file not found")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set of a run: its name in logs (eval/<name>/...), where it is read from, and how."""
    name: str
    source: str
    format: str
    question_key: str
    answer_key: str


def _per_set(cfg: TrainConfig, key: str, n: int) -> list[str]:
    values = [v.strip() for v in getattr(cfg, key).split(",")]
    if len(values) not in (1, n):
        raise ValueError(f"config: {key}={getattr(cfg, key)!r} has {len(values)} values for {n} eval sets "
                         "(give one for all, or one per set)")
    return values * n if len(values) == 1 else values


def _set_name(entry: str, bundled: dict) -> str:
    """A bundled set's own name, else the file's stem, or its directory's name for a split file (test.jsonl)."""
    if entry in bundled:
        return entry
    path = Path(entry)
    return path.parent.name if path.stem in ("train", "test", "validation") and path.parent.name else path.stem


def eval_sets(cfg: TrainConfig) -> list[EvalSet]:
    """cfg.eval_data's comma-separated sets; a bundled name (math500, gsm8k) reads the bundled file."""
    from nanoufo.data import DEFAULT_EVAL_SETS  # here: the data readers need not load to check a config
    entries = [e.strip() for e in cfg.eval_data.split(",")]
    if not all(entries):
        raise ValueError(f"config: eval_data={cfg.eval_data!r} has an empty entry")
    formats, questions, answers = (_per_set(cfg, key, len(entries))
                                   for key in ("eval_format", "eval_question_key", "eval_answer_key"))
    sets, names = [], set()
    for entry, format, question_key, answer_key in zip(entries, formats, questions, answers):
        name = base = _set_name(entry, DEFAULT_EVAL_SETS)
        for n in range(2, len(entries) + 2):  # two files with the same stem get distinct names
            if name not in names:
                break
            name = f"{base}_{n}"
        names.add(name)
        sets.append(EvalSet(name, str(DEFAULT_EVAL_SETS.get(entry, entry)), format, question_key, answer_key))
    return sets


def load_run_config(path: str | Path) -> TrainConfig:
    """A run's config as train.py saved it (config.json in out_dir, run_config.json in each checkpoint); a key
    this version does not know, or a value it refuses, is a ValueError naming the file."""
    try:
        values = json.loads(Path(path).read_text())
        unknown = sorted(set(values) - set(_field_types()))
        if unknown:
            raise ValueError(f"unknown keys {', '.join(unknown)} (a newer or older nanoufo wrote it)")
        return TrainConfig(**values)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a run config this nanoufo can read: {error}") from None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def format_config(cfg: TrainConfig) -> str:
    """Every key and its value, part by part: the options of nanoufo/options.py, then the run's own."""
    parts = [(cls.__name__, [f.name for f in dataclasses.fields(cls)]) for cls in TrainConfig.__mro__[1:]
             if dataclasses.is_dataclass(cls) and cls not in (LossOptions,)]
    listed = {name for _, names in parts for name in names}
    parts.append(("the run", [f.name for f in dataclasses.fields(TrainConfig) if f.name not in listed]))
    return "\n".join(f"  {title}:\n" + "\n".join(f"    {k} = {getattr(cfg, k)!r}" for k in names)
                     for title, names in parts)
