"""KV-cached, batched, multi-turn sampling with continuous batching: each episode is one conversation on one
row of a preallocated KV cache, and a row whose episode ends takes the next waiting episode.

    from nanoufo.sampler import SamplingOptions, generate
    sampling = SamplingOptions(max_new_tokens=512, temperature=1.0, top_p=1.0, kv_budget_gb=40)
    rollout = generate(model, prompts, next_turn, sampling, max_turns=5, stop_ids=env.stop_ids, seed=0)

The number of cache rows comes from the KV budget (default: one per episode), so the KV memory is bounded
whatever the number of episodes. Prompts are prefilled in right-padded batches as rows free up; a token's
position is its cache slot. Each decode step samples one token for every row whose turn is open
(nanoufo/decode.py: the state lives on the device, the step reads nothing from the host). A turn ends on
a stop token, after max_new_tokens, or at the context limit max_len. Every `sync_every` steps at most (and
exactly when the first row can reach a token limit) the host polls which rows ended: their attempts go to
`next_turn(rows, responses, ended_with_stop)` (rows are episode indices), which answers per episode with
the tokens of the next user turn (feedback, template headers) or None to end it. Feedback is prefilled into
the same row (one batched call per length), so a row keeps its cache across its own turns and the history
is never prefilled twice. A row that is no longer live leaves the batch at the next poll.

A turn's last sampled token is kept out of the cache until the row's next forward (decode or feedback
prefill), so a row that ends never pays for it. Sampling is kernels/sampling.py with noise keyed by
(episode id, token index): same seed, same episode, same tokens, whatever shares the batch, on every
tensor-parallel rank. With cuda_graphs=True each decode step is a CUDA graph replay (nanoufo/cuda_graphs.py),
captured once per run when the caller keeps the decoder between calls (Decoders): a run varies its episode
ids from rollout to rollout, not its seed, which the graphs hold.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_sampler.py tests/test_batching.py
"""
import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from nanoufo.cuda_graphs import CaptureFailed, DecodeGraphs, bucket_for, buckets_for_rows, graphs_wanted
from nanoufo.decode import MAX_EPISODE_TOKENS, Decoder, Sampling, kv_bytes_per_row
from nanoufo.model import Qwen2, to_device
from nanoufo.options import SamplingOptions
from nanoufo.parallel import print0

NextTurn = Callable[[list[int], list[list[int]], list[bool]], list[list[int] | None]]
SYNC_EVERY = 8  # decode steps between two stop checks at most
FEEDBACK_TOKENS = 32  # the allowance per feedback turn of the default max_len (UFO's feedback is a few tokens)


@dataclass
class Rollout:
    """B trajectories (prompt, attempt, feedback, attempt, ...) as right-padded tensors on the CPU.

    logprobs are the sampler's log-probs of its tokens under the temperature-scaled distribution, NOT the
    top-p-truncated one (greedy: temperature 1), which is what a trainer's forward recomputes. Every tensor
    field holds one entry per row (2-D ones one per token too) and every list field one item per row, in a
    subclass too (nanoufo/trainer.py's Scored), so rows, to and cat_rows carry them all."""
    tokens: torch.Tensor  # (B, T) int64, 0 after each row's length
    lengths: torch.Tensor  # (B,) int64
    loss_mask: torch.Tensor  # (B, T) fp32, 1 exactly on sampled tokens (attempt content + its stop token)
    logprobs: torch.Tensor  # (B, T) fp32, 0 where loss_mask is 0
    turn_spans: list[list[tuple[int, int]]]  # per row, [start, end) of each attempt's sampled tokens
    n_prefill_tokens: int  # tokens that went through prefill (prompts, and feedback with the token before it)
    n_decode_steps: int  # single-token forward calls
    n_decode_rows: int = 0  # rows decoded, summed over the decode steps (padding left out)
    n_cache_rows: int = 0  # KV-cache rows the episodes shared (the spare row left out)
    n_graph_replays: int = 0  # decode steps that were CUDA graph replays (the rest ran eagerly)
    temperature: float = 1.0  # the temperature `logprobs` are under, which the trainer's forwards use too

    def _map(self, tensor_fn, list_fn) -> "Rollout":
        """The same rollout (its own class) with tensor_fn applied to each tensor field, list_fn to each list."""
        out = {}
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            out[f.name] = tensor_fn(x) if isinstance(x, torch.Tensor) else list_fn(x) if isinstance(x, list) else x
        return type(self)(**out)

    def to(self, device) -> "Rollout":
        return self._map(lambda x: x.to(device), lambda x: x)

    def rows(self, index: list[int]) -> "Rollout":
        """Rows index of the rollout (in that order), cut to the longest of them; the counters kept."""
        T = int(self.lengths[index].max())  # one read, not one per row

        def pick(x: torch.Tensor) -> torch.Tensor:
            picked = x[torch.tensor(index, device=x.device)]
            return picked[:, :T] if picked.dim() == 2 else picked

        return self._map(pick, lambda x: [x[i] for i in index])


