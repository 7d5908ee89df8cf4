"""Micro-batches: the rows of a right-padded batch (B, T) split into forwards of at most a token budget, and
the map between one forward's hidden rows and the batch's tokens. Every trainer forward goes through here:
the no-grad scoring forwards (old log-probs, values, self-certainty) and the update's.

    for forward in micro_batches(tokens, lengths, budget=4096, packed=True, spans=rollout.turn_spans):
        hidden = forward.hidden(model)     # (N, H): hidden row n predicts token forward.targets[n]
        old = forward.take(old_logp)       # a token-aligned (B, T) array at the predicted tokens, (N,)
        forward.put(logp, into=out)        # a per-row statistic (N,) onto the tokens it belongs to, out (B, T)

Row b's first lengths[b] tokens are its trajectory. Packed, a forward holds its trajectories end to end as
one sequence (positions restart at 0 in each, and attention stays within each), so no padding token is
computed; a trajectory's last token predicts nothing (target -100). Padded, a forward holds its rows cut to
the longest of them and every position but the last predicts the next token, padding included (the loss
mask is 0 there). The hidden state at position i-1 predicts token i, so a statistic lands on token i and
each row's first token gets none. Given the rows' spans of scored tokens (the rollout's turn spans: the sampled
tokens, where every loss, old log-prob, value and KL is read), a forward keeps only the hidden rows that
predict one: the trunk reads every token, the LM head (a V-column matmul, the costliest part of a small model's
forward at Qwen's 151,936 columns) and the statistics run on the scored rows alone. The spans are host lists,
so the rows are chosen without reading anything back from the device.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_micro_batches.py
"""
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch

from nanoufo.model import Qwen2, to_device

IGNORE = -100  # the target of a hidden row that predicts nothing


def split_rows(lengths: list[int], budget: int, padded: bool = False,
               key: str = "micro_batch_tokens") -> list[list[int]]:
    """Split rows (in order) into runs of at most `budget` tokens (0: one run of all): the sum of their
    lengths when packed, rows x the longest when padded.

    A row longer than the budget cannot be split (its tokens attend to each other): ValueError naming key."""
    if budget <= 0:
        return [list(range(len(lengths)))] if lengths else []
    if lengths and max(lengths) > budget:
        raise ValueError(f"config: {key}={budget} is smaller than the longest trajectory ({max(lengths)} "
                         f"tokens); raise {key} to at least {max(lengths)}")
    runs, current, used, longest = [], [], 0, 0
    for i, n in enumerate(lengths):
        cost = (len(current) + 1) * max(longest, n) if padded else used + n
        if current and cost > budget:
            runs.append(current)
            current, used, longest = [], 0, 0
        current.append(i)
        used, longest = used + n, max(longest, n)
    return runs + [current] if current else runs


@dataclass
class MicroBatch:
    """One forward over some rows of a (B, T) batch, and where its N hidden rows' predictions belong."""
    inputs: torch.Tensor  # (1, N) packed or (b, t) padded: the token ids the model reads
    positions: torch.Tensor | None  # (1, N) packed, from 0 in each trajectory; None padded (0..t-1 in each row)
    seq_lens: list[int] | None  # the packed trajectories' lengths; None padded
    following: torch.Tensor  # (N,) flat index into (B * T) of the token each hidden row predicts
    predicts: torch.Tensor  # (N,) bool, False where a hidden row predicts nothing (a packed trajectory's end)
    targets: torch.Tensor  # (N,) int64 token ids, IGNORE where nothing is predicted
    keep: torch.Tensor | None = None  # (N,) the trunk's output rows kept (those predicting a scored token); None: all

    @property
    def n_computed(self) -> int:
        """Tokens the forward computes, padding included."""
        return self.inputs.numel()

    def hidden(self, model: Qwen2) -> torch.Tensor:
        """The hidden states (N, H) that predict the targets."""
        if self.seq_lens is None:
            out = model(self.inputs)[:, :-1].flatten(0, 1)  # the model knows the layout without a device read
        else:
            out = model(self.inputs, self.positions, seq_lens=self.seq_lens)[0]
        return out if self.keep is None else out[self.keep]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A token-aligned (B, T) array's entries at the predicted tokens, (N,) (0 where nothing is predicted)."""
        return x.reshape(-1)[self.following].masked_fill(~self.predicts, 0)

    def put(self, stat: torch.Tensor, into: torch.Tensor) -> None:
        """Write a per-row statistic (N,) onto the tokens its rows predict, in `into` (B, T) (contiguous)."""
        into.view(-1).index_put_((self.following,), stat.masked_fill(~self.predicts, 0))


