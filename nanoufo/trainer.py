"""One RL update, as functions train.py calls and tests can reach. Each stage is a type, complete when made:

    graded = run_episodes(...)                     # nanoufo/rollout.py: a Rollout + the environment's records
    scored, stats = score_rollout(opts, actor, graded, prm)   # Scored: + scores (B,) and rewards on tokens (B, T)
    batch, more_stats = build_batch(opts, actor, critic, ref, scored)   # Batch: + old log-probs, advantages
    stats |= ppo_update(opts, actor, critic, optimizers, batch, seed=step)  # UpdateRows per micro-batch

opts is an UpdateOptions (below; the run's TrainConfig is one, as it inherits the class), checked when made.
The log-probs are recomputed at the temperature the rollout was sampled at (Rollout.temperature), and the
groups are the rollout's own (Graded.group_size samples per problem), so neither can disagree with the sampler.
score_rollout places the rewards the update learns from: the environment's, Intuitor's self-certainty, or a
process reward model's step scores (nanoufo/prm.py). build_batch keeps the groups with the largest reward
spread, recomputes the old log-probs (and values, reference log-probs) with the trainer's own forward so
the first PPO ratio is 1 up to rounding (the update's fused head + loss sums in its own order), and
computes advantages: GAE over the critic's values (UFO PPO) or group-normalized scores (GRPO). With one
optimizer step per rollout (one epoch, one minibatch) the old policy is the current one, so build_batch runs
no forward of the actor for them: the update's own forward gives each token's old log-prob, detached (ratio 1),
and the sampler-vs-trainer gap, as TRL and verl do; the KL in the reward needs them first, so it keeps the
forward. Every forward's LM head runs only on the rows that predict a sampled token (nanoufo/packing.py). ppo_update
runs the PPO epochs over shuffled minibatches and steps the optimizers with gradient clipping, skipping any
update whose loss or gradients are not finite so the weights never take a NaN. Every forward (scoring and
update) runs in the micro-batches of nanoufo/packing.py, at most opts.micro_batch_tokens tokens each,
trajectories packed end to end; a minibatch's gradients accumulate over its micro-batches with per-token
loss weights of the whole minibatch (rl.loss_weights), so the step equals the one-shot one.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoufo.kernels.linear_ppo_loss import linear_ppo_loss
from nanoufo.kernels.linear_token_stats import linear_token_stats
from nanoufo import rl
from nanoufo.model import Qwen2, to_device
from nanoufo.options import LossOptions, UpdateOptions
from nanoufo.optim import adamw
from nanoufo.packing import MicroBatch, micro_batches, on_tokens, one_forward, span_lengths, split_rows
from nanoufo.parallel import ParallelContext, all_ranks_true, clip_grad_norm_, dp_mean_scale
from nanoufo.rollout import Graded
from nanoufo.sampler import Rollout, cat_rows


@dataclass(kw_only=True)
class Scored(Rollout):
    """A rollout with the rewards the update learns from (score_rollout), on the actor's device: each
    episode's score and the rewards placed on its tokens, which sum to the score; rows come in groups of
    group_size samples of one problem (GRPO's groups, the group filter's)."""
    scores: torch.Tensor  # (B,) fp32
    rewards: torch.Tensor  # (B, T) fp32, 0 off the reward points
    group_size: int


@dataclass
class Batch:
    """B trajectories of T tokens; every per-token array is aligned with `tokens` (entry i = token i)."""
    tokens: torch.Tensor  # (B, T) int64, right-padded
    mask: torch.Tensor  # (B, T) float, 1 on sampled tokens
    old_logp: torch.Tensor | None  # (B, T) trainer's log-probs before the update; None: on-policy (build_batch)
    advantages: torch.Tensor  # (B, T)
    ref_logp: torch.Tensor | None = None  # (B, T) frozen reference, when a KL term is used
    old_values: torch.Tensor | None = None  # (B, T) critic, UFO PPO only
    returns: torch.Tensor | None = None  # (B, T) GAE targets for the critic
    temperature: float = 1.0  # the rollout's (Rollout.temperature): the update's log-probs are under it too
    sampler_logp: torch.Tensor | None = None  # (B, T) the sampler's, when the update measures their gap itself
    spans: list[list[tuple[int, int]]] | None = None  # per row, [start, end) of the sampled tokens (host lists):
    # where the mask is 1, known without a device read; the update's head runs only on them. None: read the mask

    def rows(self, index: torch.Tensor) -> "Batch":
        """A minibatch: rows index (a CPU tensor), in that order."""
        on_device = to_device(index, self.tokens.device)
        return Batch(**{k: x[on_device] if isinstance(x, torch.Tensor) else
                        [x[i] for i in index.tolist()] if isinstance(x, list) else x for k, x in vars(self).items()})

    def lengths(self) -> list[int]:
        """Each row's tokens up to its last sampled one: from the spans, or else from the mask (one host sync)."""
        return span_lengths(self.spans) if self.spans is not None else rl.trajectory_lengths(self.mask).tolist()