def cat_rows(parts: list[Rollout]) -> Rollout:
    """The rows of several rollouts in one, right-padded to the longest (the first part's counters kept)."""
    T = max(p.tokens.shape[1] for p in parts)
    pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1])) if x.dim() == 2 else x  # noqa: E731

    def joined(name: str):
        first = getattr(parts[0], name)
        if isinstance(first, torch.Tensor):
            return torch.cat([pad(getattr(p, name)) for p in parts])
        return [x for p in parts for x in getattr(p, name)] if isinstance(first, list) else first

    return type(parts[0])(**{f.name: joined(f.name) for f in dataclasses.fields(parts[0])})


@dataclass
class _Conversation:
    """One episode on the host, as the sampler builds it: its tokens, which of them were sampled (the loss
    mask) with their log-probs, the [start, end) spans of its ended attempts and where the open one starts."""
    tokens: list[int]
    sampled: list[float]
    logprobs: list[float]
    spans: list[tuple[int, int]]
    turn_start: int

    @classmethod
    def opening(cls, prompt: list[int]) -> "_Conversation":
        return cls(list(prompt), [0.0] * len(prompt), [0.0] * len(prompt), [], len(prompt))

    def append(self, tokens: list[int], logprobs: list[float] | None = None) -> None:
        """Sampled tokens (with their log-probs, loss mask 1) or given ones (mask 0)."""
        self.tokens += tokens
        self.sampled += [0.0 if logprobs is None else 1.0] * len(tokens)
        self.logprobs += logprobs or [0.0] * len(tokens)


def _rollout(conversations: list[_Conversation], *counts: int, temperature: float) -> Rollout:
    width = max(len(c.tokens) for c in conversations)
    pad = lambda rows, value: [r + [value] * (width - len(r)) for r in rows]  # noqa: E731
    return Rollout(torch.tensor(pad([c.tokens for c in conversations], 0)),
                   torch.tensor([len(c.tokens) for c in conversations]),
                   torch.tensor(pad([c.sampled for c in conversations], 0.0)),
                   torch.tensor(pad([c.logprobs for c in conversations], 0.0)), [c.spans for c in conversations],
                   *counts, temperature=temperature)


def episode_max_len(prompt_len: int, max_turns: int, max_new_tokens: int,
                    feedback_len: int = FEEDBACK_TOKENS) -> int:
    """The longest an episode can grow: its prompt, every attempt, and a feedback turn between two attempts."""
    return prompt_len + max_turns * max_new_tokens + (max_turns - 1) * feedback_len


def run_max_len(max_prompt_tokens: int, max_turns: int, max_new_tokens: int, feedback_len: int,
                context: int) -> int:
    """A run's max_len: the longest episode its limits allow (the longest prompt it admits, every attempt and
    the feedback between them), at most the model's context. Fixed for the run, unlike the default of
    generate(), which follows each batch's longest prompt: a longer cache would mean a new decoder and new
    CUDA graphs whenever a longer prompt arrives."""
    return min(episode_max_len(max_prompt_tokens, max_turns, max_new_tokens, feedback_len), context)


