"""One RL update, as functions train.py calls and tests can reach.

    cfg = parse_args(argv)   # the run's TrainConfig (nanoufo/config.py), checked once; read as it is
    scored, stats = score_rollout(cfg, actor, run_episodes(...), prm)
    batch, more_stats = build_batch(cfg, actor, critic, ref, scored)
    stats |= ppo_update(cfg, actor, critic, optimizers, batch, seed=step)

score_rollout turns a rollout's rewards into the ones the update learns from: the environment's (which the
rollout carries), Intuitor's self-certainty, or a process reward model's step scores (nanoufo/prm.py),
placed on the tokens. build_batch keeps the groups with the largest reward spread, recomputes the old
log-probs (and values, reference log-probs) with the trainer's own forward so the first PPO ratio is 1 up
to rounding (the update's fused head + loss sums in its own order), and computes advantages: GAE over the
critic's values (UFO PPO) or group-normalized scores (GRPO). ppo_update runs the PPO epochs over shuffled
minibatches and steps the optimizers with gradient clipping, skipping any update whose loss or gradients
are not finite so the weights never take a NaN. Every forward (scoring and update) runs in micro-batches of
at most cfg.micro_batch_tokens tokens, trajectories packed end to end; a minibatch's gradients accumulate
over its micro-batches with per-token loss weights of the whole minibatch (rl.loss_weights), so the step
equals the one-shot one.
"""
import dataclasses
import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss
from nanoufo.kernels.linear_token_stats import linear_token_stats
from nanoufo import rl
from nanoufo.config import TrainConfig
from nanoufo.model import Qwen2, to_device
from nanoufo.optim import adamw
from nanoufo.parallel import ParallelContext, all_ranks_true, clip_grad_norm_, dp_mean_scale
from nanoufo.sampler import Rollout, cat_rows


@dataclass
class Batch:
    """B trajectories of T tokens; every per-token array is aligned with `tokens` (entry i = token i)."""
    tokens: torch.Tensor  # (B, T) int64, right-padded
    mask: torch.Tensor  # (B, T) float, 1 on sampled tokens
    old_logp: torch.Tensor  # (B, T) trainer's log-probs before the update
    advantages: torch.Tensor  # (B, T)
    ref_logp: torch.Tensor | None = None  # (B, T) frozen reference, when a KL term is used
    old_values: torch.Tensor | None = None  # (B, T) critic, UFO PPO only
    returns: torch.Tensor | None = None  # (B, T) GAE targets for the critic

    def rows(self, index: torch.Tensor | slice, T: int | None = None) -> "Batch":
        """Rows index, cut to their first T tokens (all by default: a micro-batch's rows end by T)."""
        return Batch(**{k: None if x is None else x[index, :T] for k, x in vars(self).items()})


@dataclass
class PredictionRows:
    """The LM head's rows of one forward over tokens (B, T): hidden row n predicts one token, targets[n]
    (-100 where a packed row's last token predicts nothing). gather(x) takes a token-aligned (B, T) array's
    entries at the predicted tokens (N,) (0 where nothing is predicted); scatter(s) puts a per-row statistic
    (N,) back aligned with the tokens (B, T): 0 on each row's first token and on the padding."""
    hidden: torch.Tensor  # (N, H)
    targets: torch.Tensor  # (N,)
    gather: Callable[[torch.Tensor], torch.Tensor]
    scatter: Callable[[torch.Tensor], torch.Tensor]


