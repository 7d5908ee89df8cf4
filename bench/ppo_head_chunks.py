"""The fused PPO head (kernels/linear_ppo_loss.py) on the CPU at one row-chunk size: forward + backward of
N tokens against Qwen2.5's vocabulary (151,936), its wall and CPU seconds and the peak memory it adds. One
configuration per process, so each peak is its own (ru_maxrss never goes down). Issue 41's chunk choice:

    for R in 0 441 128; do python bench/ppo_head_chunks.py --tokens 4096 --hidden 64 --chunk-rows $R; done

--chunk-rows 0 is the default of the device (default_chunk_rows). The second of two calls is timed.
"""
import argparse
import resource
import time

import torch

from nanoufo.kernels.linear_ppo_loss import default_chunk_rows, linear_ppo_loss

VOCAB = 151936


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=0, help="0: default_chunk_rows on the CPU")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if min(args.tokens, args.hidden, args.threads) < 1 or args.chunk_rows < 0:
        parser.error("--tokens, --hidden and --threads must be >= 1, --chunk-rows >= 0")
    torch.set_num_threads(args.threads)
    n, h = args.tokens, args.hidden
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen) * 0.5).requires_grad_()  # (N, H)
    weight = (torch.randn(VOCAB, h, generator=gen) * 0.02).requires_grad_()  # (V, H)
    targets = torch.randint(0, VOCAB, (n,), generator=gen)  # (N,)
    mask, advantages = torch.ones(n), torch.randn(n, generator=gen)  # (N,) each
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        hidden.grad = weight.grad = None
        wall, cpu = time.perf_counter(), time.process_time()
        loss, _, _ = linear_ppo_loss(hidden, weight, targets, None, advantages, mask, mask / n, clip_high=0.2,
                                     dual_clip=None, chunk_rows=args.chunk_rows or None)
        loss.backward()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB
    rows = args.chunk_rows or default_chunk_rows(VOCAB, "cpu")
    print(f"tokens {n} hidden {h} chunk_rows {rows}: wall {wall:.2f} s, cpu {cpu:.2f} s, peak added {added:.2f} GiB, "
          f"loss {loss.item():.9g}, |grad W| {weight.grad.norm().item():.9g}")


if __name__ == "__main__":
    main()
