"""How far is a bf16 actor's minibatch gradient from the exact sum of its micro-batches' gradients? One
minibatch of the trainer's PPO loss (nanoufo.trainer.accumulate_gradients, one row per micro-batch) on a tiny
bf16 model, its gradient summed two ways, each against the float64 sum of the very same per-micro-batch bf16
gradients:
  - "fp32 main grad": the optimizer's hooks add each micro-batch's gradient into the fp32 master's .grad
    (nanoufo/optim.py, the trainer);
  - "bf16 .grad": autograd adds it into the parameter's bf16 .grad (the trainer before issue 28).

    python bench/grad_accumulation.py                      # 40, 160 and 300 micro-batches, CPU, about a minute
    python bench/grad_accumulation.py --micro-batches 300

Prints one JSON line per micro-batch count: the relative error ||g - exact|| / ||exact|| over every parameter.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_optim.py
"""
import argparse
import copy
import json

import torch

from nanoufo.config import TrainConfig
from nanoufo.model import Qwen2, QwenConfig
from nanoufo.optim import adamw, grad_of
from nanoufo.trainer import Batch, accumulate_gradients, sequence_stats

SHAPE = QwenConfig(vocab_size=41, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)
ROW_TOKENS = 12  # tokens per row: one row per micro-batch


def minibatch(actor: Qwen2, rows: int, seed: int) -> Batch:
    """rows random trajectories of ROW_TOKENS tokens, every token after the first sampled, with advantages."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SHAPE.vocab_size, (rows, ROW_TOKENS), generator=g)
    mask = torch.ones(rows, ROW_TOKENS)
    mask[:, 0] = 0.0
    with torch.no_grad():
        old_logp = sequence_stats(actor, tokens, 1.0)[0].float()
    return Batch(tokens, mask, old_logp, torch.randn(rows, ROW_TOKENS, generator=g) * mask)


def summed_exactly(model: Qwen2) -> list[torch.Tensor]:
    """Hooks that add every gradient autograd makes for model's parameters into float64 sums (returned)."""
    sums = [torch.zeros(p.shape, dtype=torch.float64) for p in model.parameters()]

    def add(total: torch.Tensor):
        def hook(p: torch.nn.Parameter) -> None:
            total.add_(p.grad.double())
            p.grad = None
        return hook
    for p, total in zip(model.parameters(), sums):
        p.register_post_accumulate_grad_hook(add(total))
    return sums


def accumulation_errors(n_micro: int, seed: int = 0) -> dict[str, float]:
    """{way of summing: relative error against the exact sum} after one minibatch of n_micro micro-batches."""
    torch.manual_seed(seed)
    start = Qwen2(SHAPE)
    start.init_weights(torch.Generator().manual_seed(seed))
    start = start.to(torch.bfloat16)
    cfg = TrainConfig(micro_batch_tokens=ROW_TOKENS, minibatch_size=n_micro)
    batch = minibatch(start, n_micro, seed)
    exact_model, main_model, bf16_model = (copy.deepcopy(start) for _ in range(3))
    exact = summed_exactly(exact_model)
    adamw(main_model.parameters(), lr=1e-6, weight_decay=0.0)  # its hooks keep fp32 sums in the masters
    for model in (exact_model, main_model, bf16_model):
        accumulate_gradients(cfg, model, None, batch, [ROW_TOKENS] * n_micro)
    want = torch.cat([t.flatten() for t in exact])

    def error(grads) -> float:
        got = torch.cat([g.double().flatten() for g in grads])
        return float((got - want).norm() / want.norm())
    return {"micro_batches": n_micro, "fp32 main grad": error(map(grad_of, main_model.parameters())),
            "bf16 .grad": error(p.grad for p in bf16_model.parameters())}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[40, 160, 300])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = [accumulation_errors(n, args.seed) for n in args.micro_batches]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