def prediction_rows(model: Qwen2, tokens: torch.Tensor, lengths: list[int] | None = None) -> PredictionRows:
    """The hidden state at position i-1 predicts token i. Without lengths the rows are the padded (B, T - 1)
    positions; with lengths (host ints, row b's first lengths[b] tokens are its trajectory) the trajectories
    are packed end to end into one sequence, so no padding token is computed."""
    B, T = tokens.shape
    if lengths is None:  # positions 0..T-1 in every row: the model knows the layout without reading the device
        hidden = model(tokens)[:, :-1].reshape(B * (T - 1), -1)  # (N, H)
        return PredictionRows(hidden, tokens[:, 1:].reshape(-1), lambda x: x[:, 1:].reshape(-1),
                              lambda s: rl.shift_to_tokens(s.view(B, T - 1)))
    # packed: the N tokens' flat indices into (B * T), built on the host from the lengths and copied without a sync
    index = to_device(torch.cat([torch.arange(n) + b * T for b, n in enumerate(lengths)]), tokens.device)  # (N,)
    positions = to_device(torch.cat([torch.arange(n) for n in lengths]), tokens.device)  # (N,) from 0 in each
    is_last = torch.zeros(sum(lengths), dtype=torch.bool)  # (N,) a trajectory's last token predicts nothing
    is_last[torch.tensor(list(accumulate(lengths))) - 1] = True
    is_last = to_device(is_last, tokens.device)
    hidden = model(tokens.reshape(-1)[index][None], positions[None], seq_lens=lengths)[0]  # (N, H)
    following = (index + 1).clamp(max=B * T - 1)  # (N,) the flat index of the token each row predicts
    gather = lambda x: x.reshape(-1)[following].masked_fill(is_last, 0)  # noqa: E731

    def scatter(per_row: torch.Tensor) -> torch.Tensor:  # (N,) -> (B, T)
        rows = per_row.new_zeros(B * T).index_put((index,), per_row).view(B, T)  # (B, T) at the predicting position
        return rl.shift_to_tokens(rows[:, :-1])

    return PredictionRows(hidden, gather(tokens).masked_fill(is_last, -100), gather, scatter)


def sequence_stats(model: Qwen2, tokens: torch.Tensor, temperature: float, lengths: list[int] | None = None):
    """(logp, entropy, self_certainty) of every token under model, each (B, T) aligned with tokens (0 on
    each row's first token and past its length); packed when lengths are given (prediction_rows)."""
    rows = prediction_rows(model, tokens, lengths)
    stats = linear_token_stats(model.lm_head_input(rows.hidden), model.lm_head_weight, rows.targets, temperature,
                               vocab_start=model.vocab_start, group=model.par.tp_group,  # vocab-parallel under TP
                               vocab_size=model.config.vocab_size)  # known here: the backward need not sync for it
    return tuple(rows.scatter(s) for s in stats)


def sequence_values(critic: Qwen2, tokens: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """V(state before token i) aligned with token i, (B, T): the value head read at position i-1 (packed
    when lengths are given, as in sequence_stats)."""
    rows = prediction_rows(critic, tokens, lengths)
    values = critic.values(rows.hidden).masked_fill(rows.targets == -100, 0.0)  # (N,) 0 past each trajectory
    return rows.scatter(values)


def micro_batches(cfg: TrainConfig, lengths: list[int]) -> Iterator[tuple[slice, list[int] | None, int]]:
    """One forward each under cfg.micro_batch_tokens (padded rows count at the longest): (its run of rows,
    their lengths when packed or None when padded, the longest length)."""
    for run in rl.micro_batches(lengths, cfg.micro_batch_tokens, padded=not cfg.pack_sequences):
        sizes = lengths[run[0]:run[-1] + 1]  # runs are consecutive rows
        yield slice(run[0], run[-1] + 1), sizes if cfg.pack_sequences else None, max(sizes)


def in_micro_batches(cfg: TrainConfig, fn, tokens: torch.Tensor,
                     lengths: list[int]) -> tuple[torch.Tensor | None, ...]:
    """fn(tokens (b, t), lengths or None) -> (b, t) tensors (or None), run over micro-batches of rows (packed or
    padded as the config says) and put back together as (B, T) tensors, so the peak memory of no-grad scoring
    depends on cfg.micro_batch_tokens, not on the batch."""
    T = tokens.shape[1]
    parts = [fn(tokens[rows, :t], packed) for rows, packed, t in micro_batches(cfg, lengths)]
    pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))  # noqa: E731  (b, t) -> (b, T)
    # each output's parts, padded, in row order (the runs are consecutive rows)
    return tuple(None if out[0] is None else torch.cat([pad(x) for x in out]) for out in zip(*parts))