def budget_rows(kv_budget_bytes: int, row_bytes: int) -> int:
    """Cache rows a KV budget holds for episodes: the spare row (padding) counts against the budget too."""
    return kv_budget_bytes // row_bytes - 1


def rows_for_budget(model: Qwen2, n_episodes: int, max_len: int, kv_budget_bytes: int | None) -> int:
    """Cache rows for the episodes: one each without a budget, else as many as fit next to the spare row."""
    if kv_budget_bytes is None:
        return n_episodes
    per_row = kv_bytes_per_row(model, max_len)
    rows = budget_rows(kv_budget_bytes, per_row)
    if rows < 1:
        raise ValueError(f"KV budget of {kv_budget_bytes:,} bytes holds no episode: a row of max_len={max_len} "
                         f"tokens takes {per_row:,} bytes and the sampler needs 2 rows (one episode + the spare)")
    return min(rows, n_episodes)


class Decoders:
    """The decoder of a run (its static buffers, KV cache included) and its CUDA graphs, kept between
    generate() calls so that the graphs are captured once and every later rollout replays them. A call reuses
    them when its sampling (temperature, top-p, seed: values a graph holds) and stop ids are the same, its
    max_len fits the cache and the cache has the rows the call would get; otherwise the old decoder is dropped
    and a new one built (and captured) with the longer of the two lengths: a run passes one max_len to every
    call (run_max_len) so that this never happens. The cache stays allocated between calls: with cuda_graphs,
    nanoufo/plan.py counts it in every phase of a step.

    Counted for the run's log: captures (bucket graphs recorded) and capture_failures. A failed capture leaves
    the decoder eager, says so once when it happens (failure holds the reason) and, with required=True (an
    explicit cuda_graphs=true), raises CaptureFailed instead, on every tensor-parallel rank alike.

        decoders = Decoders(required=cfg.cuda_graphs == "true")   # train.py: one per run
        generate(model, prompts, next_turn, sampling, ..., max_len=run_max_len(...), decoders=decoders)
    """

    def __init__(self, required: bool = False):
        self.required = required
        self.decoder, self.graphs, self.buckets, self.key = None, None, None, None
        self.captures = self.capture_failures = 0
        self.failure: str | None = None  # why the last capture failed

    def get(self, model: Qwen2, n_episodes: int, max_len: int, sampling: Sampling, stop_ids: list[int],
            max_new_tokens: int, kv_budget_bytes: int | None, cuda_graphs: bool,
            buckets: list[int] | None) -> tuple[Decoder, DecodeGraphs | None, list[int] | None]:
        """(decoder, graphs or None, the buckets) for one generate() call, its limits set."""
        key = (model, sampling, sorted(set(stop_ids)), cuda_graphs, buckets)
        old = self.decoder if self.key == key else None
        if old is None or old.capacity < max_len or old.spare < rows_for_budget(model, n_episodes, old.capacity,
                                                                                kv_budget_bytes):
            capacity = max(max_len, old.capacity if old is not None else 0)
            self.decoder = self.graphs = None  # the old cache goes before the new one is allocated
            n_rows = rows_for_budget(model, n_episodes, capacity, kv_budget_bytes)
            self.buckets = buckets_for_rows(n_rows, buckets) if cuda_graphs or buckets is not None else None
            self.decoder = Decoder(model, n_rows, capacity, sampling, stop_ids, max_new_tokens,
                                   max(self.buckets or [0]))
            self.key = key
            if cuda_graphs:
                self.capture(model)
        self.decoder.live.zero_()  # no row is open between calls, whatever ended the last one
        self.decoder.set_limits(max_len, max_new_tokens)
        return self.decoder, self.graphs, self.buckets

    def capture(self, model: Qwen2) -> None:
        """The graphs of the new decoder's buckets, or a counted failure (raised when required)."""
        try:
            self.graphs = DecodeGraphs.capture(self.decoder.step, self.buckets, self.decoder.batch.device,
                                               model.par.tp_group)
        except CaptureFailed as e:
            self.capture_failures += 1
            self.failure = str(e)
            if self.required:
                raise
            print0(f"CUDA graph capture failed, decoding eagerly (cuda_graphs=auto): {e}")
            return
        self.captures += 0 if self.graphs is None else len(self.graphs.graphs)

    def stats(self) -> dict:
        """The run's graph counters for its log."""
        return dict(graph_captures=self.captures, graph_capture_failures=self.capture_failures)