@dataclass
class UpdateRows:
    """What one forward of the update reads: a micro-batch and, aligned with its hidden rows (N,), the
    minibatch's per-token arrays at the tokens those rows predict (0 where a row predicts nothing)."""
    forward: MicroBatch
    mask: torch.Tensor  # (N,)
    old_logp: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    weights: torch.Tensor  # (N,) the minibatch's loss weights (minibatch_weights)
    ref_logp: torch.Tensor | None  # (N,)
    old_values: torch.Tensor | None  # (N,)
    returns: torch.Tensor | None  # (N,)
    sampler_logp: torch.Tensor | None  # (N,)
    temperature: float  # the rollout's: the log-probs are under it

    @classmethod
    def of(cls, batch: Batch, weights: torch.Tensor, forward: MicroBatch) -> "UpdateRows":
        at = lambda x: None if x is None else forward.take(x)  # noqa: E731  (B, T) -> (N,)
        return cls(forward, at(batch.mask), at(batch.old_logp), at(batch.advantages), at(weights),
                   at(batch.ref_logp), at(batch.old_values), at(batch.returns), at(batch.sampler_logp),
                   batch.temperature)


def token_stats(model: Qwen2, forward: MicroBatch, temperature: float) -> tuple[torch.Tensor, ...]:
    """(logp, entropy, self_certainty) of the tokens the forward's rows predict, (N,) each."""
    return linear_token_stats(model.lm_head_input(forward.hidden(model)), model.lm_head_weight, forward.targets,
                              temperature, vocab_start=model.vocab_start, group=model.par.tp_group,  # vocab-parallel
                              vocab_size=model.config.vocab_size)  # known here: the backward need not sync for it


def token_values(critic: Qwen2, forward: MicroBatch) -> torch.Tensor:
    """V(state before the token each row predicts), (N,): the value head read where the LM head would be."""
    return critic.values(forward.hidden(critic)).masked_fill(~forward.predicts, 0.0)


def sequence_stats(model: Qwen2, tokens: torch.Tensor, temperature: float, lengths: list[int] | None = None):
    """(logp, entropy, self_certainty) of every token under model in one forward, (B, T) each aligned with
    tokens: 0 on each row's first token and where nothing was computed (past lengths, when given)."""
    return on_tokens(lambda forward: token_stats(model, forward, temperature), one_forward(tokens, lengths),
                     tokens.shape)