def score_rollout(cfg: TrainConfig, actor: Qwen2, rollout: Rollout, prm=None) -> tuple[Rollout, dict]:
    """The rollout with the scores (B,) and token rewards (B, T) the update learns from, on the actor's device,
    and the reward model's statistics. cfg.reward "gold" keeps the environment's, which the rollout carries;
    "self_certainty" scores each episode by its mean self-certainty under the actor (label-free); "prm" by
    the process reward model prm (a nanoufo.prm.PRMReward). The rewards are placed as cfg.reward_placement
    says: each score on the trajectory's last sampled token, each attempt's reward on its last token, or
    the PRM's step rewards on each step's last token."""
    rollout = rollout.to(actor.lm_head_weight.device)  # the sampler hands its tensors back on the CPU
    mask, stats = rollout.loss_mask.float(), {}  # (B, T)
    scores, rewards = rollout.scores.float(), rollout.rewards
    if cfg.reward == "self_certainty":
        with torch.no_grad():
            _, _, sc = in_micro_batches(cfg, lambda t, n: sequence_stats(actor, t, cfg.temperature, n),
                                        rollout.tokens, rl.trajectory_lengths(mask).tolist())
        scores = rl.sequence_self_certainty(sc, mask)
    elif cfg.reward == "prm":
        shaped = prm(rollout)
        scores = shaped.scores.to(mask.device)
        rewards = (rl.place_rewards(mask, point_rewards=shaped.step_points) if cfg.reward_placement == "per_step"
                   else rl.place_rewards(mask, turn_rewards=shaped.turn_rewards, turn_spans=rollout.turn_spans))
        stats = {"prm_score": shaped.prm_mean, "prm_unscored_attempts": shaped.unscored}
    if cfg.reward_placement == "last":
        rewards = rl.place_rewards(mask, episode_rewards=scores)
    return dataclasses.replace(rollout, scores=scores, rewards=rewards), stats


def dp_group_filter(cfg: TrainConfig, rollout: Rollout, par: ParallelContext) -> Rollout:
    """The group filter over the whole data-parallel batch: the keep_groups x dp_size groups with the largest
    reward spread among every rank's groups (in rank order), dealt out in equal shares of keep_groups, rank
    r taking the r-th; the rows travel between ranks. Returns this rank's rows."""
    B, n = len(rollout.scores), cfg.n_samples_per_problem
    everyone = [torch.empty_like(rollout.scores) for _ in range(par.dp_size)]
    dist.all_gather(everyone, rollout.scores.contiguous(), group=par.dp_group)
    kept = rl.group_filter(torch.cat(everyone), n, cfg.keep_groups * par.dp_size).tolist()  # indices into all rows
    here = range(par.dp_rank * B, (par.dp_rank + 1) * B)
    mine = dataclasses.replace(rollout, episodes=None).to("cpu")  # what travels: the tensors, no records
    rows = {g: mine.rows([g - here.start]) for g in kept if g in here}
    parts = [None] * par.dp_size
    dist.all_gather_object(parts, rows, group=par.dp_group)
    pool = {g: row for part in parts for g, row in part.items()}
    share = kept[par.dp_rank * cfg.keep_groups * n:(par.dp_rank + 1) * cfg.keep_groups * n]
    return cat_rows([pool[g] for g in share]).to(rollout.tokens.device)


def build_batch(cfg: TrainConfig, actor: Qwen2, critic: Qwen2 | None, ref: Qwen2 | None,
                rollout: Rollout) -> tuple[Batch, dict]:
    """Filter the groups, recompute old log-probs / values / reference log-probs, and compute advantages from
    a scored rollout (score_rollout): its scores (B,) and token rewards (B, T)."""
    rollout = rollout.to(actor.lm_head_weight.device)
    stats = {"score": rollout.scores.mean().item(),
             "score_std": rollout.scores.std().item() if len(rollout.scores) > 1 else 0.0}
    filtering = cfg.keep_groups and cfg.keep_groups < len(rollout.scores) // cfg.n_samples_per_problem
    if filtering and actor.par.dp_group is not None:  # over the whole DP batch: this rank's share of the kept rows
        rollout = dp_group_filter(cfg, rollout, actor.par)
    elif filtering:
        rollout = rollout.rows(rl.group_filter(rollout.scores, cfg.n_samples_per_problem, cfg.keep_groups).tolist())
    tokens, mask, scores = rollout.tokens, rollout.loss_mask.float(), rollout.scores  # (B, T), (B, T), (B,)
    stats["kept_score"] = scores.mean().item()

    def forwards(t: torch.Tensor, n: list[int] | None) -> tuple:  # (b, t) each: old logp, reference logp, values
        return (sequence_stats(actor, t, cfg.temperature, n)[0],
                None if ref is None else sequence_stats(ref, t, cfg.temperature, n)[0],
                None if critic is None else sequence_values(critic, t, n))

    lengths = rl.trajectory_lengths(mask).tolist()  # one host sync; every no-grad forward runs in micro-batches
    with torch.no_grad():
        old_logp, ref_logp, values = in_micro_batches(cfg, forwards, tokens, lengths)
    stats["logp_diff_sampler"] = rl.masked_mean((rollout.logprobs.float() - old_logp).abs(), mask).item()
    kl_reward = torch.zeros_like(mask)  # (B, T): kl_coef * KL(pi || ref) on the sampled tokens, if in the reward
    if ref_logp is not None:
        kl = rl.kl_penalty(old_logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp or None)  # (B, T)
        stats["kl_ref"] = rl.masked_mean(kl, mask).item()
        if cfg.kl_in == "reward":
            kl_reward = cfg.kl_coef * kl * mask
    if cfg.algorithm == "grpo":  # the KL lowers each episode's score by its sum over the tokens, as in verl
        advantages = rl.group_advantages(scores - kl_reward.sum(1), cfg.n_samples_per_problem)[:, None] * mask
        return Batch(tokens, mask, old_logp, advantages, ref_logp), stats
    rewards = rollout.rewards - kl_reward
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask, group=actor.par.dp_group)  # moments of the whole DP batch
    return Batch(tokens, mask, old_logp, advantages, ref_logp, values, returns), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2) per token (B, T), and the clip
    fraction (0-d tensor, token-mean over the mask)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    frac = rl.masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask).detach()
    return loss, frac


