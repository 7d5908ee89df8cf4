"""The sampler's device side: per-cache-row state in static buffers and the decode step, which reads and
writes only those buffers, so a run of steps needs nothing from the host and can be one CUDA graph replay
each (nanoufo/cuda_graphs.py). nanoufo/sampler.py drives it: it fills rows, runs steps and, every few steps,
reads the small live/length vectors back to learn which turns ended (`poll`, the only sync).

    decoder = Decoder(model, n_rows=64, max_len=2048, sampling=Sampling(1.0, 1.0, seed=0), stop_ids=[...],
                      max_new_tokens=512)
    decoder.begin(rows, episodes, lengths, logits)  # rows just prefilled: sample each row's first token
    decoder.set_batch(rows, padded_to)              # the rows the next steps decode (padding: the spare row)
    decoder.step(padded_to)                         # one token for every live row of the batch
    live, length = decoder.poll(rows)

The turn limits live in a device buffer too (set_limits), so a decoder and its graphs serve every generate()
call of a run (nanoufo.sampler.Decoders). Cache row n_rows is the spare: padded batch entries point at it,
so their cache writes and state updates land where no episode reads. A row that is not live (its turn
ended since the last poll) still runs in the batch until the next poll, but its state does not move.
Noise: the token at index i of episode e is drawn from stream e * 2^20 + i (kernels/sampling.py), so an
episode's tokens do not depend on which rows or which other episodes share its batch, nor on the
tensor-parallel rank. Episode ids are the caller's
(nanoufo.sampler.generate's episode_ids), so a run can reproduce any episode of another run.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_sampler.py tests/test_batching.py
"""
from dataclasses import dataclass

import torch

from nanoufo.kernels.mm_acc import mm_acc
from nanoufo.kernels.sampling import sample
from nanoufo.model import KVCache, Qwen2, QwenConfig
from nanoufo.parallel import all_gather_vocab

MAX_EPISODE_TOKENS = 2**20  # noise streams per episode: episode * 2^20 + token index (x V < 2^63 for 58M episodes)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int


