"""Does a bf16 update learn at the paper's learning rates? One PPO update (bench/train_step.py's, actor lr 1e-6,
critic lr 1e-5) of the same random models in fp32; in bf16 with fp32 master weights and moments (the trainer,
nanoufo/optim.py); and in bf16 with AdamW stepping the bf16 parameters themselves (the trainer before masters).

    python bench/master_weights.py --preset tiny                 # CPU, seconds
    python bench/master_weights.py --preset 1.5b --batch 64      # GPU

Per run and model: how far the update moved the weights the optimizer trains (the fp32 masters, or the
parameters), as the cosine and the norm ratio against the fp32 run's move, and the share of entries that moved
at all. All runs start from the same bf16-representable weights. Prints a table and a final JSON line.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_bench_e2e.py
"""
import torch

from common import build_model, parse_args, report, synthetic_rollout
from nanoufo.trainer import make_optimizers
from train_step import one_update, train_config

COLUMNS = ["run", "model", "cosine_vs_fp32", "norm_ratio_vs_fp32", "moved_share"]
RUNS = ("fp32", "bf16 + fp32 masters", "bf16 parameters in AdamW")


def trained_weights(optimizer) -> torch.Tensor:
    """Every tensor the optimizer steps, flattened in fp32."""
    return torch.cat([p.detach().float().flatten() for g in optimizer.param_groups for p in g["params"]])


def moves(preset, run: str, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """{model: the move of its trained weights} after one update of the run's kind."""
    start = [build_model(preset, seed, value_head=head, dtype=torch.float32).to(torch.bfloat16)
             for head in (False, True, False)]
    actor, critic, ref = (m.float() if run == "fp32" else m for m in start)
    ref.requires_grad_(False)
    cfg = train_config(batch, batch)
    if run == "bf16 parameters in AdamW":
        optimizers = {"actor": torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, weight_decay=0.0),
                      "critic": torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=0.0)}
    else:
        optimizers = make_optimizers(actor, critic, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
                                     weight_decay=cfg.weight_decay)
    before = {name: trained_weights(opt) for name, opt in optimizers.items()}
    one_update(cfg, (actor, critic, ref), optimizers, synthetic_rollout(preset, batch, seed), seed)
    return {name: trained_weights(opt) - before[name] for name, opt in optimizers.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, first_batch_only=True)
    batch = args.batch[0]
    results = {run: moves(args.preset, run, batch, args.seed) for run in RUNS}
    rows = []
    for run, moved in results.items():
        for name, move in moved.items():
            want = results["fp32"][name]
            rows.append(dict(run=run, model=name, cosine_vs_fp32=float(move @ want / (move.norm() * want.norm())),
                             norm_ratio_vs_fp32=float(move.norm() / want.norm()),
                             moved_share=float((move != 0).float().mean())))
    return report("master_weights", args.preset, rows, COLUMNS, batch=batch)


if __name__ == "__main__":
    main()