def minibatch_weights(mask: torch.Tensor, aggregation: str, par: ParallelContext) -> torch.Tensor:
    """Per-token loss weights (B, T) over a whole minibatch (rl.loss_weights), for the policy and the value loss
    alike (verl's critic, in micro-batches of one sequence as UFO runs it, averages like its actor), scaled so
    that averaging gradients over the DP group gives the mean over every rank's tokens (or rows), as one
    process with the whole minibatch would (parallel.dp_mean_scale)."""
    count = mask.sum() if aggregation == "token-mean" else (mask.sum(1) > 0).sum()
    return rl.loss_weights(mask, aggregation) * dp_mean_scale(count, par)


def policy_loss(cfg: TrainConfig, actor: Qwen2, mb: Batch, weights: torch.Tensor, lengths: list[int] | None):
    """(loss = sum(weights * per-token PPO loss), metrics as 0-d tensors: token-means over mb's tokens).

    The LM head and the PPO loss run as one fused op (kernels/linear_ppo_loss.py): the logits' gradient is
    formed chunk by chunk in the forward, so the full-vocabulary logits never exist and the backward does
    no matmul of its own beyond the two it must (6NHV FLOPs in all)."""
    rows = prediction_rows(actor, mb.tokens, lengths)
    at = rows.gather  # token-aligned (B, T) -> the predicted tokens' entries (N,)
    kl_in_loss = cfg.kl_in == "loss" and mb.ref_logp is not None
    loss, metrics, logp = linear_ppo_loss(
        actor.lm_head_input(rows.hidden), actor.lm_head_weight, rows.targets, at(mb.old_logp), at(mb.advantages),
        at(mb.mask), at(weights), ref_logp=at(mb.ref_logp) if kl_in_loss else None, temperature=cfg.temperature,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip or None,  # 0: no dual clip
        kl_coef=cfg.kl_coef if kl_in_loss else 0.0, kl_estimator=cfg.kl_estimator, kl_clamp=cfg.kl_clamp or None,
        entropy_coef=cfg.entropy_coef, vocab_start=actor.vocab_start, group=actor.par.tp_group)  # vocab-parallel
    metrics = {f"pg/{k}": v for k, v in metrics.items()}
    logp = rows.scatter(logp)  # (B, T)
    return loss, metrics | {"ratio_dev": rl.masked_mean((logp - mb.old_logp).abs(), mb.mask).detach()}


def critic_loss(cfg: TrainConfig, critic: Qwen2, mb: Batch, weights: torch.Tensor, lengths: list[int] | None):
    """(loss = sum(weights * clipped value loss), metrics as 0-d tensors: token-means over mb's tokens)."""
    values = sequence_values(critic, mb.tokens, lengths)
    per_token, clip_frac = value_loss(values, mb.old_values, mb.returns, mb.mask, cfg.value_clip)  # (B, T)
    loss = (torch.where(mb.mask > 0, per_token, 0.0) * weights).sum()
    return loss, {"value_loss": rl.masked_mean(per_token.detach(), mb.mask), "value_clip_frac": clip_frac}


