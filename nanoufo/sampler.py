"""KV-cached, batched, multi-turn sampling: each row is one conversation on one preallocated KV cache.

    from nanoufo.sampler import generate
    rollout = generate(model, prompts, next_turn, max_turns=5, max_new_tokens=512, stop_ids=env.stop_ids,
                       temperature=1.0, top_p=1.0, seed=0)

The prompts (token lists of different lengths) are prefilled in one right-padded batch; a token's
position is its cache slot. Each step samples one token for every row whose turn is open. A turn ends on a
stop token, after max_new_tokens, or at the context limit max_len; the rows whose turns ended in a step go
to `next_turn(rows, responses, ended_with_stop)`, which answers per row with the tokens of the next user
turn (feedback, template headers) or None to end the episode. Those tokens are prefilled into the same
cache in one batched call (cache_rows = those rows) and the rows sample again: the history is never
prefilled twice. A row that has ended leaves the batch, so no step is spent on it.

A turn's last sampled token is kept out of the cache until the row's next forward (decode or feedback
prefill), so a row that ends never pays for it. Sampling is kernels/sampling.py: a row's noise depends
on (seed, step, row) only, so every tensor-parallel rank draws the same tokens.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_sampler.py
"""
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.sampling import sample
from nanoufo.model import KVCache, Qwen2
from nanoufo.parallel import all_gather_vocab

NextTurn = Callable[[list[int], list[list[int]], list[bool]], list[list[int] | None]]


@dataclass
class Rollout:
    """B trajectories (prompt, attempt, feedback, attempt, ...) as right-padded tensors on the CPU.

    logprobs are the sampler's log-probs of its tokens under the temperature-scaled distribution, NOT the
    top-p-truncated one (greedy: temperature 1), which is what a trainer's forward recomputes."""
    tokens: torch.Tensor  # (B, T) int64, 0 after each row's length
    lengths: torch.Tensor  # (B,) int64
    loss_mask: torch.Tensor  # (B, T) fp32, 1 exactly on sampled tokens (attempt content + its stop token)
    logprobs: torch.Tensor  # (B, T) fp32, 0 where loss_mask is 0
    turn_spans: list[list[tuple[int, int]]]  # per row, [start, end) of each attempt's sampled tokens
    n_prefill_tokens: int  # tokens that went through prefill (prompts, and feedback with the token before it)
    n_decode_steps: int  # single-token forward calls

    def to(self, device) -> "Rollout":
        return Rollout(self.tokens.to(device), self.lengths.to(device), self.loss_mask.to(device),
                       self.logprobs.to(device), self.turn_spans, self.n_prefill_tokens, self.n_decode_steps)