def micro_batches(tokens: torch.Tensor, lengths: list[int], budget: int, packed: bool = True,
                  spans: list[list[tuple[int, int]]] | None = None) -> list[MicroBatch]:
    """The rows of tokens (B, T), in order, in forwards of at most budget tokens (split_rows; 0: one forward).
    lengths are host ints, and so are spans (per row the [start, end) of its scored tokens, which keep only the
    hidden rows that predict one: the module doc): a forward's index arrays are built on the host and copied in
    one go, without a sync (a padded forward over every row builds its own on the device: no copy)."""
    return [_micro_batch(tokens, run, [lengths[b] for b in run], packed, spans and [spans[b] for b in run])
            for run in split_rows(lengths, budget, padded=not packed)]


def _micro_batch(tokens: torch.Tensor, rows: list[int], lengths: list[int], packed: bool,
                 spans: list[list[tuple[int, int]]] | None) -> MicroBatch:
    """The forward over consecutive rows (split_rows' runs) with their lengths (and spans of scored tokens)."""
    T, t, device = tokens.shape[1], max(lengths), tokens.device
    starts = [b * T for b in rows]  # each row's first token in the flat (B * T) tokens
    host = {}  # index arrays built here, copied to the device in one go
    if packed:
        host["read"] = torch.cat([torch.arange(n) + s for s, n in zip(starts, lengths)])  # (N,) the tokens read
        host["positions"] = torch.cat([torch.arange(n) for n in lengths])  # (N,)
    if spans is not None:  # token p of a row is predicted by hidden row (the row's first hidden row) + p - 1
        firsts = list(accumulate(lengths[:-1], initial=0)) if packed else [j * (t - 1) for j in range(len(rows))]
        scored = [(s, first, torch.arange(a, e)) for s, first, row_spans in zip(starts, firsts, spans)
                  for a, e in row_spans if e > a] or [(0, 0, torch.zeros(0, dtype=torch.long))]  # none: (0,)
        host["keep"] = torch.cat([first + p - 1 for _, first, p in scored])  # (M,) hidden rows kept
        host["following"] = torch.cat([s + p for s, _, p in scored])  # (M,)
    elif packed:  # a trajectory's last hidden row predicts nothing: it points at its row's first token
        host["following"] = torch.cat([torch.cat([torch.arange(1, n), torch.zeros(1, dtype=torch.long)]) + s
                                       for s, n in zip(starts, lengths)])  # (N,)
        host["predicts"] = torch.cat([torch.arange(n) < n - 1 for n in lengths]).long()  # (N,)
    sizes = [len(x) for x in host.values()]
    moved = dict(zip(host, to_device(torch.cat(list(host.values())), device).split(sizes))) if host else {}
    if packed:
        inputs, positions, seq_lens = tokens.reshape(-1)[moved["read"]][None], moved["positions"][None], lengths
    else:  # (b, t): the rows cut to the longest
        inputs, positions, seq_lens = tokens[rows[0]:rows[-1] + 1, :t], None, None
    following = moved["following"] if "following" in moved else (
        torch.arange(rows[0], rows[-1] + 1, device=device)[:, None] * T + torch.arange(1, t, device=device)).flatten()
    predicts = moved["predicts"].bool() if "predicts" in moved else torch.ones_like(following, dtype=torch.bool)
    targets = tokens.reshape(-1)[following].masked_fill(~predicts, IGNORE)
    return MicroBatch(inputs, positions, seq_lens, following, predicts, targets, moved.get("keep"))


def span_lengths(spans: list[list[tuple[int, int]]]) -> list[int]:
    """Each row's tokens up to and including its last scored token (1 for a row without any), from its spans:
    what rl.trajectory_lengths reads from a loss mask, without reading the device."""
    return [max((e for a, e in row if e > a), default=1) for row in spans]


def one_forward(tokens: torch.Tensor, lengths: list[int] | None) -> list[MicroBatch]:
    """Every row in one forward: packed when lengths (host ints) are given, else padded."""
    return micro_batches(tokens, lengths or [tokens.shape[1]] * len(tokens), 0, packed=lengths is not None)


def on_tokens(stats_of: Callable[[MicroBatch], tuple[torch.Tensor, ...]], forwards: list[MicroBatch],
              shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """stats_of(forward) -> per-row statistics (N,) of each forward, written onto the tokens its rows predict:
    (B, T) each, 0 on each row's first token and where nothing was computed."""
    outs = None
    for forward in forwards:
        stats = stats_of(forward)
        outs = outs or tuple(s.new_zeros(shape) for s in stats)
        for stat, out in zip(stats, outs, strict=True):
            forward.put(stat, out)
    return outs