def accumulate_gradients(cfg: TrainConfig, actor: Qwen2, critic: Qwen2 | None, mb: Batch,
                         lengths: list[int]) -> tuple[torch.Tensor, dict]:
    """Backward of one minibatch's loss in micro-batches of at most cfg.micro_batch_tokens tokens (packed
    or padded): each micro-batch's loss is sum(w * per-token loss) with the weights of the WHOLE minibatch,
    so the accumulated gradients equal the one-shot minibatch's for every aggregation and under DP. The
    actor's backward runs before the critic's forward, so only one model's activations are alive.
    Returns (the minibatch's total loss, 0-d detached; metrics as 0-d tensors, token-means over the
    minibatch, plus padding_frac), synchronising nothing: the caller reads them once."""
    weights = minibatch_weights(mb.mask, cfg.aggregation, actor.par)
    parts = [(actor, policy_loss)] + ([(critic, critic_loss)] if critic is not None else [])
    total, sums, computed = mb.mask.new_zeros(()), {}, 0
    for rows, packed, T in micro_batches(cfg, lengths):
        micro = mb.rows(rows, T)
        computed += sum(packed) if packed else (rows.stop - rows.start) * T
        n_tokens = micro.mask.sum()
        for model, loss_fn in parts:
            loss, metrics = loss_fn(cfg, model, micro, weights[rows, :T], packed)
            loss.backward()  # frees this model's activations before the next forward
            total = total + loss.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n_tokens
    n_tokens = mb.mask.sum().clamp(min=1)
    metrics = {k: v / n_tokens for k, v in sums.items()}
    metrics["padding_frac"] = torch.full((), 1.0 - sum(lengths) / computed, device=n_tokens.device)  # no copy
    return total, metrics


def ppo_update(cfg: TrainConfig, actor: Qwen2, critic: Qwen2 | None, optimizers: dict, batch: Batch,
               seed: int, grad_hook=None) -> dict:
    """cfg.ppo_epochs passes over shuffled minibatches; returns the mean metrics.

    Each minibatch is one optimizer step whose gradients accumulate over micro-batches (see
    accumulate_gradients). grad_hook(model) runs after backward and before clipping (data-parallel
    all-reduce goes there). The shuffle uses its own generator seeded from `seed`, so a resumed run
    shuffles identically."""
    models = {"actor": actor} | ({"critic": critic} if critic is not None else {})
    for model in models.values():
        model.checkpoint_activations = cfg.checkpoint_activations
    generator = torch.Generator().manual_seed(seed)
    lengths = rl.trajectory_lengths(batch.mask).tolist()  # one host sync for the whole update
    rl.micro_batches(lengths, cfg.micro_batch_tokens)  # a budget below the longest trajectory fails before any forward
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    sums, n_updates, skipped, ratio_devs = {}, 0, 0, []
    for _ in range(cfg.ppo_epochs):
        for rows in torch.randperm(len(batch.tokens), generator=generator).split(cfg.minibatch_size):
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss, metrics = accumulate_gradients(cfg, actor, critic, batch.rows(to_device(rows, batch.tokens.device)),
                                                 [lengths[i] for i in rows.tolist()])
            metrics["loss"] = loss
            metrics = dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))  # one sync per minibatch
            ratio_devs.append(metrics.pop("ratio_dev"))
            finite = all_ranks_true(math.isfinite(metrics["loss"]), actor.par)  # DP ranks skip together or not at all
            if finite:  # clipped in place; the norm before clipping is the whole model's under TP
                for name, model in models.items():
                    if grad_hook is not None:
                        grad_hook(model)
                    metrics[f"grad_norm/{name}"] = float(clip_grad_norm_(model, max_norm, model.par))
                finite = all(math.isfinite(metrics[f"grad_norm/{name}"]) for name in models)
            if not finite:  # skip: the weights and optimizer moments are left untouched
                skipped += 1
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                continue
            for opt in optimizers.values():
                opt.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    out = {k: v / n_updates for k, v in sums.items()} if n_updates else {}
    return out | {"updates": n_updates, "skipped_updates": skipped, "first_ratio_dev": ratio_devs[0]}


def make_optimizers(cfg: TrainConfig, actor: Qwen2, critic: Qwen2 | None) -> dict:
    """AdamW for the actor and the critic; for bf16 models with fp32 master weights and moments (nanoufo/optim.py)."""
    opts = {"actor": adamw(actor.parameters(), lr=cfg.actor_lr, weight_decay=cfg.weight_decay)}
    if critic is not None:
        opts["critic"] = adamw(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
    return opts


def sft_loss(model: Qwen2, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked next-token negative log-likelihood for the supervised warm-up; tokens, mask (B, T)."""
    logp, _, _ = sequence_stats(model, tokens, 1.0)
    return -rl.masked_mean(logp, mask)