def sequence_values(critic: Qwen2, tokens: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """V(state before token i) aligned with token i, (B, T), in one forward (as sequence_stats)."""
    return on_tokens(lambda forward: (token_values(critic, forward),), one_forward(tokens, lengths), tokens.shape)[0]


def score_rollout(opts: UpdateOptions, actor: Qwen2, graded: Graded, prm=None) -> tuple[Scored, dict]:
    """The rollout scored for the update, on the actor's device, and the reward model's statistics.
    opts.reward "gold" keeps the environment's rewards (graded.turn_rewards); "self_certainty" scores each
    episode by its mean self-certainty under the actor (label-free); "prm" by the process reward model prm
    (a nanoufo.prm.PRMReward). The rewards are placed once, as opts.reward_placement says: each score on the
    trajectory's last sampled token, each attempt's reward on its last token, or the PRM's step rewards on
    each step's last token."""
    if opts.reward == "prm" and prm is None:
        raise ValueError("score_rollout: reward='prm' needs prm=PRMReward(...)")
    rollout = graded.rollout.to(actor.lm_head_weight.device)  # the sampler hands its tensors back on the CPU
    mask, stats = rollout.loss_mask.float(), {}  # (B, T)
    scores, turn_rewards, step_points = graded.scores.to(mask.device).float(), graded.turn_rewards, None
    if opts.reward == "self_certainty":
        forwards = micro_batches(rollout.tokens, span_lengths(rollout.turn_spans), opts.micro_batch_tokens,
                                 opts.pack_sequences, rollout.turn_spans)
        with torch.no_grad():
            sc, = on_tokens(lambda forward: token_stats(actor, forward, rollout.temperature)[2:], forwards,
                            mask.shape)
        scores = rl.sequence_self_certainty(sc, mask)
    elif opts.reward == "prm":
        shaped = prm(graded)
        scores, turn_rewards, step_points = shaped.scores.to(mask.device), shaped.turn_rewards, shaped.step_points
        stats = {"prm_score": shaped.prm_mean, "prm_unscored_attempts": shaped.unscored}
    rewards = (rl.place_rewards(mask, episode_rewards=scores) if opts.reward_placement == "last" else
               rl.place_rewards(mask, point_rewards=step_points) if opts.reward_placement == "per_step" else
               rl.place_rewards(mask, turn_rewards=turn_rewards, turn_spans=rollout.turn_spans))
    return Scored(**vars(rollout), scores=scores, rewards=rewards, group_size=graded.group_size), stats


def dp_group_filter(keep_groups: int, scored: Scored, par: ParallelContext) -> Scored:
    """The group filter over the whole data-parallel batch: the keep_groups x dp_size groups with the largest
    reward spread among every rank's groups (in rank order), dealt out in equal shares of keep_groups, rank
    r taking the r-th; the rows travel between ranks. Returns this rank's rows."""
    B, n = len(scored.scores), scored.group_size
    everyone = [torch.empty_like(scored.scores) for _ in range(par.dp_size)]
    dist.all_gather(everyone, scored.scores.contiguous(), group=par.dp_group)
    kept = rl.group_filter(torch.cat(everyone), n, keep_groups * par.dp_size).tolist()  # indices into all rows
    here = range(par.dp_rank * B, (par.dp_rank + 1) * B)
    mine = scored.to("cpu")  # rows travel as CPU tensors
    rows = {g: mine.rows([g - here.start]) for g in kept if g in here}
    parts = [None] * par.dp_size
    dist.all_gather_object(parts, rows, group=par.dp_group)
    pool = {g: row for part in parts for g, row in part.items()}
    share = kept[par.dp_rank * keep_groups * n:(par.dp_rank + 1) * keep_groups * n]
    return cat_rows([pool[g] for g in share]).to(scored.tokens.device)


def check_models(opts: UpdateOptions, critic: Qwen2 | None, ref: Qwen2 | None, group_size: int) -> None:
    """ValueError when the models or the groups given cannot do what opts ask (nothing is ignored silently)."""
    if opts.algorithm == "ufo_ppo" and critic is None:
        raise ValueError("algorithm='ufo_ppo' needs a critic (load_model(..., value_head=True))")
    if opts.kl_coef > 0 and ref is None:
        raise ValueError(f"kl_coef={opts.kl_coef} needs a reference model (a frozen copy of the initial actor); "
                         "pass ref=..., or set kl_coef=0")
    if opts.algorithm == "grpo" and group_size < 2:
        raise ValueError(f"algorithm='grpo' normalises within groups: the rollout has {group_size} sample per "
                         "problem (n_samples_per_problem must be >= 2)")


def build_batch(opts: UpdateOptions, actor: Qwen2, critic: Qwen2 | None, ref: Qwen2 | None,
                scored: Scored) -> tuple[Batch, dict]:
    """Filter the groups, recompute old log-probs / values / reference log-probs, and compute advantages from
    a scored rollout (score_rollout): its scores (B,) and token rewards (B, T)."""
    check_models(opts, critic, ref, scored.group_size)
    scored = scored.to(actor.lm_head_weight.device)
    stats = {"score": scored.scores.mean().item(),
             "score_std": scored.scores.std().item() if len(scored.scores) > 1 else 0.0}
    filtering = opts.keep_groups and opts.keep_groups < len(scored.scores) // scored.group_size
    if filtering and actor.par.dp_group is not None:  # over the whole DP batch: this rank's share of the kept rows
        scored = dp_group_filter(opts.keep_groups, scored, actor.par)
    elif filtering:
        scored = scored.rows(rl.group_filter(scored.scores, scored.group_size, opts.keep_groups).tolist())
    tokens, mask, scores = scored.tokens, scored.loss_mask.float(), scored.scores  # (B, T), (B, T), (B,)
    stats["kept_score"] = scores.mean().item()
    spans = scored.turn_spans  # host lists: the rows' lengths and scored tokens without a device read
    forwards = micro_batches(tokens, span_lengths(spans), opts.micro_batch_tokens, opts.pack_sequences, spans)
    temperature = scored.temperature

    def on_the_tokens(stat_of) -> torch.Tensor:  # (B, T): a per-row statistic of every forward, on its tokens
        return on_tokens(lambda forward: (stat_of(forward),), forwards, tokens.shape)[0]

    # one optimizer step per rollout: the update's forward is the old policy's, so it gives the old log-probs
    # (detached) and the sampler gap itself, unless the KL reward needs them before the advantages
    kl_reward_needs_old = ref is not None and opts.kl_in == "reward"
    on_policy = opts.ppo_epochs == 1 and opts.minibatch_size >= len(tokens) and not kl_reward_needs_old
    with torch.no_grad():
        old_logp = None if on_policy else on_the_tokens(lambda forward: token_stats(actor, forward, temperature)[0])
        ref_logp = None if ref is None else on_the_tokens(lambda forward: token_stats(ref, forward, temperature)[0])
        values = None if critic is None else on_the_tokens(lambda forward: token_values(critic, forward))
    sampler_logp = scored.logprobs.float() if on_policy else None  # (B, T)
    if not on_policy:
        stats["logp_diff_sampler"] = rl.masked_mean((scored.logprobs.float() - old_logp).abs(), mask).item()
    kl_reward = torch.zeros_like(mask)  # (B, T): kl_coef * KL(pi || ref) on the sampled tokens, if in the reward
    if ref_logp is not None and not on_policy:  # on-policy, the update's loss reports the KL (pg/kl)
        kl = rl.kl_penalty(old_logp, ref_logp, opts.kl_estimator, opts.kl_clamp or None)  # (B, T)
        stats["kl_ref"] = rl.masked_mean(kl, mask).item()
        if opts.kl_in == "reward":
            kl_reward = opts.kl_coef * kl * mask
    if opts.algorithm == "grpo":  # the KL lowers each episode's score by its sum over the tokens, as in verl
        advantages = rl.group_advantages(scores - kl_reward.sum(1), scored.group_size)[:, None] * mask
        return Batch(tokens, mask, old_logp, advantages, ref_logp, temperature=temperature, spans=spans,
                     sampler_logp=sampler_logp), stats
    rewards = scored.rewards - kl_reward
    advantages, returns = rl.gae(rewards, values, mask, opts.gamma, opts.lam)
    if opts.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask, group=actor.par.dp_group)  # moments of the whole DP batch
    return Batch(tokens, mask, old_logp, advantages, ref_logp, values, returns, temperature, spans=spans,
                 sampler_logp=sampler_logp), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2) per token (the inputs' shape), and the
    clip fraction (0-d tensor, token-mean over the mask)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    frac = rl.masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask).detach()
    return loss, frac


