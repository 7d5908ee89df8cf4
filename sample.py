"""Sample from a Hugging Face Qwen2 checkpoint directory: multi-turn evaluation, the Pass@k baseline, or a
chat where you play the environment.

    python sample.py --ckpt=Qwen2.5-3B-Instruct                      # Succ@5 on the bundled GSM8K test set
    python sample.py --ckpt=out/step_200 --data=math500 --limit=100 --k=5 --out=eval.jsonl
    python sample.py --ckpt=out/step_200 --mode=passk --k=5          # 5 independent single-turn samples
    python sample.py --ckpt=out/step_200 --mode=chat                 # you type "Try again.", /new <q>, /quit
    python sample.py --ckpt=out/step_200 --mode=bon --prm=Qwen2.5-Math-PRM-7B --k=8 --data=gsm8k,math500
                                          # Pass@1, Pass@8, Maj@8 and RM@8 (Best-of-8 by the PRM) on both sets
    python sample.py --mode=processbench --prm=Qwen2.5-Math-PRM-7B --data=processbench_gsm8k.jsonl --threshold=0.5
    python sample.py --tiny                                          # no checkpoint: a tiny random model
    python sample.py --ckpt=out/step_200 --data=mine.jsonl --question_key=prompt --answer_key=solution

Flags are spelled --key=value as in train.py (--max_new_tokens and --max-new-tokens both work). A data file
that cannot be read ends with one line naming the file, the columns found and the flag to set (exit status 2).

The tokenizer is the checkpoint's own when it has one, else the bundled Qwen2.5 tokenizer. CUDA + bf16
when available, else CPU + fp32. The chat is nanoufo/chat.py (one KV cache per conversation). A
ProcessBench file has one JSON row per line with problem, steps (a list of strings) and label (the index of
the earliest wrong step, -1 if none); rows that do not fit are skipped and counted. In bon mode --data may
name several sets, separated by commas.
Tests: python -m pytest -q tests/test_sample_cli.py tests/test_prm_eval.py
"""
import argparse
import math
import sys
from pathlib import Path

import torch

from nanoufo.chat import chat
from nanoufo.config import PRM_AGGREGATES
from nanoufo.data import DEFAULT_EVAL_SETS, FORMATS, error_line, load_problems
from nanoufo.env import UFOEnv
from nanoufo.evaluate import best_of_n, evaluate, write_episodes
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.prm import PRMScorer, evaluate_processbench, load_processbench
from nanoufo.tokenizer import load_tokenizer
from nanoufo.weights import load_model

