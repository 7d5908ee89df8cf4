"""Held-out evaluation: Succ@k (one episode of up to k attempts with "Try again." in between) or the
Pass@k baseline (k independent single-turn samples), in batches with a progress bar, plus one JSON line
per episode; and Best-of-N with a process reward model next to majority vote over the same N samples.

    from nanoufo.evaluate import evaluate, best_of_n
    sampling = SamplingOptions(max_new_tokens=1024, temperature=0.5)
    table = evaluate(model, env, problems, sampling, k=5, mode="succ", out="eval.jsonl")
    table = best_of_n(model, env, problems, scorer, sampling, n=8)     # pass@1, pass@N, maj@N, rm@N

Under data parallelism (par=ParallelContext) the batches are dealt out to the DP groups and the episodes gathered, so
every rank returns the table one process would (same batches, same seeds). held_out_metrics is train.py's
Succ@k + Pass@k row, the mean over several evaluation seeds with its spread. sample.py --mode=eval / passk / bon
is the command line for it.
Tests: python -m pytest -q tests/test_rollout.py tests/test_dp_statistics.py
"""
import json
import math
import statistics
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.metrics import maj_at_n, pass_at_k, rm_at_n, summarize, tokens_per_episode
from nanoufo.model import Qwen2
from nanoufo.options import SamplingOptions
from nanoufo.parallel import ParallelContext
from nanoufo.rollout import Noise, run_episodes

def episode_record(episode: Episode, sample: int, sampled_tokens: int) -> dict:
    return {"id": episode.problem.id, "sample": sample, "question": episode.problem.question,
            "gold": episode.problem.answer, "responses": episode.responses, "answers": episode.answers,
            "correct": episode.correct, "acceptable": episode.acceptable, "solved": episode.solved,
            "turns": episode.turns, "sampled_tokens": sampled_tokens}


def write_episodes(path: str | Path, records: list[dict]) -> None:
    """One JSON object per line, UTF-8."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def evaluate(model: Qwen2, env: UFOEnv, problems: list[Problem], sampling: SamplingOptions, *, k: int = 5,
             mode: str = "succ", out: str | Path | None = None, par: ParallelContext | None = None,
             **options) -> dict[str, float]:
    """The metrics table. mode "succ": succ@1..k, mean turns, non-repetitive ratio, tokens per episode;
    mode "pass": pass@1..k over k single-turn samples per problem, and tokens per sample. `out` gets one
    JSON line per episode (written by global rank 0); `par` splits the batches across data-parallel groups;
    `options`: sample_episodes' (batch_size, seed, tokenizer, progress)."""
    if mode not in ("succ", "pass"):
        raise ValueError(f"evaluate: mode={mode!r} is not 'succ' or 'pass'")
    samples, turns = (1, k) if mode == "succ" else (k, 1)
    episodes, lengths = sample_episodes(model, env, problems, sampling, samples, turns, desc=f"{mode}@{k}", par=par,
                                        **options)
    if out is not None and (par is None or par.is_main):
        write_episodes(out, [episode_record(e, j % samples, n) for j, (e, n) in enumerate(zip(episodes, lengths))])
    if mode == "succ":
        return summarize(episodes, k, lengths, env.options.distinct_by)
    correct = _per_problem([e.correct[0] for e in episodes], k)
    return {"problems": float(len(correct)), **{f"pass@{j}": pass_at_k(correct, j) for j in range(1, k + 1)},
            "tokens_per_episode": tokens_per_episode(lengths)}