def minibatch_weights(mask: torch.Tensor, aggregation: str, par: ParallelContext, chunk_rows: int = 4) -> torch.Tensor:
    """Per-token loss weights (B, T) over a whole minibatch (rl.loss_weights), for the policy and the value loss
    alike (verl's critic, in micro-batches of one sequence as UFO runs it, averages like its actor), scaled so
    that averaging gradients over the DP group gives the mean over every rank's tokens (or rows, or chunks), as
    one process with the whole minibatch would (parallel.dp_mean_scale)."""
    count = (mask.sum() if aggregation == "token-mean" else
             torch.tensor(rl.chunk_count(mask.shape[0], chunk_rows)) if aggregation == "chunk-token-mean" else
             (mask.sum(1) > 0).sum())
    return rl.loss_weights(mask, aggregation, chunk_rows) * dp_mean_scale(count, par)


def policy_loss(opts: LossOptions, actor: Qwen2, rows: UpdateRows):
    """(loss = sum(weights * per-token PPO loss), metrics as 0-d tensors: token-means over the rows' tokens).

    The LM head and the PPO loss run as one fused op (kernels/linear_ppo_loss.py): the logits' gradient is
    formed chunk by chunk in the forward, so the full-vocabulary logits never exist and the backward does
    no matmul of its own beyond the two it must (6NHV FLOPs in all)."""
    kl_in_loss = opts.kl_in == "loss" and rows.ref_logp is not None
    loss, metrics, logp = linear_ppo_loss(
        actor.lm_head_input(rows.forward.hidden(actor)), actor.lm_head_weight, rows.forward.targets, rows.old_logp,
        rows.advantages, rows.mask, rows.weights, ref_logp=rows.ref_logp if kl_in_loss else None,
        temperature=rows.temperature, clip_low=opts.clip_low, clip_high=opts.clip_high,
        dual_clip=opts.dual_clip or None,  # 0: no dual clip
        kl_coef=opts.kl_coef if kl_in_loss else 0.0, kl_estimator=opts.kl_estimator, kl_clamp=opts.kl_clamp or None,
        entropy_coef=opts.entropy_coef, vocab_start=actor.vocab_start, group=actor.par.tp_group)  # vocab-parallel
    metrics = {f"pg/{k}": v for k, v in metrics.items()}
    gap = lambda other: rl.masked_mean((logp - other).abs(), rows.mask).detach()  # noqa: E731
    metrics["ratio_dev"] = gap(logp if rows.old_logp is None else rows.old_logp)  # on-policy: 0
    if rows.sampler_logp is not None:  # on-policy: this forward is the first after the rollout
        metrics["logp_diff_sampler"] = gap(rows.sampler_logp)
    return loss, metrics


