"""Evaluate a checkpoint: multi-turn Succ@k, the Pass@k baseline, Best-of-N with a process reward model,
ProcessBench, or a chat where you play the environment.

    python sample.py --ckpt=out/ufo_qwen2.5_3b                       # a run's latest checkpoint, as the run evaluated
    python sample.py --ckpt=out/ufo_qwen2.5_3b/ckpt-200 --temperature=0   # the same, one setting changed
    python sample.py --ckpt=Qwen2.5-3B-Instruct                      # Succ@5 on the bundled GSM8K test set
    python sample.py --ckpt=Qwen2.5-3B-Instruct --data=math500 --limit=100 --k=5 --out=eval.jsonl
    python sample.py --ckpt=Qwen2.5-3B-Instruct --mode=passk --k=5   # 5 independent single-turn samples
    python sample.py --ckpt=out/ufo_qwen2.5_3b --mode=chat           # you type "Try again.", /new <q>, /quit
    python sample.py --ckpt=Qwen2.5-Math-1.5B-Instruct --mode=bon --prm=Qwen2.5-Math-PRM-7B --k=8 --data=gsm8k,math500
                                          # Pass@1, Pass@8, Maj@8 and RM@8 (Best-of-8 by the PRM) on both sets
    python sample.py --mode=processbench --prm=Qwen2.5-Math-PRM-7B --data=ProcessBench/ --threshold=0.5
                                          # per subset (gsm8k, math, olympiadbench, omnimath) and their mean F1
    python sample.py --tiny                                          # no checkpoint: a tiny random model
    python sample.py --ckpt=Qwen2.5-3B-Instruct --data=mine.jsonl --question_key=prompt --answer_key=solution

--ckpt names a training run's out_dir (its latest checkpoint), one checkpoint (ckpt-<step>, or its actor/), or
a plain Hugging Face directory. A training checkpoint holds its run's config (run_config.json): the evaluation
then reads the run's held-out sets, prompts, answer format, grading, feedback, turns (eval_k), tokens per
attempt, evaluation temperature, top-p and seeds, as train.py's evaluation did, and each flag given replaces
one of them; one line says where each setting came from. A plain checkpoint starts from the defaults below
(bundled GSM8K, 5 turns, 1024 tokens, temperature 0.5, seed 0). Flags are spelled --key=value as in train.py
(--max_new_tokens and --max-new-tokens both work). A data file that cannot be read ends with one line naming
the file, the columns found and the flag to set (exit status 2).

The tokenizer is the checkpoint's own when it has one, else the run's (or the bundled Qwen2.5 tokenizer).
CUDA + bf16 when available (a run's checkpoint: the run's dtype), else CPU + fp32. The chat is nanoufo/chat.py
(one KV cache per conversation). A ProcessBench file has one JSON row per line (or a .json list) with problem,
steps (a list of strings) and label (the index of the earliest wrong step, -1 if none); rows that do not fit
are skipped, named and counted; rows too long for the PRM are counted as wrong. --data may name several sets,
separated by commas; for --mode=processbench also a directory of the four subsets (gsm8k.jsonl, math.jsonl,
olympiadbench.jsonl, omnimath.jsonl), reported each and then by their mean F1 (the paper's "Avg.").
Tests: python -m pytest -q tests/test_sample_cli.py tests/test_prm_eval.py
"""
import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from nanoufo import demo
from nanoufo.chat import chat
from nanoufo.checkpoint import find_checkpoint
from nanoufo.config import TrainConfig, load_run_config
from nanoufo.data import DEFAULT_EVAL_SETS, FORMATS
from nanoufo.evaluate import best_of_n, evaluate, mean_and_spread, write_episodes
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.options import ANSWER_FORMATS, GRADINGS, PRM_AGGREGATES
from nanoufo.prm import PRMScorer, evaluate_processbench, load_processbench, mean_f1, processbench_files
from nanoufo.task import Task, load_task
from nanoufo.tokenizer import load_tokenizer
from nanoufo.weights import load_model