def sample_episodes(model: Qwen2, env: UFOEnv, problems: list[Problem], sampling: SamplingOptions, samples: int,
                    turns: int, *, desc: str, par: ParallelContext | None = None, batch_size: int = 64, seed: int = 0,
                    tokenizer=None, progress: bool = True) -> tuple[list[Episode], list[int]]:
    """`samples` episodes of up to `turns` attempts per problem, about batch_size episodes at a time:
    (episodes problem after problem, sampled tokens of each). `tokenizer` decodes attempts for grading
    (default env.tokenizer). A batch is seeded by its start, so with `par` every rank gets what one process would."""
    per_batch = max(1, batch_size // samples)
    starts = range(0, len(problems), per_batch)
    dp_rank, dp_size = (par.dp_rank, par.dp_size) if par is not None else (0, 1)
    done = {}  # batch start -> (episodes, sampled tokens per episode)
    for i in tqdm(starts[dp_rank::dp_size], desc=desc, unit="batch", disable=not progress):
        graded = run_episodes(model, env, problems[i:i + per_batch], sampling, Noise(seed + i),
                              n_samples_per_problem=samples, max_turns=turns, tokenizer=tokenizer)
        done[i] = (graded.episodes, graded.rollout.loss_mask.sum(dim=1).long().tolist())
    done = _gather_over_dp(done, par)
    return [e for i in starts for e in done[i][0]], [n for i in starts for n in done[i][1]]


def _per_problem(values: list, n: int) -> list[list]:
    return [values[j:j + n] for j in range(0, len(values), n)]


def best_of_n(model: Qwen2, env: UFOEnv, problems: list[Problem], scorer, sampling: SamplingOptions, *, n: int = 8,
              aggregate: str = "min", out: str | Path | None = None, **options) -> dict[str, float]:
    """N single-turn samples per problem, each scored by the PRM `scorer` (nanoufo.prm.PRMScorer: its steps'
    scores aggregated by "min" or "product", the question without the instruction as context), then from
    the same samples: pass@1 and pass@N, maj@N (majority answer) and rm@N (the PRM's favourite). A sample
    without steps (or too long for the PRM) ranks below every scored one and is counted as `unscored`.
    `options`: sample_episodes'."""
    episodes, lengths = sample_episodes(model, env, problems, sampling, n, 1, desc=f"bon@{n}", **options)
    scores = scorer.response_scores([e.problem.question for e in episodes], [e.responses[0] for e in episodes],
                                    aggregate)
    if out is not None:
        write_episodes(out, [episode_record(e, j % n, tokens) | {"prm_score": score}
                             for j, (e, tokens, score) in enumerate(zip(episodes, lengths, scores))])
    correct = _per_problem([e.correct[0] for e in episodes], n)
    return {"problems": float(len(correct)), "pass@1": pass_at_k(correct, 1), f"pass@{n}": pass_at_k(correct, n),
            f"maj@{n}": maj_at_n(_per_problem([e.answers[0] for e in episodes], n), correct),
            f"rm@{n}": rm_at_n(_per_problem(scores, n), correct), "unscored": float(scores.count(None)),
            "tokens_per_episode": tokens_per_episode(lengths)}


def _gather_over_dp(done: dict, par: ParallelContext | None) -> dict:
    """Every DP group's finished batches on every rank (the batch starts never collide)."""
    if par is None or par.dp_group is None:
        return done
    parts = [None] * par.dp_size
    dist.all_gather_object(parts, done, group=par.dp_group)
    return {start: result for part in parts for start, result in part.items()}


def held_out_metrics(model: Qwen2, env: UFOEnv, problems: list[Problem], sampling: SamplingOptions, *, k: int,
                     seeds: list[int], **options) -> dict[str, float]:
    """train.py's evaluation row: Succ@1..k (one episode, feedback between attempts) with its turn and failure
    metrics, Pass@1..k (k single-turn samples), and succ_at_k / pass_at_k for the plots; each the mean over one
    evaluation per seed, with its spread over the seeds (sample std) as <metric>_sd when there are several."""
    rows = []
    for seed in seeds:
        succ = evaluate(model, env, problems, sampling, k=k, mode="succ", seed=seed, **options)
        passk = evaluate(model, env, problems, sampling, k=k, mode="pass", seed=seed, **options)
        rows.append({**succ, **{key: v for key, v in passk.items() if key.startswith("pass@")},
                     "pass_tokens_per_sample": passk["tokens_per_episode"], "succ_at_k": succ[f"succ@{k}"],
                     "pass_at_k": passk[f"pass@{k}"]})
    return mean_and_spread(rows)


def mean_and_spread(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over rows (one per evaluation seed) and, with two rows or more, its sample std as
    <metric>_sd. One seed's Succ@5 on the demo's 200 questions moves by about 0.03, so compare means."""
    table = {key: statistics.fmean(row[key] for row in rows) for key in rows[0]}
    if len(rows) > 1:  # by hand: statistics.stdev fails on a NaN (a metric with nothing to average over)
        table |= {f"{key}_sd": math.sqrt(sum((row[key] - table[key]) ** 2 for row in rows) / (len(rows) - 1))
                  for key in rows[0]}
    return table


def with_spread(table: dict[str, float], key: str, digits: int = 4) -> str:
    """table[key] as text, followed by +- its spread when the table has one (mean_and_spread)."""
    spread = f" +- {table[key + '_sd']:.{digits}f}" if key + "_sd" in table else ""
    return f"{table[key]:.{digits}f}{spread}"