def critic_loss(opts: LossOptions, critic: Qwen2, rows: UpdateRows):
    """(loss = sum(weights * clipped value loss), metrics as 0-d tensors: token-means over the rows' tokens)."""
    values = token_values(critic, rows.forward)  # (N,)
    per_token, clip_frac = value_loss(values, rows.old_values, rows.returns, rows.mask, opts.value_clip)  # (N,)
    loss = (torch.where(rows.mask > 0, per_token, 0.0) * rows.weights).sum()
    return loss, {"value_loss": rl.masked_mean(per_token.detach(), rows.mask), "value_clip_frac": clip_frac}


def accumulate_gradients(opts: UpdateOptions, actor: Qwen2, critic: Qwen2 | None, minibatch: Batch,
                         lengths: list[int]) -> tuple[torch.Tensor, dict]:
    """Backward of one minibatch's loss in micro-batches of at most opts.micro_batch_tokens tokens (packed
    or padded; lengths are the rows' trajectory lengths): each micro-batch's loss is sum(w * per-token loss)
    with the weights of the WHOLE minibatch, so the accumulated gradients equal the one-shot minibatch's for
    every aggregation and under DP. The actor's backward runs before the critic's forward, so only one
    model's activations are alive. Returns (the minibatch's total loss, 0-d detached; metrics as 0-d
    tensors, token-means over the minibatch, plus padding_frac), synchronising nothing: the caller reads
    them once."""
    weights = minibatch_weights(minibatch.mask, opts.aggregation, actor.par, opts.chunk_rows)
    parts = [(actor, policy_loss)] + ([(critic, critic_loss)] if critic is not None else [])
    total, sums, computed = minibatch.mask.new_zeros(()), {}, 0
    for forward in micro_batches(minibatch.tokens, lengths, opts.micro_batch_tokens, opts.pack_sequences,
                                 minibatch.spans):
        rows = UpdateRows.of(minibatch, weights, forward)
        computed += forward.n_computed
        n_tokens = rows.mask.sum()
        for model, loss_fn in parts:
            loss, metrics = loss_fn(opts, model, rows)
            loss.backward()  # frees this model's activations before the next forward
            total = total + loss.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n_tokens
    n_tokens = minibatch.mask.sum().clamp(min=1)
    metrics = {k: v / n_tokens for k, v in sums.items()}
    metrics["padding_frac"] = torch.full((), 1.0 - sum(lengths) / computed, device=n_tokens.device)  # no copy
    return total, metrics


