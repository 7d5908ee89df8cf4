"""The demo's held-out evaluation of saved models over several evaluation seeds: how much of a before -> after
difference is evaluation noise, and how far apart RL runs from one start end.

    python bench/demo_eval.py out/m1337/warmup out/m1337/ckpt-150/actor --seeds=1,2,3,4

For each model directory: Succ@k, the non-repetitive ratio and the failure modes (shares of episodes with an
attempt without an answer, with a repeated answer, with an answer outside the range) on the 200 held-out
questions of the given data seed (the default run's set), at the demo's evaluation temperature, once per
evaluation seed; printed as the mean +- the spread over the seeds. One seed's Succ@5 moves by about 0.03
between seeds, so compare means, not single draws.
Test: python -m pytest -q tests/test_bench_e2e.py -k demo_eval
"""
import argparse

import torch

from nanoufo import demo
from nanoufo.config import TrainConfig
from nanoufo.evaluate import evaluate, mean_and_spread, with_spread
from nanoufo.weights import load_model

SHOWN = {"Succ@5": "succ@5", "non-repetitive": "non_repetitive_ratio", "no answer": "no_answer_rate",
         "repeated": "repeat_rate", "invalid": "invalid_rate"}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="HF model directories (a run's warmup/ or ckpt-N/actor)")
    p.add_argument("--seeds", default="1,2,3,4", help="evaluation seeds, comma-separated")
    p.add_argument("--data_seed", type=int, default=TrainConfig.seed, help="the run's --seed: which held-out set")
    p.add_argument("--n_problems", type=int, default=TrainConfig.n_eval_problems)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = TrainConfig()
    env = demo.demo_task(cfg).env(cfg, evaluation=True)  # as train.py's eval_env
    problems = demo.make_problems("test", args.n_problems, args.data_seed)
    rows = []
    for path in args.models:
        model = load_model(path, device=torch.device("cpu"), dtype=torch.float32)
        tables = [evaluate(model, env, problems, cfg.sampling(evaluation=True), k=cfg.eval_k, mode="succ", seed=seed,
                           progress=False) for seed in seeds]
        rows.append({"model": path, "per_seed": tables, **mean_and_spread(tables)})
        print(f"{path}: " + ", ".join(f"{label} {with_spread(rows[-1], key, 3)}" for label, key in SHOWN.items()),
              flush=True)
    return rows


if __name__ == "__main__":
    main()
