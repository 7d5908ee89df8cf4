"""Held-out evaluation: Succ@k (one episode of up to k attempts with "Try again." in between) or the
Pass@k baseline (k independent single-turn samples), in batches with a progress bar, plus one JSON line
per episode.

    from nanoufo.evaluate import evaluate
    table = evaluate(model, env, problems, k=5, mode="succ", temperature=0.5, out="eval.jsonl")

sample.py --mode=eval / --mode=passk is the command line for it. Tests: python -m pytest -q tests/test_rollout.py
"""
import json
from pathlib import Path

from tqdm import tqdm

from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.metrics import pass_at_k, summarize, tokens_per_episode
from nanoufo.model import Qwen2
from nanoufo.rollout import run_episodes

MODES = ("succ", "pass")


def episode_record(episode: Episode, sample: int, sampled_tokens: int) -> dict:
    return {"id": episode.problem.id, "sample": sample, "question": episode.problem.question,
            "gold": episode.problem.answer, "responses": episode.responses, "answers": episode.answers,
            "correct": episode.correct, "solved": episode.solved, "turns": episode.turns,
            "sampled_tokens": sampled_tokens}


def write_episodes(path: str | Path, records: list[dict]) -> None:
    """One JSON object per line, UTF-8."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def evaluate(model: Qwen2, env: UFOEnv, problems: list[Problem], *, k: int = 5, mode: str = "succ",
             batch_size: int = 64, max_new_tokens: int = 1024, temperature: float = 0.5, top_p: float = 1.0,
             seed: int = 0, tokenizer=None, out: str | Path | None = None, progress: bool = True) -> dict[str, float]:
    """The metrics table. mode "succ": succ@1..k, mean turns, non-repetitive ratio, tokens per episode;
    mode "pass": pass@1..k over k single-turn samples per problem, and tokens per sample. `tokenizer`
    decodes attempts for grading (default env.tokenizer); `out` gets one JSON line per episode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    samples, turns = (1, k) if mode == "succ" else (k, 1)
    per_batch = max(1, batch_size // samples)
    episodes, lengths = [], []
    for i in tqdm(range(0, len(problems), per_batch), desc=f"{mode}@{k}", unit="batch", disable=not progress):
        rollout, batch = run_episodes(model, env, problems[i:i + per_batch], n_samples_per_problem=samples,
                                      max_turns=turns, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, seed=seed + i, tokenizer=tokenizer)
        episodes += batch
        lengths += rollout.loss_mask.sum(dim=1).long().tolist()
    if out is not None:
        write_episodes(out, [episode_record(e, j % samples, n) for j, (e, n) in enumerate(zip(episodes, lengths))])
    if mode == "succ":
        return summarize(episodes, k, lengths)
    correct = [[e.correct[0] for e in episodes[j:j + k]] for j in range(0, len(episodes), k)]
    table = {"problems": float(len(correct))}
    table.update({f"pass@{j}": pass_at_k(correct, j) for j in range(1, k + 1)})
    table["tokens_per_episode"] = tokens_per_episode(lengths)
    return table