def ppo_update(opts: UpdateOptions, actor: Qwen2, critic: Qwen2 | None, optimizers: dict, batch: Batch,
               seed: int, grad_hook=None) -> dict:
    """opts.ppo_epochs passes over shuffled minibatches; returns the mean metrics.

    Each minibatch is one optimizer step whose gradients accumulate over micro-batches (see
    accumulate_gradients). grad_hook(model) runs after backward and before clipping (data-parallel
    all-reduce goes there). The shuffle uses its own generator seeded from `seed`, so a resumed run
    shuffles identically."""
    models = {"actor": actor} | ({"critic": critic} if critic is not None else {})
    for model in models.values():
        model.checkpoint_activations = opts.checkpoint_activations
    generator = torch.Generator().manual_seed(seed)
    lengths = batch.lengths()
    split_rows(lengths, opts.micro_batch_tokens)  # a budget below the longest trajectory fails before any forward
    max_norm = opts.grad_clip if opts.grad_clip > 0 else math.inf
    sums, n_updates, skipped, ratio_devs = {}, 0, 0, []
    for _ in range(opts.ppo_epochs):
        for index in torch.randperm(len(batch.tokens), generator=generator).split(opts.minibatch_size):
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss, metrics = accumulate_gradients(opts, actor, critic, batch.rows(index),
                                                 [lengths[i] for i in index.tolist()])
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


def make_optimizers(actor: Qwen2, critic: Qwen2 | None, *, actor_lr: float, critic_lr: float = 0.0,
                    weight_decay: float = 0.0) -> dict:
    """AdamW for the actor and the critic; for bf16 models with fp32 master weights and moments (nanoufo/optim.py)."""
    optimizers = {"actor": adamw(actor.parameters(), lr=actor_lr, weight_decay=weight_decay)}
    if critic is not None:
        optimizers["critic"] = adamw(critic.parameters(), lr=critic_lr, weight_decay=weight_decay)
    return optimizers


def sft_loss(model: Qwen2, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked next-token negative log-likelihood for the supervised warm-up; tokens, mask (B, T)."""
    logp, _, _ = sequence_stats(model, tokens, 1.0)
    return -rl.masked_mean(logp, mask)