class _Run:
    """One generate() call: rows, the waiting queue, the host's polls and the prefills."""

    def __init__(self, model: Qwen2, prompts: list[list[int]], next_turn: NextTurn, decoder: Decoder, *,
                 max_turns: int, stop_ids: list[int], episode_ids: list[int], buckets: list[int] | None,
                 graphs: DecodeGraphs | None, sync_every: int):
        self.model, self.next_turn, self.decoder, self.graphs = model, next_turn, decoder, graphs
        self.max_turns, self.stop, self.episode_ids = max_turns, set(stop_ids), episode_ids
        self.buckets, self.sync_every, self.max_len = buckets, sync_every, decoder.max_len
        self.conversations = [_Conversation.opening(p) for p in prompts]  # per episode
        self.waiting = deque(range(len(prompts)))
        self.free = list(range(decoder.spare))  # cache rows without an episode, lowest first
        self.episode_of: dict[int, int] = {}  # row -> episode
        self.to_resume: list[int] = []  # rows whose next attempt starts after their feedback is prefilled
        self.n_prefill_tokens = self.n_decode_steps = self.n_decode_rows = self.n_graph_replays = 0

    def on(self, row: int) -> _Conversation:
        """The conversation of the episode on a cache row."""
        return self.conversations[self.episode_of[row]]

    def run(self) -> Rollout:
        while True:
            self.admit()
            self.resume()
            rows = sorted(self.episode_of)
            if not rows:
                return _rollout(self.conversations, self.n_prefill_tokens, self.n_decode_steps, self.n_decode_rows,
                                self.decoder.spare, self.n_graph_replays,
                                temperature=self.decoder.sampling.temperature or 1.0)
            live, lengths = self.decoder.poll(rows)  # the stop check
            ended = [(r, n) for r, n, is_live in zip(rows, lengths, live) if not is_live]
            if ended:
                self.end_attempts(ended)
            else:
                self.decode([(r, n) for r, n in zip(rows, lengths)])

    def admit(self) -> None:
        """Waiting episodes into free rows; their prompts prefilled in one call and their first token sampled."""
        rows = []
        while self.free and self.waiting:
            e = self.waiting.popleft()
            if len(self.conversations[e].tokens) >= self.max_len:  # a prompt that fills max_len: an empty attempt
                self.end_turns([e])
                continue
            row = self.free.pop(0)
            self.episode_of[row] = e
            rows.append(row)
        if rows:
            self.begin(rows, [len(self.on(r).tokens) for r in rows])

    def resume(self) -> None:
        """Prefill each resumed row's last sampled token and its feedback: one call per length (UFO's feedback
        has one or two), so no padding reaches past a row near the end of its cache."""
        n_new = {r: len(self.on(r).tokens) - self.on(r).spans[-1][1] + 1 for r in self.to_resume}
        for n in sorted(set(n_new.values())):
            group = [r for r in self.to_resume if n_new[r] == n]
            self.begin(group, [n] * len(group))
        self.to_resume = []

    def begin(self, rows: list[int], n_new: list[int]) -> None:
        """Run each row's last n_new tokens through the model into its cache slots, then open its attempt.
        Right padding writes slots past a row's end that its later tokens overwrite, so callers keep
        start + max(n_new) <= max_len (true of prompts, and of rows that share one n_new)."""
        device, tokens = self.decoder.batch.device, [self.on(r).tokens for r in rows]
        width, starts = max(n_new), [len(t) - n for t, n in zip(tokens, n_new)]
        episodes = [self.episode_ids[self.episode_of[r]] for r in rows]
        ids = torch.tensor([t[len(t) - n:] + [0] * (width - n) for t, n in zip(tokens, n_new)])  # (R, width)
        per_row = torch.tensor([rows, starts, n_new, episodes, [len(t) for t in tokens]])  # (5, R)
        ids, (rows_t, starts_t, n_new_t, episodes_t, lengths_t) = to_device(ids, device), to_device(per_row, device)
        positions = starts_t[:, None] + torch.arange(width, device=device)  # (R, width)
        hidden = self.model(ids, positions, cache=self.decoder.cache, cache_rows=rows_t,
                            cache_len=max(starts) + width)  # (R, width, H)
        last = hidden[torch.arange(len(rows), device=device), n_new_t - 1]  # (R, H)
        self.n_prefill_tokens += sum(n_new)
        self.decoder.begin(rows_t, episodes_t, lengths_t, self.decoder.logits(last))

    def decode(self, rows: list[tuple[int, int]]) -> None:
        """Steps for the live rows (row, length) until the next stop check: sync_every at most, and no further
        than the first row that reaches its token limit or max_len."""
        limit = min(min(self.decoder.max_new_tokens - (n - self.on(r).turn_start), self.max_len - n) for r, n in rows)
        n_rows = len(rows)
        padded = n_rows if self.buckets is None else bucket_for(n_rows, self.buckets)
        self.decoder.set_batch([r for r, _ in rows], padded)
        for _ in range(min(self.sync_every, limit)):
            if self.graphs is not None:
                self.graphs.replay(padded)
                self.n_graph_replays += 1
            else:
                self.decoder.step(padded)
            self.n_decode_steps += 1
            self.n_decode_rows += n_rows

    def end_attempts(self, ended: list[tuple[int, int]]) -> None:
        """Read the ended attempts back, hand them to next_turn; free the rows of episodes that are over."""
        rows = [r for r, _ in ended]
        episodes = [self.episode_of[r] for r in rows]
        starts = [self.conversations[e].turn_start for e in episodes]
        for e, (tokens, logprobs) in zip(episodes, self.decoder.sampled(rows, starts, [n for _, n in ended])):
            self.conversations[e].append(tokens, logprobs)
        going = set(self.end_turns(episodes))
        for r, e in zip(rows, episodes):
            if e in going:
                self.to_resume.append(r)
            else:
                del self.episode_of[r]
                self.free.append(r)
        self.free.sort()

    def end_turns(self, episodes: list[int]) -> list[int]:
        """Close the episodes' attempts, ask next_turn, append the feedback; the episodes that go on."""
        conversations = [self.conversations[e] for e in episodes]
        responses = [c.tokens[c.turn_start:] for c in conversations]
        stopped = [bool(r) and r[-1] in self.stop for r in responses]
        replies = self.next_turn(episodes, responses, stopped)
        if len(replies) != len(episodes):
            raise ValueError(f"next_turn returned {len(replies)} replies for {len(episodes)} rows")
        going = []
        for e, c, reply in zip(episodes, conversations, replies):
            c.spans.append((c.turn_start, len(c.tokens)))
            if reply is None or len(c.spans) >= self.max_turns or len(c.tokens) + len(reply) >= self.max_len:
                continue  # episode over, out of turns, or no room left to sample after the feedback
            c.append(list(reply))
            c.turn_start = len(c.tokens)
            going.append(e)
        return going