COUNTS = ("episodes", "problems", "samples", "erroneous", "unscored")  # printed as whole numbers


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--tiny", action="store_true", help="no checkpoint: a tiny random Qwen2 with the bundled tokenizer")
    p.add_argument("--mode", choices=("eval", "passk", "chat", "bon", "processbench"), default="eval")
    p.add_argument("--data", default="gsm8k",
                   help=f"a bundled set ({', '.join(DEFAULT_EVAL_SETS)}), a file or a hub name")
    p.add_argument("--split", default="test", help="split of a hub data set")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="the data's row format")
    p.add_argument("--question_key", "--question-key", help="the data's question field, if not the format's")
    p.add_argument("--answer_key", "--answer-key", help="the data's gold answer field, if not the format's")
    p.add_argument("--limit", type=int, help="evaluate the first N problems only (--tiny: 4)")
    p.add_argument("--k", type=int, default=5, help="turns per episode (eval) or samples per problem (passk, bon)")
    p.add_argument("--prm", help="process reward model directory (Qwen2.5-Math-PRM layout, with its tokenizer)")
    p.add_argument("--prm_aggregate", "--prm-aggregate", choices=PRM_AGGREGATES, default="min",
                   help="bon: a response's score from its steps'")
    p.add_argument("--threshold", type=float, default=0.5, help="processbench: a step scored below it is wrong")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top_p", "--top-p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, help="per attempt (default 1024; --tiny: 32)")
    p.add_argument("--max_len", "--max-len", type=int, default=8192,
                   help="chat mode: the context limit of a conversation")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64, help="episodes sampled together")
    p.add_argument("--feedback", default="Try again.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write one JSON line per episode here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    if not args.ckpt and not args.tiny and args.mode != "processbench":
        p.error("give --ckpt=DIR (or --tiny for a random test model)")
    if args.mode in ("bon", "processbench") and not args.prm:
        p.error(f"--mode={args.mode} needs --prm=DIR, a process reward model checkpoint")
    if args.mode == "processbench" and args.data in DEFAULT_EVAL_SETS:
        p.error("--mode=processbench reads a local ProcessBench file: --data=FILE.jsonl")
    if args.tiny:  # a smoke run: a few short episodes unless asked otherwise
        args.limit = args.limit or 4
    args.max_new_tokens = args.max_new_tokens or (32 if args.tiny else 1024)
    if args.k < 1 or args.max_new_tokens < 1:  # the boundary: the library below only asserts
        p.error("--k and --max_new_tokens must be at least 1")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return args


def load(args: argparse.Namespace):
    """(model, tokenizer) from --ckpt, or a tiny random model for --tiny."""
    if args.tiny:
        tokenizer = load_tokenizer()
        config = QwenConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = Qwen2(config).to(args.device, args.dtype)
        model.init_weights(torch.Generator(args.device).manual_seed(args.seed))
        return model.eval(), tokenizer
    ckpt = Path(args.ckpt)
    tokenizer = load_tokenizer(ckpt if (ckpt / "tokenizer_config.json").is_file() else None)
    return load_model(ckpt, device=args.device, dtype=args.dtype).eval(), tokenizer


def load_set(name: str, args: argparse.Namespace) -> list:
    """The problems of a bundled set or a file, with a line saying how many (and how many rows were skipped);
    a file that cannot be read ends the run with one line naming it, the columns found and the flag to set."""
    source = DEFAULT_EVAL_SETS.get(name, name)
    try:
        problems, skipped = load_problems(source, args.format, split=args.split, limit=args.limit,
                                          question_key=args.question_key, answer_key=args.answer_key)
    except (OSError, ValueError) as error:  # exit status 2, no traceback
        print(f"--data: {error_line(error, lambda key: f'--{key}=')}", file=sys.stderr)
        sys.exit(2)
    print(f"{source}: {len(problems)} problems" + (f", {skipped} rows skipped (no usable answer)" if skipped else ""))
    return problems


def run_eval(model, tokenizer, args: argparse.Namespace) -> None:
    problems = load_set(args.data, args)
    env = UFOEnv(tokenizer, feedback=args.feedback, max_turns=args.k)
    table = evaluate(model, env, problems, k=args.k, mode="succ" if args.mode == "eval" else "pass",
                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed, tokenizer=tokenizer, out=args.out)
    print_table(table)
    if args.out:
        print(f"episodes written to {args.out}")


def print_table(table: dict[str, float]) -> None:
    width = max(map(len, table))
    for name, value in table.items():
        text = "n/a" if math.isnan(value) else f"{value:.0f}" if name in COUNTS else f"{value:.4f}"
        print(f"{name:<{width}}  {text}")


def load_prm(args: argparse.Namespace) -> PRMScorer:
    """The PRM of --prm; a bad directory, checkpoint or tokenizer ends the run with its one-line message."""
    try:
        return PRMScorer.load(args.prm, device=args.device, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as error:
        user_error(error)


def user_error(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run_bon(model, tokenizer, args: argparse.Namespace) -> None:
    """Best-of-N by the PRM next to Maj@N and Pass@N over the same N samples, on each set of --data."""
    scorer = load_prm(args)
    env = UFOEnv(tokenizer, feedback=args.feedback, max_turns=1)
    for name in args.data.split(","):
        problems = load_set(name, args)
        out = f"{args.out}.{name}.jsonl" if args.out and "," in args.data else args.out
        print_table(best_of_n(model, env, problems, scorer, n=args.k, aggregate=args.prm_aggregate,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, tokenizer=tokenizer,
                              out=out))
        if out:
            print(f"samples and their PRM scores written to {out}")


def run_processbench(args: argparse.Namespace) -> None:
    """The PRM finds the earliest wrong step of each row: accuracy on erroneous and correct rows, F1."""
    try:
        rows, skipped = load_processbench(args.data)
    except (ValueError, FileNotFoundError) as error:
        user_error(error)
    for message in skipped:
        print(f"skipped {message}")
    print(f"{args.data}: {len(rows)} rows" + (f", {len(skipped)} skipped" if skipped else ""))
    table, records = evaluate_processbench(load_prm(args), rows[:args.limit], args.threshold, args.batch_size)
    print_table(table)
    if args.out:
        write_episodes(args.out, records)
        print(f"step scores written to {args.out}")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.mode == "processbench":
        return run_processbench(args)
    model, tokenizer = load(args)
    print(f"model: {args.ckpt or 'tiny random'} ({model.num_params() / 1e6:.1f}M parameters) on {args.device}, "
          f"{str(args.dtype).removeprefix('torch.')}")
    if args.mode == "chat":
        chat(model, tokenizer, feedback=args.feedback, max_new_tokens=args.max_new_tokens, max_len=args.max_len,
             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    elif args.mode == "bon":
        run_bon(model, tokenizer, args)
    else:
        run_eval(model, tokenizer, args)


if __name__ == "__main__":
    main(sys.argv[1:])