COUNTS = ("episodes", "problems", "samples", "erroneous", "unscored")  # printed as whole numbers
# flag -> the run config key it replaces; a flag left out keeps the run's value (or PLAIN's)
SETTINGS = dict(data="eval_data", format="eval_format", question_key="eval_question_key",
                answer_key="eval_answer_key", limit="n_eval_problems", k="eval_k", temperature="eval_temperature",
                top_p="eval_top_p", max_new_tokens="max_new_tokens", feedback="feedback", instruction="instruction",
                system_prompt="system_prompt", user_template="user_template", answer_format="answer_format",
                grading="grading", seed="seed")
SHOWN = ("eval_k", "max_new_tokens", "eval_temperature", "eval_top_p", "answer_format", "grading", "feedback",
         "instruction", "system_prompt", "user_template")  # in the settings line (the sets are reported as read)
# a plain Hugging Face checkpoint's evaluation, where no run says otherwise
PLAIN = dict(eval_data="gsm8k", n_eval_problems=0, eval_k=5, eval_temperature=0.5, eval_top_p=1.0,
             max_new_tokens=1024, seed=0, eval_seeds=1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a training run's out_dir or checkpoint, or a Hugging Face checkpoint directory")
    p.add_argument("--tiny", action="store_true", help="no checkpoint: a tiny random Qwen2 with the bundled tokenizer")
    p.add_argument("--mode", choices=("eval", "passk", "chat", "bon", "processbench"), default="eval")
    p.add_argument("--data", help=f"a bundled set ({', '.join(DEFAULT_EVAL_SETS)}), a file or a hub name; "
                                  "several separated by commas")
    p.add_argument("--split", default="test", help="split of a hub data set")
    p.add_argument("--format", choices=("auto", *FORMATS), help="the data's row format")
    p.add_argument("--question_key", "--question-key", help="the data's question field, if not the format's")
    p.add_argument("--answer_key", "--answer-key", help="the data's gold answer field, if not the format's")
    p.add_argument("--limit", type=int, help="evaluate the first N problems of each set only (--tiny: 4)")
    p.add_argument("--k", type=int, help="turns per episode (eval) or samples per problem (passk, bon)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", "--top-p", type=float)
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, help="per attempt (--tiny: 32)")
    p.add_argument("--feedback", help="the user turn after a wrong attempt")
    p.add_argument("--instruction", help="the user turn's {instruction}")
    p.add_argument("--system_prompt", "--system-prompt", help="the system message ('auto': the template's)")
    p.add_argument("--user_template", "--user-template", help="the user turn: {question}, {instruction}, ...")
    p.add_argument("--answer_format", "--answer-format", choices=ANSWER_FORMATS)
    p.add_argument("--grading", choices=GRADINGS)
    p.add_argument("--seed", type=int, help="one evaluation with this sampling seed (default: the run's seeds)")
    p.add_argument("--prm", help="process reward model directory (Qwen2.5-Math-PRM layout, with its tokenizer)")
    p.add_argument("--prm_aggregate", "--prm-aggregate", choices=PRM_AGGREGATES, default="min",
                   help="bon: a response's score from its steps'")
    p.add_argument("--threshold", type=float, default=0.5, help="processbench: a step scored below it is wrong")
    p.add_argument("--max_len", "--max-len", type=int, default=8192,
                   help="chat mode: the context limit of a conversation")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64, help="episodes sampled together")
    p.add_argument("--out", help="write one JSON line per episode here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    if not args.ckpt and not args.tiny and args.mode != "processbench":
        p.error("give --ckpt=DIR (or --tiny for a random test model)")
    if args.mode in ("bon", "processbench") and not args.prm:
        p.error(f"--mode={args.mode} needs --prm=DIR, a process reward model checkpoint")
    if args.mode == "processbench" and (args.data is None or args.data in DEFAULT_EVAL_SETS):
        p.error("--mode=processbench reads local ProcessBench files: --data=DIR (the four subsets), "
                "--data=FILE.jsonl or --data=A.jsonl,B.jsonl")
    if args.tiny:  # a smoke run: a few short episodes unless asked otherwise
        args.limit, args.max_new_tokens = args.limit or 4, args.max_new_tokens or 32
    if (args.k is not None and args.k < 1) or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        p.error("--k and --max_new_tokens must be at least 1")  # the boundary: the library below only asserts
    return args


def settings(args: argparse.Namespace, run: TrainConfig | None, model_dir: str) -> tuple[TrainConfig, str]:
    """The evaluation's config: the run's (or PLAIN's for a plain checkpoint), each flag given replacing its
    key; and one line saying where each setting came from."""
    base = run or TrainConfig(init_from=model_dir or "(tiny)", train_data="gsm8k", **PLAIN)
    given = {key: getattr(args, flag) for flag, key in SETTINGS.items() if getattr(args, flag) is not None}
    if "seed" in given:
        given["eval_seeds"] = 1
    try:
        cfg = dataclasses.replace(base, **given)
    except (ValueError, TypeError) as error:
        user_error(error)
    source = lambda key: "flag" if key in given else "run" if run else "default"  # noqa: E731
    line = ", ".join(f"{key}={_short(getattr(cfg, key))} ({source(key)})" for key in SHOWN)
    return cfg, f"evaluation settings: {line}, seeds={cfg.evaluation_seeds} ({source('seed')})"


def _short(value, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 4] + "...'"


def load(args: argparse.Namespace) -> tuple[Qwen2, TrainConfig | None, str]:
    """(model, the run's config or None, the model directory) from --ckpt, or a tiny random model for --tiny."""
    if args.tiny:
        tokenizer = load_tokenizer()
        config = QwenConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = Qwen2(config).to(args.device, _dtype(args, None))
        model.init_weights(torch.Generator(args.device).manual_seed(args.seed or 0))
        return model.eval(), None, ""
    try:
        model_dir, run_config = find_checkpoint(args.ckpt)
        run = load_run_config(run_config) if run_config else None
        return load_model(model_dir, device=args.device, dtype=_dtype(args, run)).eval(), run, str(model_dir)
    except (ValueError, FileNotFoundError) as error:
        user_error(error)


def _dtype(args: argparse.Namespace, run: TrainConfig | None) -> torch.dtype:
    default = run.dtype if run else "bfloat16" if args.device.startswith("cuda") else "float32"
    return getattr(torch, args.dtype or default)


def task_of(cfg: TrainConfig, model: Qwen2, model_dir: str, args: argparse.Namespace) -> Task:
    """The held-out sets and tokenizer: the demo's for a demo run, else the data sets of cfg.eval_data (prompts
    too long for the model skipped as train.py skips them); the checkpoint's own tokenizer where it has one."""
    if cfg.is_demo:
        return demo.demo_task(cfg)
    if model_dir and (Path(model_dir) / "tokenizer_config.json").is_file():
        cfg = dataclasses.replace(cfg, tokenizer=model_dir)
    try:
        return load_task(cfg, model.config.max_position_embeddings, train=False, flag=lambda kind, key: f"--{key}")
    except (ValueError, FileNotFoundError) as error:
        user_error(error, prefix="")  # the line names the flag to set


def run_eval(model: Qwen2, task: Task, cfg: TrainConfig, args: argparse.Namespace) -> None:
    """Succ@k (or Pass@k) on each held-out set, the mean over the evaluation seeds with its spread (_sd), as
    train.py's evaluation computes it."""
    env, sampling = task.env(cfg, evaluation=True), cfg.sampling(evaluation=True)
    mode = "succ" if args.mode == "eval" else "pass"
    runs = [(name, seed) for name in task.evals for seed in cfg.evaluation_seeds]
    for name, problems in task.evals.items():
        tables = []
        for seed in cfg.evaluation_seeds:
            out = args.out if not args.out or len(runs) == 1 else f"{args.out}.{name}.seed{seed}.jsonl"
            tables.append(evaluate(model, env, problems, sampling, k=cfg.eval_k, mode=mode, out=out,
                                   batch_size=args.batch_size, seed=seed, tokenizer=task.tokenizer))
            if out:
                print(f"episodes written to {out}")
        print(f"{name}:")
        print_table(mean_and_spread(tables))


def print_table(table: dict[str, float]) -> None:
    width = max(map(len, table))
    for name, value in table.items():
        text = "n/a" if math.isnan(value) else f"{value:.0f}" if name in COUNTS else f"{value:.4f}"
        print(f"{name:<{width}}  {text}")


def load_prm(args: argparse.Namespace) -> PRMScorer:
    """The PRM of --prm; a bad directory, checkpoint or tokenizer ends the run with its one-line message."""
    try:
        return PRMScorer.load(args.prm, device=args.device, dtype=_dtype(args, None))
    except (ValueError, FileNotFoundError) as error:
        user_error(error)


def user_error(error: Exception, prefix: str = "error: ") -> None:
    """A user's mistake (a flag, a file): its one line on stderr and exit status 2, no traceback."""
    print(f"{prefix}{error}", file=sys.stderr)
    sys.exit(2)


def run_bon(model: Qwen2, task: Task, cfg: TrainConfig, args: argparse.Namespace) -> None:
    """Best-of-N by the PRM next to Maj@N and Pass@N over the same N samples, on each held-out set."""
    scorer = load_prm(args)
    env, sampling = task.env(cfg, evaluation=True), cfg.sampling(evaluation=True)
    for name, problems in task.evals.items():
        out = f"{args.out}.{name}.jsonl" if args.out and len(task.evals) > 1 else args.out
        print(f"{name}:")
        print_table(best_of_n(model, env, problems, scorer, sampling, n=cfg.eval_k, aggregate=args.prm_aggregate,
                              batch_size=args.batch_size, seed=cfg.seed, tokenizer=task.tokenizer, out=out))
        if out:
            print(f"samples and their PRM scores written to {out}")


def run_processbench(args: argparse.Namespace) -> None:
    """The PRM finds the earliest wrong step of each row of each subset: per subset the accuracy on erroneous
    and on correct rows and their F1, in percent as ProcessBench's code prints them (rows too long for the PRM
    count as wrong, and how many there were is printed), then the mean F1 over the subsets."""
    try:
        files = processbench_files(args.data)
        subsets = [(name, path, *load_processbench(path)) for name, path in files]
    except (ValueError, FileNotFoundError) as error:
        user_error(error)
    scorer, tables = load_prm(args), []
    for name, path, rows, skipped in subsets:
        for message in skipped:
            print(f"skipped {message}")
        print(f"{path}: {len(rows)} rows" + (f", {len(skipped)} skipped" if skipped else ""))
        table, records = evaluate_processbench(scorer, rows[:args.limit], args.threshold, args.batch_size)
        tables.append(table)
        print(f"{name} error acc: {_percent(table['acc_erroneous'])}, correct acc: {_percent(table['acc_correct'])}, "
              f"f1: {_percent(table['f1'])} ({table['samples']:.0f} rows, {table['erroneous']:.0f} erroneous; "
              f"{table['unscored']:.0f} too long for the PRM, counted wrong)")
        out = f"{args.out}.{name}.jsonl" if args.out and len(subsets) > 1 else args.out
        if out:
            write_episodes(out, records)
            print(f"step scores written to {out}")
    print(f"mean f1 over {len(tables)} subsets ({', '.join(name for name, *_ in subsets)}): "
          f"{_percent(mean_f1(tables))}")


def _percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed or 0)
    if args.mode == "processbench":
        return run_processbench(args)
    model, run, model_dir = load(args)
    cfg, where = settings(args, run, model_dir)
    print(f"model: {args.ckpt or 'tiny random'} ({model.num_params() / 1e6:.1f}M parameters) on {args.device}, "
          f"{str(next(model.parameters()).dtype).removeprefix('torch.')}"
          + (f"; the run's config: {json.dumps(run.out_dir)}" if run else ""))
    print(where)
    task = task_of(cfg, model, model_dir, args)
    if args.mode == "chat":
        chat(model, task.tokenizer, task.env(cfg, evaluation=True).options, cfg.sampling(evaluation=True),
             max_len=args.max_len, seed=cfg.seed, generation_eos_ids=task.generation_eos_ids)
    elif args.mode == "bon":
        run_bon(model, task, cfg, args)
    else:
        run_eval(model, task, cfg, args)


if __name__ == "__main__":
    main(sys.argv[1:])