def _check(prompts: list[list[int]], max_len: int, max_turns: int, max_new_tokens: int, episode_ids: list[int],
           sync_every: int, vocab_size: int) -> None:
    assert min(max_turns, max_new_tokens, sync_every) >= 1, "checked by the scripts' arguments"
    assert len(episode_ids) == len(prompts) and min(episode_ids, default=0) >= 0, "one id >= 0 per prompt"
    streams = 2**63 // (MAX_EPISODE_TOKENS * vocab_size)  # the kernel's noise offsets, id * 2^20 * V, fit int64
    if max(episode_ids, default=0) >= streams:
        raise ValueError(f"episode id {max(episode_ids)} is past the {streams:,} episodes the sampling noise "
                         f"holds at a vocabulary of {vocab_size}")
    if max_len > MAX_EPISODE_TOKENS:
        raise ValueError(f"max_len={max_len} is more than the sampler's {MAX_EPISODE_TOKENS} tokens per episode")
    for b, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {b} is empty")
        if len(prompt) > max_len:
            raise ValueError(f"prompt {b} has {len(prompt)} tokens, more than max_len={max_len}")


@torch.no_grad()
def generate(model: Qwen2, prompts: list[list[int]], next_turn: NextTurn, sampling: SamplingOptions, *,
             max_turns: int, stop_ids: list[int], seed: int = 0, max_len: int | None = None,
             feedback_len: int = FEEDBACK_TOKENS, episode_ids: list[int] | None = None,
             buckets: list[int] | None = None, sync_every: int = SYNC_EVERY,
             decoders: Decoders | None = None) -> Rollout:
    """Sample up to max_turns attempts per prompt (see the module docstring) as `sampling` says: at most
    max_new_tokens per attempt, greedy when temperature == 0, the KV cache bounded by kv_budget_gb (default:
    a row per episode), and with cuda_graphs one CUDA graph replay per decode step (CUDA only; the CPU and any
    failed capture decode eagerly).

    next_turn gets the episodes whose attempt just ended, each attempt's sampled tokens (its stop token
    included) and whether it ended on a stop token; it is called after every attempt, the last one
    included. max_len (default: the longest prompt + max_turns attempts + feedback_len tokens per feedback
    turn, at most the model's max_position_embeddings; a run passes its own, run_max_len) bounds each
    episode: an attempt that reaches it ends, feedback that leaves no room ends the episode. episode_ids
    (default 0..B-1) key the sampling noise. buckets (default with graphs: a doubling list) pad each decode
    batch to a bucket's size with the spare row. decoders (a Decoders) keeps the decoder and its CUDA graphs for
    the next call: captured once per run, not once per call. Each decode step is one graph replay with
    sampling.cuda_graphs "true", or "auto" on CUDA when decoders keeps them (a one-off call decodes eagerly
    rather than capture graphs it would replay for one rollout); the CPU decodes eagerly, and so does a failed
    capture unless decoders.required ("true" makes the call's own Decoders required). The rollout counts the
    steps that were replays."""
    if not prompts:
        empty = torch.zeros(0, 0)
        return Rollout(empty.long(), torch.zeros(0, dtype=torch.long), empty, empty, [], 0, 0,
                       temperature=sampling.temperature or 1.0)
    max_new_tokens = sampling.max_new_tokens
    max_len = max_len or run_max_len(max(map(len, prompts)), max_turns, max_new_tokens, feedback_len,
                                     model.config.max_position_embeddings)  # never past the context the model knows
    episode_ids = list(range(len(prompts))) if episode_ids is None else list(episode_ids)
    _check(prompts, max_len, max_turns, max_new_tokens, episode_ids, sync_every, model.config.vocab_size)
    graphs = graphs_wanted(sampling.cuda_graphs, model.lm_head_weight.device) and (
        decoders is not None or sampling.cuda_graphs == "true")
    decoders = decoders or Decoders(required=sampling.cuda_graphs == "true")
    decoder, graphs, buckets = decoders.get(model, len(prompts), max_len,
                                            Sampling(sampling.temperature, sampling.top_p, seed), stop_ids,
                                            max_new_tokens, sampling.kv_budget_bytes, graphs, buckets)
    return _Run(model, prompts, next_turn, decoder, max_turns=max_turns, stop_ids=stop_ids, episode_ids=episode_ids,
                buckets=buckets, graphs=graphs, sync_every=sync_every).run()
