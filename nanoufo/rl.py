"""The RL maths as small pure functions on tensors; nanoufo/trainer.py calls them
and tests/test_rl.py checks each against hand-computed cases.

Conventions: a batch is B right-padded trajectories of T tokens; `mask` (B, T) is 1 on tokens the policy
sampled (the loss mask) and 0 on the prompt, the feedback turns and the padding. Per-token arrays are
aligned with the tokens: entry i belongs to token i (whose log-prob comes from the hidden state at i-1).
"""
import torch
import torch.distributed as dist

from nanoufo.kernels.ppo_loss import LOG_RATIO_CLAMP
from nanoufo.parallel import all_reduce_


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the masked entries (along dim, or all of them); 0 where the mask holds none."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population variance); unmasked entries become 0. With a
    data-parallel `group` the moments are those of every rank's entries together (sums all-reduced), so
    DP ranks whiten as one process holding the whole batch would."""
    m = mask.to(x.dtype)
    sums = all_reduce_(torch.stack([(x * m).sum(), m.sum()]), group)  # (2,): sum, count
    count = sums[1].clamp(min=1)
    mean = sums[0] / count
    var = all_reduce_(((x - mean) ** 2 * m).sum(), group) / count
    return (x - mean) * torch.rsqrt(var + eps) * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the sampled tokens of each trajectory.

    rewards, values, mask: (B, T). Tokens outside the mask (feedback turns in between attempts) are not
    actions: they are skipped, so the step after an attempt's last token is the next attempt's first
    token. Returns (advantages, returns), both (B, T) and zero outside the mask.

    Vectorised (a handful of ops whatever T): each row's action tokens are moved to the front in order,
    delta_t = r_t + gamma V_{t+1} - V_t is taken there, and A_t = sum_k (gamma lam)^(k-t) delta_k is one
    matmul with the (T, T) upper-triangular matrix of discount powers, whose entries are all <= 1, so it
    stays exact for any gamma * lam (a reversed cumsum scaled by (gamma lam)^-t would overflow for long T).
    tests/test_rl.py checks it against the step-by-step loop."""
    B, T = rewards.shape
    m = (mask > 0).to(rewards.dtype)
    order = torch.sort((mask <= 0).to(torch.int8), dim=1, stable=True).indices  # (B, T) actions first, in order
    act = m.gather(1, order)  # (B, T) 1 on the first n_b columns of row b
    v, r = values.to(rewards.dtype).gather(1, order) * act, rewards.gather(1, order) * act  # (B, T)
    next_v = torch.cat([v[:, 1:], v.new_zeros(B, 1)], dim=1)  # 0 past each row's last action
    delta = (r + gamma * next_v - v) * act  # (B, T)
    steps = torch.arange(T, device=rewards.device, dtype=rewards.dtype)
    ahead = steps[None, :] - steps[:, None]  # (T, T) k - t
    discount = torch.where(ahead >= 0, (gamma * lam) ** ahead.clamp(min=0), 0.0)  # (T, T)
    adv = (delta @ discount.T) * act  # (B, T)
    advantages = torch.zeros_like(rewards).scatter(1, order, adv)
    returns = (advantages + values) * m
    return advantages, returns


def loss_weights(mask: torch.Tensor, aggregation: str, chunk_rows: int = 4) -> torch.Tensor:
    """Per-token weights (B, T) that turn per-token losses into the aggregated loss: sum(w * loss).

    Computed over a whole PPO minibatch and then split with its rows (nanoufo/packing.py), they make
    the sum of the micro-batches' losses equal the minibatch's loss, so accumulated gradients equal the
    one-shot ones. "token-mean": 1 / (tokens in the minibatch) on every token; "seq-mean-token-mean" (or its
    short name "seq-mean"): each row's token-mean averaged over the rows that hold tokens, i.e.
    1 / (row's tokens * rows with tokens); "chunk-token-mean": the token-mean of each chunk of chunk_rows
    consecutive rows (the last may be shorter) averaged over the chunks, i.e. 1 / (chunk's tokens * chunks),
    as verl's token-mean over micro-batches of chunk_rows sequences divided by the accumulation steps (Intuitor's
    runs: chunks of 4). Zero outside the mask; a mask without tokens gives zeros."""
    assert aggregation in ("token-mean", "seq-mean", "seq-mean-token-mean", "chunk-token-mean"), aggregation
    m = (mask > 0).to(torch.float32)
    if aggregation == "token-mean":
        return m / m.sum().clamp(min=1)
    if aggregation == "chunk-token-mean":
        chunk = torch.arange(m.shape[0], device=m.device) // chunk_rows  # (B,) each row's chunk
        n_chunks = chunk_count(m.shape[0], chunk_rows)
        per_chunk = torch.zeros(n_chunks, device=m.device).index_add_(0, chunk, m.sum(1))  # (n_chunks,)
        return m / per_chunk[chunk, None].clamp(min=1) / max(n_chunks, 1)
    per_row = m.sum(1, keepdim=True)  # (B, 1)
    return m / per_row.clamp(min=1) / (per_row > 0).sum().clamp(min=1)