def kv_bytes_per_token(config: QwenConfig, tp_size: int, itemsize: int) -> int:
    """KV-cache bytes of one slot on a rank: K and V of every layer for its own KV heads."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads // tp_size * config.head_dim * itemsize


def kv_bytes_per_row(model: Qwen2, max_len: int) -> int:
    """KV-cache bytes of one row of max_len slots on this rank (its own KV heads under tensor parallelism)."""
    return max_len * kv_bytes_per_token(model.config, model.par.tp_size, model.lm_head_weight.element_size())


def state_bytes_per_row(max_len: int) -> int:
    """The decoder's bytes per cache row besides the cache: sampled tokens (int64) and their log-probs (fp32)
    at each of max_len + 1 indices, and six int64 / bool scalars."""
    return (max_len + 1) * (8 + 4) + 6 * 8


def logits_bytes_per_row(vocab_size: int, tp_size: int) -> int:
    """fp32 bytes Decoder.logits holds per row at its peak: the rank's columns (mm_acc's product) and, under
    tensor parallelism, all_gather_vocab's padded copy of them, every rank's part and the whole row."""
    local = -(-vocab_size // tp_size)
    return 4 * (vocab_size if tp_size == 1 else 2 * local + tp_size * local + vocab_size)


class Decoder:
    def __init__(self, model: Qwen2, n_rows: int, max_len: int, sampling: Sampling, stop_ids: list[int],
                 max_new_tokens: int, max_batch: int = 0):
        self.model, self.capacity, self.sampling = model, max_len, sampling
        weight = model.lm_head_weight
        device, R = weight.device, n_rows + 1
        self.spare = n_rows
        self.cache = KVCache.allocate(model.config, R, max_len, device, weight.dtype, tp_size=model.par.tp_size)
        long = dict(device=device, dtype=torch.long)
        self.limits = torch.zeros(2, **long)  # (max_len, max_new_tokens) of the current call: read by the step
        self.set_limits(max_len, max_new_tokens)
        self.last_token = torch.zeros(R, **long)  # the token the next step feeds (not yet in the cache)
        self.length = torch.ones(R, **long)  # tokens in the row's sequence, last_token included
        self.turn_start = torch.zeros(R, **long)  # index of the current attempt's first token
        self.episode = torch.zeros(R, **long)
        self.live = torch.zeros(R, device=device, dtype=torch.bool)  # sampling: the turn is open
        self.tokens = torch.zeros(R, max_len + 1, **long)  # sampled tokens at their index; the last column
        self.logprobs = torch.zeros(R, max_len + 1, device=device)  # takes the writes of rows that are not live
        self.stop_ids = torch.tensor(sorted(set(stop_ids)) or [-1], **long)
        self.batch = torch.full((max(R, max_batch),), self.spare, **long)  # the decode batch's rows, padded with
        # the spare (max_batch: the largest bucket, which may exceed the rows)

    def set_limits(self, max_len: int, max_new_tokens: int) -> None:
        """The turn limits of the next steps (a reused decoder serves calls with other limits): a row's turn
        ends at max_new_tokens sampled tokens or at max_len tokens in all, max_len <= the cache's slots."""
        assert max_len <= self.capacity, "a decoder serves calls up to its cache's length"
        self.max_len, self.max_new_tokens = max_len, max_new_tokens
        self.limits.copy_(torch.tensor([max_len, max_new_tokens]))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, V) fp32 over the whole vocabulary: under tensor parallelism every rank gathers all ranks' columns,
        so each rank's sampler draws the same token with the same seed. The logits come out in fp32 whatever
        the model's dtype, as the trainer's linear_token_stats makes them (bf16 logits put the sampler's
        log-probs further from the trainer's: bench/RESULTS.md, "On-policy gap"): on CUDA a bf16 x bf16
        product accumulated in fp32 (no fp32 copy of the head's weight), elsewhere an upcast (mm_acc)."""
        m = self.model
        local = mm_acc(m.lm_head_input(hidden), m.lm_head_weight.T)  # (N, V_local) fp32
        return all_gather_vocab(local, m.vocab_start, m.config.vocab_size, m.par)

    def begin(self, rows: torch.Tensor, episodes: torch.Tensor, lengths: torch.Tensor, logits: torch.Tensor) -> None:
        """Open a turn on rows (N,) whose sequences (lengths (N,), of episodes (N,)) were just prefilled, and
        sample their first tokens from logits (N, V)."""
        self.episode[rows], self.length[rows], self.turn_start[rows] = episodes, lengths, lengths
        self.live[rows] = True
        self.advance(rows, logits)

    def advance(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Sample the token at index length[row] of every live row from logits (N, V); stop flags on the device."""
        s = self.sampling
        length, live = self.length[rows], self.live[rows]  # (N,)
        noise_ids = self.episode[rows] * MAX_EPISODE_TOKENS + length  # (episode, token index)
        token, logprob = sample(logits, s.temperature, s.top_p, s.seed, noise_ids)
        column = torch.where(live, length, self.capacity)
        self.tokens[rows, column], self.logprobs[rows, column] = token, logprob
        length = length + live
        max_len, max_new_tokens = self.limits
        ended = (torch.isin(token, self.stop_ids) | (length - self.turn_start[rows] >= max_new_tokens)
                 | (length >= max_len))
        self.last_token[rows] = torch.where(live, token, self.last_token[rows])
        self.length[rows], self.live[rows] = length, live & ~ended

    def set_batch(self, rows: list[int], padded_to: int) -> None:
        """The next steps decode these rows, padded with the spare row to padded_to entries."""
        rows = torch.tensor(rows + [self.spare] * (padded_to - len(rows)))
        if self.batch.is_cuda:  # an asynchronous copy: no wait for the work already queued
            rows = rows.pin_memory()
        self.batch[:padded_to].copy_(rows, non_blocking=True)

    def step(self, n: int) -> None:
        """One decode step for batch[:n], on the static buffers only (capturable in a CUDA graph)."""
        rows = self.batch[:n]
        positions = (self.length[rows] - 1)[:, None]  # (n, 1) the fed token's cache slot
        hidden = self.model(self.last_token[rows][:, None], positions, cache=self.cache, cache_rows=rows)
        self.advance(rows, self.logits(hidden[:, 0]))

    def poll(self, rows: list[int]) -> tuple[list[bool], list[int]]:
        """The stop check: whether each row is still live and its length (one small device-to-host copy)."""
        index = torch.tensor(rows, device=self.batch.device)
        live, length = torch.stack([self.live[index].long(), self.length[index]]).tolist()
        return [bool(x) for x in live], length

    def sampled(self, rows: list[int], starts: list[int], ends: list[int]) -> list[tuple[list[int], list[float]]]:
        """Each row's tokens and log-probs in [start, end) (the attempt that just ended), read back at once."""
        index = torch.tensor(rows, device=self.batch.device)
        tokens, logprobs = self.tokens[index].tolist(), self.logprobs[index].tolist()
        return [(t[a:b], lp[a:b]) for t, lp, a, b in zip(tokens, logprobs, starts, ends)]