class _Conversations:
    """The token lists of every row and the model calls that advance them on one KV cache."""

    def __init__(self, model: Qwen2, prompts: list[list[int]], max_len: int):
        self.model, self.max_len = model, max_len
        weight = model.lm_head_weight
        self.device = weight.device
        self.cache = KVCache.allocate(model.config, len(prompts), max_len, self.device, weight.dtype,
                                      tp_size=model.tp.tp_size)
        self.tokens = [list(p) for p in prompts]
        self.sampled = [[0.0] * len(p) for p in prompts]  # becomes the loss mask
        self.logprobs = [[0.0] * len(p) for p in prompts]
        self.spans: list[list[tuple[int, int]]] = [[] for _ in prompts]
        self.turn_start = [len(p) for p in prompts]
        self.n_prefill_tokens = self.n_decode_steps = 0

    def prefill(self, rows: list[int], n_new: list[int]) -> torch.Tensor:
        """Run each row's last n_new tokens through the model into its cache slots; logits (R, V) of the last.
        Right padding writes slots past a row's end that its later tokens overwrite, so callers keep
        start + max(n_new) <= max_len (true of prompts, and of rows that share one n_new)."""
        chunks = [self.tokens[b][len(self.tokens[b]) - n:] for b, n in zip(rows, n_new)]
        width = max(n_new)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in chunks], device=self.device)  # (R, width)
        starts = torch.tensor([len(self.tokens[b]) - n for b, n in zip(rows, n_new)], device=self.device)
        positions = starts[:, None] + torch.arange(width, device=self.device)  # (R, width)
        hidden = self.model(ids, positions, cache=self.cache, cache_rows=torch.tensor(rows, device=self.device))
        last = torch.tensor(n_new, device=self.device) - 1
        self.n_prefill_tokens += sum(n_new)
        return self.logits(hidden[torch.arange(len(rows), device=self.device), last])  # (R, V)

    def resume(self, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        """Prefill each row's last sampled token and its feedback: one call per length (UFO's feedback has one
        or two), so no padding reaches past a row near the end of its cache. The rows in order, logits (R, V)."""
        n_new = {b: len(self.tokens[b]) - self.spans[b][-1][1] + 1 for b in rows}
        groups = [[b for b in rows if n_new[b] == n] for n in sorted(set(n_new.values()))]
        return sum(groups, []), torch.cat([self.prefill(g, [n_new[b] for b in g]) for g in groups])

    def decode(self, rows: list[int]) -> torch.Tensor:
        """Feed each row's last sampled token; logits (R, V) for the next one."""
        ids = torch.tensor([[self.tokens[b][-1]] for b in rows], device=self.device)  # (R, 1)
        positions = torch.tensor([[len(self.tokens[b]) - 1] for b in rows], device=self.device)
        hidden = self.model(ids, positions, cache=self.cache, cache_rows=torch.tensor(rows, device=self.device))
        self.n_decode_steps += 1
        return self.logits(hidden[:, 0])  # (R, V)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, V) over the whole vocabulary: under tensor parallelism every rank gathers all ranks' columns,
        so each rank's sampler draws the same token with the same seed."""
        m = self.model
        return all_gather_vocab(m.logits(hidden), m.vocab_start, m.config.vocab_size, m.tp)

    def append(self, b: int, tokens: list[int], logprobs: list[float] | None = None) -> None:
        """Extend row b: sampled tokens (with their log-probs, loss mask 1) or given ones (mask 0)."""
        self.tokens[b] += tokens
        self.sampled[b] += [0.0 if logprobs is None else 1.0] * len(tokens)
        self.logprobs[b] += logprobs or [0.0] * len(tokens)

    def rollout(self) -> Rollout:
        lengths = [len(t) for t in self.tokens]
        width = max(lengths)
        pad = lambda rows, value: [r + [value] * (width - len(r)) for r in rows]  # noqa: E731
        return Rollout(torch.tensor(pad(self.tokens, 0)), torch.tensor(lengths),
                       torch.tensor(pad(self.sampled, 0.0)), torch.tensor(pad(self.logprobs, 0.0)),
                       self.spans, self.n_prefill_tokens, self.n_decode_steps)


def _check(prompts: list[list[int]], max_len: int, max_turns: int, max_new_tokens: int) -> None:
    if max_turns < 1 or max_new_tokens < 1:
        raise ValueError(f"max_turns and max_new_tokens must be >= 1, got {max_turns}, {max_new_tokens}")
    for b, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {b} is empty")
        if len(prompt) > max_len:
            raise ValueError(f"prompt {b} has {len(prompt)} tokens, more than max_len={max_len}")


@torch.no_grad()
def generate(model: Qwen2, prompts: list[list[int]], next_turn: NextTurn, *, max_turns: int, max_new_tokens: int,
             stop_ids: list[int], temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             max_len: int | None = None, feedback_len: int = 32) -> Rollout:
    """Sample up to max_turns attempts per prompt (see the module docstring); greedy when temperature == 0.

    next_turn gets the rows whose attempt just ended, each attempt's sampled tokens (its stop token
    included) and whether it ended on a stop token; it is called after every attempt, the last one
    included. max_len (default: the longest prompt + max_turns attempts + feedback_len tokens per feedback
    turn, at most the model's max_position_embeddings) bounds each row: an attempt that reaches it ends,
    feedback that leaves no room ends the row."""
    if not prompts:
        empty = torch.zeros(0, 0)
        return Rollout(empty.long(), torch.zeros(0, dtype=torch.long), empty, empty, [], 0, 0)
    max_len = max_len or min(max(map(len, prompts)) + max_turns * max_new_tokens + (max_turns - 1) * feedback_len,
                             model.config.max_position_embeddings)  # never past the context the model knows
    _check(prompts, max_len, max_turns, max_new_tokens)
    convs, stop, B = _Conversations(model, prompts, max_len), set(stop_ids), len(prompts)

    def end_turns(rows: list[int]) -> list[int]:
        """Close the rows' attempts, ask next_turn, append the feedback; the rows that go on."""
        responses = [convs.tokens[b][convs.turn_start[b]:] for b in rows]
        stopped = [bool(r) and r[-1] in stop for r in responses]
        replies = next_turn(rows, responses, stopped)
        if len(replies) != len(rows):
            raise ValueError(f"next_turn returned {len(replies)} replies for {len(rows)} rows")
        going = []
        for b, reply in zip(rows, replies):
            convs.spans[b].append((convs.turn_start[b], len(convs.tokens[b])))
            if reply is None or len(convs.spans[b]) >= max_turns or len(convs.tokens[b]) + len(reply) >= max_len:
                continue  # episode over, out of turns, or no room left to sample after the feedback
            convs.append(b, list(reply))
            convs.turn_start[b] = len(convs.tokens[b])
            going.append(b)
        return going

    logits = convs.prefill(list(range(B)), [len(p) for p in prompts])  # (B, V)
    ready = [b for b in range(B) if len(prompts[b]) < max_len]
    logits = logits[torch.tensor(ready, dtype=torch.long, device=logits.device)]
    full = [b for b in range(B) if len(prompts[b]) == max_len]
    if full:  # a prompt that fills max_len leaves no room: its one attempt is empty
        end_turns(full)
    step = 0
    while ready:
        noise_ids = torch.tensor(ready, device=logits.device) + step * B  # a stream per (step, row)
        tokens, logprobs = sample(logits, temperature, top_p, seed, noise_ids)
        step += 1
        ended, going = [], []
        for b, token, logprob in zip(ready, tokens.tolist(), logprobs.tolist()):
            convs.append(b, [token], [logprob])
            over = (token in stop or len(convs.tokens[b]) - convs.turn_start[b] >= max_new_tokens
                    or len(convs.tokens[b]) >= max_len)
            (ended if over else going).append(b)
        ready, parts = [], []
        if going:
            parts.append(convs.decode(going))
            ready += going
        resumed = end_turns(ended) if ended else []
        if resumed:  # the last sampled token goes in with the feedback
            resumed, resumed_logits = convs.resume(resumed)
            parts.append(resumed_logits)
            ready += resumed
        logits = torch.cat(parts) if parts else logits[:0]
    return convs.rollout()