def chunk_count(rows: int, chunk_rows: int) -> int:
    """The chunks of chunk-token-mean in a minibatch of `rows` rows (the DP scale of its weights counts them)."""
    return -(-rows // chunk_rows)


def trajectory_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including each row's last sampled token, (B,): the rest is padding (or nothing a
    loss reads), so a forward may stop there. A row without sampled tokens gets 1."""
    T = mask.shape[1]
    return (T - (mask > 0).to(torch.int8).flip(1).argmax(1)).where(mask.gt(0).any(1), 1)


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps) for scores (B,) laid out group after group; the std is the
    sample std (n - 1), as in the GRPO papers' reference code."""
    assert scores.numel() % group_size == 0, (scores.numel(), group_size)
    groups = scores.view(-1, group_size)  # (B / G, G)
    normalized = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    return normalized.flatten()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1",
               clamp: float | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi: k1 = logp - ref, k3 = e^(ref-logp) - (ref-logp) - 1,
    k3 capped at clamp when given (verl's low_var_kl clamps it to [-10, 10]; k3 >= 0, so only the top acts)."""
    assert estimator in ("k1", "k3"), estimator
    if estimator == "k1":
        return logp - ref_logp
    log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # keeps exp finite for far-off tokens
    k3 = torch.exp(log_ratio) - log_ratio - 1.0
    return k3 if clamp is None else k3.clamp(max=clamp)


def sequence_self_certainty(token_sc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Intuitor's score (B,): the mean self-certainty over each trajectory's sampled tokens; token_sc (B, T)
    aligned with the tokens (see nanoufo/packing.py), mask (B, T)."""
    return masked_mean(token_sc, mask, dim=1)


def place_rewards(mask: torch.Tensor, episode_rewards: torch.Tensor | None = None,
                  turn_rewards: list[list[float]] | None = None,
                  turn_spans: list[list[tuple[int, int]]] | None = None,
                  point_rewards: list[list[tuple[int, float]]] | None = None) -> torch.Tensor:
    """Token-level rewards (B, T), zero except at reward points.

    "last": pass episode_rewards (B,): each total goes on the trajectory's last sampled token.
    "per_turn": pass turn_rewards (one list per trajectory) and turn_spans ([start, end) token span of
    each attempt): each turn's reward goes on that attempt's last token (end - 1).
    "per_step": pass point_rewards, (token index, reward) pairs per trajectory (a PRM's steps' last tokens,
    see step_rewards): each reward is added on its token, which must be a sampled one."""
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if point_rewards is not None:
        for b, points in enumerate(point_rewards):
            for index, value in points:
                if not mask[b, index]:
                    raise ValueError(f"place_rewards: trajectory {b}: token {index} was not sampled")
                rewards[b, index] += value
        return rewards
    if episode_rewards is not None:
        if not bool(mask.any(1).all()):
            raise ValueError(f"place_rewards: trajectory {int((~mask.any(1)).nonzero()[0])} has no sampled token")
        rows = torch.arange(mask.shape[0], device=mask.device)
        rewards[rows, trajectory_lengths(mask) - 1] = episode_rewards.to(rewards)  # on each last sampled token
        return rewards
    if turn_rewards is None or turn_spans is None:
        raise ValueError("place_rewards: pass episode_rewards, or turn_rewards with turn_spans")
    for b, (values, spans) in enumerate(zip(turn_rewards, turn_spans, strict=True)):
        if len(values) != len(spans):
            raise ValueError(f"place_rewards: trajectory {b} has {len(values)} turn rewards but {len(spans)} turns")
        for value, (start, end) in zip(values, spans):
            rewards[b, end - 1] += value
    return rewards


def step_rewards(scores: list[float], how: str) -> list[float]:
    """Per-step rewards that sum to the response's aggregate PRM score ("min" or "product" of its step
    scores): step k gets the change it makes to the running aggregate of steps 0..k, step 0 its own score.
    A step that leaves the aggregate alone earns 0 and one that lowers it is charged what it took, so the
    return from the first token is the aggregate however many steps there are (raw step scores placed as
    rewards would pay for writing more steps)."""
    assert how in ("min", "product"), "checked by nanoufo.config.validate"
    rewards, running = [], None
    for score in scores:
        now = score if running is None else min(running, score) if how == "min" else running * score
        rewards.append(now - (running or 0.0))
        running = now
    return rewards


def group_filter(scores: torch.Tensor, group_size: int, keep_groups: int) -> torch.Tensor:
    """Indices (into scores (B,)) of the episodes of the keep_groups groups with the largest reward spread.

    Groups are contiguous runs of group_size; the spread is the population std within a group, and ties
    keep the earlier group. Kept groups stay in their original order."""
    n_groups = scores.numel() // group_size
    assert scores.numel() % group_size == 0 and 0 < keep_groups <= n_groups, (scores.numel(), group_size, keep_groups)
    spread = scores.view(n_groups, group_size).float().std(1, unbiased=False)  # (n_groups,)
    order = torch.sort(-spread, stable=True).indices[:keep_groups]
    kept = order.sort().values  # (keep_groups,)
    return (kept[:, None] * group_size + torch.arange(group_size, device=scores.device)).flatten()
