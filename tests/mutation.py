"""A small mutation check: plant one plausible bug at a time in the wiring (trainer, sampler, checkpoints,
parallelism, environment, RL maths, the kernels' PyTorch references), run the test files that cover that
module, and count the bugs the tests catch. Not a pytest file (pytest collects test_*.py only).

    python tests/mutation.py               # every mutant, in a temporary copy of the repository
    python tests/mutation.py -k sampler,env:   # only the mutants whose name contains "sampler" or "env:"
    python tests/mutation.py --list        # the mutants, and whether each still applies to the code

Each mutant replaces one fragment of source (which must occur exactly once) with a wrong one. A mutant whose
fragment is no longer in the file (the code moved on) is reported "not applicable", not run. The tests run
with -x, so a caught mutant usually costs seconds; a survivor costs its test files' whole run. The working
tree is never modified: the copy is made with `git ls-files` and deleted at the end.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARALLEL = ["tests/test_parallel.py::test_clipping_scales_by_at_most_one_to_the_bound_by_hand",
            "tests/test_parallel.py::test_split_range_is_balanced_and_covers_everything",
            "tests/test_parallel.py::test_a_single_process_runs_without_tp_whatever_tp_says",
            "tests/test_parallel.py::test_tp2_and_dp2_match_one_process"]  # not the peer-timeout tests (slow)
TESTS = {  # pytest arguments for a mutant in each module, the most targeted first (-x stops at the first failure)
    "nanoufo/trainer.py": ["tests/test_build_batch.py", "tests/test_trainer.py", "tests/test_micro_batches.py",
                           "tests/test_fused_policy_loss.py", PARALLEL[-1], "tests/test_learning.py"],
    "nanoufo/packing.py": ["tests/test_micro_batches.py", "tests/test_trainer.py", "tests/test_fused_policy_loss.py"],
    "nanoufo/rl.py": ["tests/test_rl.py", "tests/test_micro_batches.py", "tests/test_build_batch.py",
                      "tests/test_trainer.py", "tests/test_learning.py"],
    "nanoufo/env.py": ["tests/test_env.py", "tests/test_ufo_reward.py"],
    "nanoufo/metrics.py": ["tests/test_metrics.py", "tests/test_ufo_reward.py"],
    "nanoufo/task.py": ["tests/test_env.py", "tests/test_eval_options.py"],
    "nanoufo/weights.py": ["tests/test_weights.py"],
    "nanoufo/data.py": ["tests/test_data.py"],
    "nanoufo/sampler.py": ["tests/test_sampler.py", "tests/test_build_batch.py", *(
        f"tests/test_batching.py::test_a_{name}" for name in (
            "failed_capture_is_counted_said_and_fatal_when_required",
            "run_max_len_from_its_limits_captures_once_per_bucket_whatever_the_prompts"))],
    "nanoufo/checkpoint.py": ["tests/test_checkpoint.py", *(f"tests/test_reliability.py::{name}" for name in (
        "test_a_damaged_checkpoint_file_is_named_at_load", "test_a_damaged_pointer_or_manifest_is_named_at_load",
        "test_saving_the_same_step_again_never_unlinks_the_latest_first",
        "test_sigkill_at_random_moments_of_saving_leaves_a_whole_checkpoint")), PARALLEL[-1]],
    "nanoufo/parallel.py": PARALLEL,
    "kernels/ppo_loss.py": ["tests/test_kernels_ppo_loss.py", "tests/test_rl.py"],
    "kernels/sampling.py": ["tests/test_kernels_decode.py"],
    "kernels/token_stats.py": ["tests/test_kernels_token_stats.py", "tests/test_kernels_linear.py"],
    "kernels/linear_ppo_loss.py": ["tests/test_kernels_linear_ppo.py"],
    "kernels/mm_acc.py": ["tests/test_kernels_linear.py"],
    "kernels/decode_attention.py": ["tests/test_kernels_decode.py"],
    "kernels/rope_kv_append.py": ["tests/test_kernels_decode.py"],
    "nanoufo/decode.py": ["tests/test_sampler.py"],
    "nanoufo/schedule.py": ["tests/test_schedule.py"],
    "nanoufo/prm.py": ["tests/test_prm.py", "tests/test_prm_reward.py", "tests/test_prm_eval.py"],
    "nanoufo/evaluate.py": ["tests/test_rollout.py", "tests/test_eval_options.py"],
    "nanoufo/rollout.py": ["tests/test_rollout.py"],
    "nanoufo/cuda_graphs.py": ["tests/test_batching.py"],
    "nanoufo/model.py": ["tests/test_model.py"],
    "nanoufo/plan.py": ["tests/test_plan.py"],
    "nanoufo/config.py": ["tests/test_config.py", "tests/test_eval_options.py"],
    "train.py": ["tests/test_eval_options.py"],
    "sample.py": ["tests/test_eval_options.py"],
    "nanoufo/options.py": ["tests/test_config.py"],
}


@dataclass
class Mutant:
    name: str
    file: str
    original: str
    mutated: str


MUTANTS = [
    # trainer.py: build_batch and the PPO update
    Mutant("trainer: no advantage whitening", "nanoufo/trainer.py",
           "if opts.whiten_advantages:", "if False:"),
    Mutant("trainer: KL penalty added to the reward", "nanoufo/trainer.py",
           "rewards = scored.rewards - kl_reward", "rewards = scored.rewards + kl_reward"),
    Mutant("trainer: reference log-probs from the actor", "nanoufo/trainer.py",
           "token_stats(ref, forward, temperature)[0]", "token_stats(actor, forward, temperature)[0]"),
    Mutant("trainer: the group filter keeps the first groups", "nanoufo/trainer.py",
           "scored.rows(rl.group_filter(scored.scores, scored.group_size, opts.keep_groups).tolist())",
           "scored.rows(list(range(opts.keep_groups * scored.group_size)))"),
    Mutant("sampler: kept rows take the first rows' tensors", "nanoufo/sampler.py",
           "picked = x[torch.tensor(index, device=x.device)]", "picked = x[:len(index)]"),
    Mutant("trainer: gamma and lambda swapped", "nanoufo/trainer.py",
           "rl.gae(rewards, values, mask, opts.gamma, opts.lam)",
           "rl.gae(rewards, values, mask, opts.lam, opts.gamma)"),
    Mutant("trainer: GRPO advantages on unsampled tokens", "nanoufo/trainer.py",
           "scored.group_size)[:, None] * mask", "scored.group_size)[:, None] * torch.ones_like(mask)"),
    Mutant("trainer: DP scales seq-mean by tokens", "nanoufo/trainer.py",
           '(mask.sum() if aggregation == "token-mean" else', "(mask.sum() if True else"),
    Mutant("trainer: DP loss weights not scaled", "nanoufo/trainer.py",
           "rl.loss_weights(mask, aggregation, chunk_rows) * dp_mean_scale(count, par)",
           "rl.loss_weights(mask, aggregation, chunk_rows)"),
    Mutant("trainer: a micro-batch takes the first rows' loss weights", "nanoufo/trainer.py",
           "at(batch.advantages), at(weights),",  # the micro-batch's rows counted from row 0
           "at(batch.advantages), weights.reshape(-1)[forward.following - forward.following.min() // weights.shape[1] "
           "* weights.shape[1]],"),
    Mutant("trainer: micro-batch metrics weighted by all their tokens", "nanoufo/trainer.py",
           "n_tokens = rows.mask.sum()", "n_tokens = rows.mask.numel()"),
    Mutant("packing: packed rows predict their own token", "nanoufo/packing.py",
           "torch.cat([torch.arange(1, n), torch.zeros(1, dtype=torch.long)]) + s", "torch.arange(n) + s"),
    Mutant("packing: a padded forward reads the hidden state after the token", "nanoufo/packing.py",
           "out = model(self.inputs)[:, :-1].flatten(0, 1)", "out = model(self.inputs)[:, 1:].flatten(0, 1)"),
    Mutant("packing: the head kept on the rows before the scored tokens' predictors", "nanoufo/packing.py",
           'host["keep"] = torch.cat([first + p - 1 for', 'host["keep"] = torch.cat([first + p - 2 for'),
    Mutant("packing: statistics written one token early", "nanoufo/packing.py",
           "into.view(-1).index_put_((self.following,),", "into.view(-1).index_put_((self.following - 1,),"),
    Mutant("trainer: the fused policy loss at temperature 1", "nanoufo/trainer.py",
           "temperature=rows.temperature, clip_low=opts.clip_low,", "clip_low=opts.clip_low,"),
    Mutant("trainer: the fused policy loss's clip range swapped", "nanoufo/trainer.py",
           "clip_low=opts.clip_low, clip_high=opts.clip_high", "clip_low=opts.clip_high, clip_high=opts.clip_low"),
    Mutant("trainer: a non-finite gradient is not checked", "nanoufo/trainer.py",
           'finite = all(math.isfinite(metrics[f"grad_norm/{name}"]) for name in models)', "finite = True"),
    Mutant("trainer: value loss takes the min", "nanoufo/trainer.py",
           "0.5 * torch.maximum((values - returns) ** 2", "0.5 * torch.minimum((values - returns) ** 2"),
    Mutant("trainer: KL in the loss when it is in the reward", "nanoufo/trainer.py",
           'kl_in_loss = opts.kl_in == "loss"', 'kl_in_loss = opts.kl_in != "loss"'),
    # rl.py
    Mutant("rl: GAE does not skip feedback tokens", "nanoufo/rl.py",
           "order = torch.sort((mask <= 0).to(torch.int8), dim=1, stable=True).indices",
           "order = torch.arange(T, device=rewards.device).expand(B, T)"),
    Mutant("rl: whitening leaves unsampled tokens non-zero", "nanoufo/rl.py",
           "torch.rsqrt(var + eps) * m", "torch.rsqrt(var + eps)"),
    Mutant("rl: seq-mean weights count empty rows", "nanoufo/rl.py",
           "/ (per_row > 0).sum().clamp(min=1)", "/ max(per_row.shape[0], 1)"),
    Mutant("rl: k3 KL without the clamp", "nanoufo/rl.py",
           "log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)", "log_ratio = ref_logp - logp"),
    Mutant("rl: GRPO population std", "nanoufo/rl.py",
           "(groups.std(1, keepdim=True) + eps)", "(groups.std(1, keepdim=True, unbiased=False) + eps)"),
    Mutant("rl: per-turn reward one token late", "nanoufo/rl.py",
           "rewards[b, end - 1] += value", "rewards[b, min(end, rewards.shape[1] - 1)] += value"),
    Mutant("rl: group filter keeps the smallest spread", "nanoufo/rl.py",
           "torch.sort(-spread, stable=True)", "torch.sort(spread, stable=True)"),
    # env.py
    Mutant("env: a prompt of exactly the limit does not fit", "nanoufo/env.py",
           "len(self._encode(text)) <= max_tokens", "len(self._encode(text)) < max_tokens"),
    Mutant("env: turn decay one turn late", "nanoufo/env.py",
           "o.turn_decay ** t if correct", "o.turn_decay ** (t + 1) if correct"),
    Mutant("env: an unacceptable answer dropped from the repetition ratio", "nanoufo/env.py",
           "count_distinct_answers(accepted, distinct_by) / len(answered)",
           "count_distinct_answers(accepted, distinct_by) / len(accepted)"),
    Mutant("env: repetition ratio counts attempts without an answer", "nanoufo/env.py",
           "count_distinct_answers(accepted, distinct_by) / len(answered)",
           "count_distinct_answers(accepted, distinct_by) / len(episode.answers)"),
    Mutant("env: feedback close chosen backwards", "nanoufo/env.py",
           "list(self._fixed_feedback[ended_with_stop])", "list(self._fixed_feedback[not ended_with_stop])"),
    # sampler.py
    Mutant("sampler: noise keyed by cache row", "nanoufo/sampler.py",
           "[self.episode_ids[self.episode_of[r]] for r in rows]", "[r for r in rows]"),
    Mutant("sampler: one noise stream for every row", "nanoufo/sampler.py",
           "episodes = [self.episode_ids[self.episode_of[r]] for r in rows]", "episodes = [0] * len(rows)"),
    Mutant("sampler: one token too many per attempt", "nanoufo/sampler.py",
           "self.decoder.max_new_tokens - (n - self.on(r)", "self.decoder.max_new_tokens + 1 - (n - self.on(r)"),
    Mutant("sampler: one turn too many", "nanoufo/sampler.py",
           "len(c.spans) >= self.max_turns", "len(c.spans) > self.max_turns"),
    Mutant("sampler: feedback tokens in the loss mask", "nanoufo/sampler.py",
           "[0.0 if logprobs is None else 1.0]", "[1.0]"),
    # checkpoint.py
    Mutant("checkpoint: old checkpoints pruned before `latest` moves", "nanoufo/checkpoint.py",
           "    atomic_write(final.parent / POINTER,",
           "    [shutil.rmtree(o) for o in final.parent.glob('ckpt-*') if o != final]; atomic_write(final.parent / POINTER,"),
    Mutant("checkpoint: `latest` moved before the rename", "nanoufo/checkpoint.py",
           "    os.replace(tmp, final)\n", "    (final.parent / POINTER).write_text(final.name + '\\n'); os.replace(tmp, final)\n"),
    Mutant("checkpoint: one optimizer file for every TP rank", "nanoufo/checkpoint.py",
           'return "optimizers.pt" if par.tp_size == 1 else', 'return "optimizers.pt" if True else'),
    Mutant("checkpoint: only global rank 0 saves optimizers", "nanoufo/checkpoint.py",
           "if par.dp_rank == 0:  # the other DP groups", "if par.is_main:  # the other DP groups"),
    Mutant("checkpoint: torch RNG not restored", "nanoufo/checkpoint.py",
           '    torch.set_rng_state(states["torch"])', "    pass"),
    # parallel.py
    Mutant("parallel: a single process keeps tp", "nanoufo/parallel.py",
           "tp = 1 if world == 1 else tp", "tp = tp"),
    Mutant("parallel: DP scale without dp_size", "nanoufo/parallel.py",
           "float(count) * par.dp_size / max(float(total), 1.0)", "float(count) / max(float(total), 1.0)"),
    Mutant("parallel: DP gradients summed, not averaged", "nanoufo/parallel.py",
           "g.div_(par.dp_size)", "g.div_(1)"),
    Mutant("parallel: replicated gradients counted on every TP rank", "nanoufo/parallel.py",
           "(split if name in split_names else replicated).append", "(split if True else replicated).append"),
    Mutant("parallel: unbalanced split", "nanoufo/parallel.py",
           "start = rank * base + min(rank, extra)", "start = rank * (base + 1)"),
    # the kernels' PyTorch references
    Mutant("ppo_loss: seq-mean counts empty rows", "kernels/ppo_loss.py",
           "/ (count > 0).sum().clamp(min=1)", "/ max(len(count), 1)"),
    Mutant("ppo_loss: k3 KL without the clamp", "kernels/ppo_loss.py",
           "u = ref_delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)", "u = ref_delta"),
    Mutant("ppo_loss: clip range swapped", "kernels/ppo_loss.py",
           "ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)", "ratio.clamp(1 - cfg.clip_high, 1 + cfg.clip_low)"),
    Mutant("ppo_loss: k1 KL sign", "kernels/ppo_loss.py",
           'kl = -ref_delta if cfg.kl_estimator == "k1"', 'kl = ref_delta if cfg.kl_estimator == "k1"'),
    Mutant("sampling: top-p keeps the token that crosses p", "kernels/sampling.py",
           "mass_before < top_p", "mass_before <= top_p"),
    Mutant("rope_kv_append: rotate-half with the signs swapped", "kernels/rope_kv_append.py",
           "torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)"),
    Mutant("token_stats: temperature ignored", "kernels/token_stats.py",
           "z = logits.to(acc_dtype(logits.dtype)) / cfg.temperature", "z = logits.to(acc_dtype(logits.dtype))"),
    Mutant("token_stats: slices merge without re-centring a", "kernels/token_stats.py",
           "a = slices.centred_sum + torch.where(s > 0, shift * s, 0.0)", "a = slices.centred_sum"),
    Mutant("token_stats: the entropy's gradient with its sign flipped", "kernels/token_stats.py",
           "- g_ent[:, None] * (z - mu[:, None])", "+ g_ent[:, None] * (z - mu[:, None])"),
    Mutant("linear_ppo_loss: row chunks' token-means added unweighted", "kernels/linear_ppo_loss.py",
           "metrics.get(name, 0.0) + value * share", "metrics.get(name, 0.0) + value"),
    Mutant("decode_attention: a query sees the next slot", "kernels/decode_attention.py",
           "<= position_ids[:, None, :, None]", "<= position_ids[:, None, :, None] + 1"),
    # issue 30: behaviours pinned from first principles (hand-worked values, counted frequencies, invariants)
    Mutant("decode: a retry's noise restarts at its turn's first token", "nanoufo/decode.py",
           "* MAX_EPISODE_TOKENS + length  #", "* MAX_EPISODE_TOKENS + length - self.turn_start[rows]  #"),
    Mutant("decode: the episodes' noise streams overlap", "nanoufo/decode.py",
           "self.episode[rows] * MAX_EPISODE_TOKENS + length", "self.episode[rows] + length"),
    Mutant("sampling: consecutive noise ids' streams overlap", "kernels/sampling.py",
           "tl.program_id(0)).to(tl.int64) * V", "tl.program_id(0)).to(tl.int64)"),
    Mutant("sampling: the kernel drops the token that crosses top-p", "kernels/sampling.py",
           "        theta = lo\n", "        theta = hi\n"),
    Mutant("trainer: the critic regresses to the old values", "nanoufo/trainer.py",
           "value_loss(values, rows.old_values, rows.returns,", "value_loss(values, rows.returns, rows.old_values,"),
    Mutant("trainer: the value clip is centred on the returns", "nanoufo/trainer.py",
           "clipped = old_values + (values - old_values).clamp(", "clipped = returns + (values - returns).clamp("),
    Mutant("trainer: the self-certainty reward reads the entropy", "nanoufo/trainer.py",
           "token_stats(actor, forward, rollout.temperature)[2:]",
           "token_stats(actor, forward, rollout.temperature)[1:2]"),
    Mutant("rl: self-certainty averaged over every token", "nanoufo/rl.py",
           "return masked_mean(token_sc, mask, dim=1)", "return token_sc.mean(1)"),
    Mutant("trainer: minibatches not shuffled", "nanoufo/trainer.py",
           "torch.randperm(len(batch.tokens), generator=generator)", "torch.arange(len(batch.tokens))"),
    Mutant("trainer: DP seq-mean scale counts empty rows", "nanoufo/trainer.py",
           "(mask.sum(1) > 0).sum())", "(mask.sum(1) >= 0).sum())"),
    Mutant("trainer: the KL reward's estimator of KL(ref || pi)", "nanoufo/trainer.py",
           "rl.kl_penalty(old_logp, ref_logp,", "rl.kl_penalty(ref_logp, old_logp,"),
    Mutant("parallel: the clipping scale may exceed 1", "nanoufo/parallel.py",
           "scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)", "scale = max_norm / (norm + 1e-6)"),
    Mutant("trainer: grad_clip=0 clips every gradient to 0", "nanoufo/trainer.py",
           "max_norm = opts.grad_clip if opts.grad_clip > 0 else math.inf", "max_norm = opts.grad_clip"),
    Mutant("schedule: the cosine rises again past the schedule", "nanoufo/schedule.py",
           "progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))",
           "progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)"),
    Mutant("trainer: the value loss always a token-mean", "nanoufo/trainer.py",
           "loss, metrics = loss_fn(opts, model, rows)",
           "loss, metrics = loss_fn(opts, model, rows if loss_fn is policy_loss else UpdateRows.of(minibatch, "
           "rl.loss_weights(minibatch.mask, 'token-mean') * dp_mean_scale(minibatch.mask.sum(), model.par), forward))"),
    Mutant("ppo_loss: the k3 cap ignored by the kernel", "kernels/ppo_loss.py",
           "                kl = tl.minimum(kl, kl_clamp)\n", ""),
    Mutant("rl: the k3 cap ignored", "nanoufo/rl.py",
           "return k3 if clamp is None else k3.clamp(max=clamp)", "return k3"),
    Mutant("trainer: dual_clip=0 passed as a cap of 0", "nanoufo/trainer.py",
           "dual_clip=opts.dual_clip or None,", "dual_clip=opts.dual_clip,"),
    Mutant("trainer: the advantage's sign flipped", "nanoufo/trainer.py",
           "rows.advantages, rows.mask, rows.weights,", "-rows.advantages, rows.mask, rows.weights,"),
    Mutant("rl: an episode's reward one token early", "nanoufo/rl.py",
           "rewards[rows, trajectory_lengths(mask) - 1]", "rewards[rows, trajectory_lengths(mask) - 2]"),
    Mutant("schedule: the warm-up starts above 0 (reaching the rate a step early)", "nanoufo/schedule.py",
           "(1.0 - floor) * step / warmup_steps)", "(1.0 - floor) * (step + 1) / warmup_steps)"),
    Mutant("schedule: lr_schedule_steps ignored", "nanoufo/schedule.py",
           "total = cfg.lr_schedule_steps or cfg.max_steps", "total = cfg.max_steps"),
    Mutant("schedule: a fractional warm-up rounded, not truncated as verl's", "nanoufo/schedule.py",
           "return int(cfg.lr_warmup_ratio * (cfg.lr_schedule_steps or cfg.max_steps))",
           "return round(cfg.lr_warmup_ratio * (cfg.lr_schedule_steps or cfg.max_steps))"),
    # issue 36: the options that reproduce the paper configs' reference code
    Mutant("env: repetition_charged ignored (every answered episode pays)", "nanoufo/env.py",
           'return options.repetition_charged == "any_answer" or episode.solved or answered >= options.max_turns',
           "return True"),
    Mutant("env: distinct_by ignored in the reward", "nanoufo/env.py",
           "share = distinct_answer_share(episode, o.distinct_by)", "share = distinct_answer_share(episode)"),
    Mutant("metrics: distinct_by ignored in distinct_answer_ratio", "nanoufo/metrics.py",
           "shares = [distinct_answer_share(e, distinct_by) for e in episodes]",
           "shares = [distinct_answer_share(e) for e in episodes]"),
    Mutant("env: stop_tokens generation_config ignored", "nanoufo/env.py",
           'if self.options.stop_tokens == "generation_config":', "if False:"),
    Mutant("task: the generation_config's eos ids not read", "nanoufo/task.py",
           'eos_ids = generation_eos_ids(cfg.init_from) if cfg.stop_tokens == "generation_config" else ()',
           "eos_ids = ()"),
    Mutant("task: max_prompt_tokens ignored when the data is read", "nanoufo/task.py",
           '(cfg.max_prompt_tokens, "max_prompt_tokens")', '(10**9, "max_prompt_tokens")'),
    Mutant("rl: chunk-token-mean divides by the chunks that hold tokens", "nanoufo/rl.py",
           "/ per_chunk[chunk, None].clamp(min=1) / max(n_chunks, 1)",
           "/ per_chunk[chunk, None].clamp(min=1) / (per_chunk > 0).sum().clamp(min=1)"),
    Mutant("rl: chunk-token-mean chunks every chunk_rows-th row", "nanoufo/rl.py",
           "chunk = torch.arange(m.shape[0], device=m.device) // chunk_rows",
           "chunk = torch.arange(m.shape[0], device=m.device) % chunk_rows"),
    Mutant("trainer: chunk_rows not passed to the loss weights", "nanoufo/trainer.py",
           "minibatch_weights(minibatch.mask, opts.aggregation, actor.par, opts.chunk_rows)",
           "minibatch_weights(minibatch.mask, opts.aggregation, actor.par)"),
    Mutant("weights: critic_head_init normal ignored", "nanoufo/weights.py",
           'if head_init == "normal" and "value_head.weight" in missing:', "if False:"),
    Mutant("data: metamath_first stops at the end of the line", "nanoufo/data.py",
           "return match[1].strip() or None if match else None",
           'return match[1].split("\\n")[0].strip() or None if match else None'),
    Mutant("prm: a row too long for the PRM counted as nothing flagged", "nanoufo/prm.py",
           "correct = mean([p == -1 for p, y in zip(predicted, labels) if y == -1])",
           "correct = mean([p in (-1, None) for p, y in zip(predicted, labels) if y == -1])"),
    Mutant("sampling: the CPU inverse CDF's target not scaled by the row's total", "kernels/sampling.py",
           "target = uniforms.double() * ends[:, -1]", "target = uniforms.double()"),
    Mutant("sampling: the CPU inverse CDF's last partial block dropped", "kernels/sampling.py",
           "weights[:, full:].sum(-1, keepdim=True)], dim=1)", "0 * weights[:, full:].sum(-1, keepdim=True)], dim=1)"),
    Mutant("sampling: the CPU inverse CDF reads past the row's end", "kernels/sampling.py",
           ".double() * (cols < V)", ".double()"),
    Mutant("sampling: the CPU path's log-probs at temperature 1", "kernels/sampling.py",
           "lse = top[:, 0] * inv_temp + weights.sum(-1).log()", "lse = top[:, 0] + weights.sum(-1).log()"),
    Mutant("sampler: feedback that fills max_len exactly is accepted", "nanoufo/sampler.py",
           "len(c.tokens) + len(reply) >= self.max_len", "len(c.tokens) + len(reply) > self.max_len"),
    Mutant("prm: an input exactly as long as the context is refused", "nanoufo/prm.py",
           "len(ids) <= limit", "len(ids) < limit"),
    Mutant("trainer: the critic's value of a token read at its own position", "nanoufo/trainer.py",
           "return critic.values(forward.hidden(critic)).masked_fill(",  # hidden row n + 1: the state after the token
           "return torch.nn.functional.pad(critic.values(forward.hidden(critic))[1:], (0, 1)).masked_fill("),
    Mutant("evaluate: every batch sampled with one seed", "nanoufo/evaluate.py",
           "Noise(seed + i)", "Noise(seed)"),
    Mutant("sampler: a prompt that fills max_len gets an attempt", "nanoufo/sampler.py",
           "if len(self.conversations[e].tokens) >= self.max_len:",
           "if len(self.conversations[e].tokens) > self.max_len:"),
    Mutant("cuda_graphs: a batch of exactly a bucket's rows takes the next bucket", "nanoufo/cuda_graphs.py",
           "fitting = [b for b in buckets if b >= n]", "fitting = [b for b in buckets if b > n]"),
    Mutant("cuda_graphs: a rank replays its graphs when another could not record them", "nanoufo/cuda_graphs.py",
           "if not _all_ranks(graphs is not None, device, tp_group) and graphs is not None:",
           "if not _all_ranks(True, device, tp_group) and graphs is not None:"),
    Mutant("sampler: a failed capture under cuda_graphs=true decodes eagerly", "nanoufo/sampler.py",
           "if self.required:", "if self.required and False:"),
    Mutant("sampler: a run's max_len leaves out part of the prompt limit", "nanoufo/sampler.py",
           "min(episode_max_len(max_prompt_tokens,", "min(episode_max_len(max_prompt_tokens // 2,"),
    Mutant("mm_acc: the kernel overwrites the accumulator instead of adding to it", "kernels/mm_acc.py",
           "tl.load(out_ptrs, mask=inside) + acc", "acc"),
    Mutant("model: a cached query does not see its own slot", "nanoufo/model.py",
           "torch.arange(slots, device=position_ids.device) <= position_ids[:, :, None]",
           "torch.arange(slots, device=position_ids.device) < position_ids[:, :, None]"),
    Mutant("model: a packed sequence sees the ones before it", "nanoufo/model.py",
           "(seq[:, :, None] == seq[:, None, :])", "(seq[:, :, None] >= seq[:, None, :])"),
    Mutant("prm: a step's last token found one token late", "nanoufo/prm.py",
           "bisect.bisect_left(range(len(ids) - 1), end,", "bisect.bisect_right(range(len(ids) - 1), end,"),
    Mutant("rollout: an attempt cut by the token limit is graded without its last token", "nanoufo/rollout.py",
           "tokenizer.decode(r[:-1] if s else r)", "tokenizer.decode(r[:-1])"),
    Mutant("plan: a plan exactly at the budget is refused", "nanoufo/plan.py",
           "self.peak(p) > self.budget", "self.peak(p) >= self.budget"),
    Mutant("options: a negative grad_clip is accepted", "nanoufo/options.py",
           '"kl_coef", "kl_clamp", "grad_clip",', '"kl_coef", "kl_clamp",'),
    # issue 37: an evaluation option dropped between the config (or a flag) and the sampler or the environment
    Mutant("config: the held-out evaluation samples at the training temperature", "nanoufo/config.py",
           "temperature=self.eval_temperature, top_p=self.eval_top_p,", "top_p=self.eval_top_p,"),
    Mutant("config: the held-out sampling made without the run's max_new_tokens", "nanoufo/config.py",
           "return options_of(SamplingOptions, self, temperature=self.eval_temperature,",
           "return SamplingOptions(temperature=self.eval_temperature,"),
    Mutant("config: the held-out episodes make the training's turns", "nanoufo/config.py",
           "max_turns=self.eval_k if evaluation else self.max_turns", "max_turns=self.max_turns"),
    Mutant("config: the run's instruction replaced by the task's", "nanoufo/config.py",
           'instruction=task_instruction if self.instruction == "auto" else self.instruction',
           "instruction=task_instruction"),
    Mutant("config: the run's system prompt replaced by the template's", "nanoufo/config.py",
           'system_prompt=None if self.system_prompt == "auto" else self.system_prompt', "system_prompt=None"),
    Mutant("config: the held-out evaluation samples at the training top-p", "nanoufo/config.py",
           "temperature=self.eval_temperature, top_p=self.eval_top_p,", "temperature=self.eval_temperature,"),
    Mutant("train: the held-out evaluation samples as the training rollouts do", "train.py",
           "cfg.sampling(evaluation=True)", "cfg.sampling()"),
    Mutant("task: the held-out environment made as the training's", "nanoufo/task.py",
           "cfg.env_options(self.instruction, evaluation)", "cfg.env_options(self.instruction)"),
    Mutant("train: the held-out evaluation in the training environment", "train.py",
           "held_out_metrics(actor, eval_env, problems,", "held_out_metrics(actor, env, problems,"),
    Mutant("evaluate: Pass@k's samples make k attempts each", "nanoufo/evaluate.py",
           "max_turns=turns, tokenizer=tokenizer)", "tokenizer=tokenizer)"),
    *(Mutant(f"sample: --{flag} not passed on", "sample.py", f'{flag}="{key}",', "") for flag, key in (
        ("temperature", "eval_temperature"), ("top_p", "eval_top_p"), ("k", "eval_k"),
        ("max_new_tokens", "max_new_tokens"), ("answer_format", "answer_format"), ("grading", "grading"),
        ("system_prompt", "system_prompt"), ("instruction", "instruction"), ("user_template", "user_template"),
        ("feedback", "feedback"))),
]


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree (what a commit would hold)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # nanoufo/kernels -> ../kernels stays a link, so a mutant in kernels/ is imported
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)


def run_tests(repo: Path, tests: list[str], timeout: float, interpret: bool) -> tuple[str, float, str]:
    """'pass', 'fail' or 'timeout', the seconds taken and the end of pytest's output. Only a kernel's mutants
    need the Triton interpreter (its tests compare the kernel with the mutated reference); the others run the
    PyTorch paths, faster."""
    env = {**os.environ, "PYTHONPATH": str(repo), "TRITON_INTERPRET": "1" if interpret else "0",
           "OMP_NUM_THREADS": "1", "COLUMNS": "300"}  # wide: pytest's summary line keeps the error after the test id
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=repo, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    return ("pass" if done.returncode == 0 else "fail"), time.monotonic() - start, done.stdout.decode()[-6000:]


def failed_test(output: str) -> str:
    """The test that failed, with its error, from pytest's short summary ("FAILED tests/x.py::name - Error: ..."),
    so a reader can tell a genuine catch from a failure caused by load (a timeout, a slow peer)."""
    lines = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return lines[0][:300] if lines else "no FAILED line in pytest's output"


def applies(mutant: Mutant, repo: Path) -> str | None:
    """None if the mutant can be planted in repo, else why not."""
    count = (repo / mutant.file).read_text().count(mutant.original) if (repo / mutant.file).is_file() else 0
    return None if count == 1 else "fragment not found" if count == 0 else f"fragment found {count} times"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="run only the mutants whose name contains one of these "
                                               "comma-separated words")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether they apply; run nothing")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's test run (then: caught)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if any(word in m.name for word in args.k.split(","))]
    with tempfile.TemporaryDirectory(prefix="nanoufo-mutants-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        if args.list:
            for m in mutants:
                print(f"{applies(m, repo) or 'applies':<22} {m.name}")
            return 0
        for interpret in (False, True):
            files = sorted({t for m in mutants for t in TESTS[m.file] if interpret == m.file.startswith("kernels/")})
            status, seconds, output = run_tests(repo, files, args.timeout * 3, interpret) if files else ("pass", 0, "")
            if status != "pass":
                print(f"the unmutated tests do not pass ({status}): {' '.join(files)}\n{output}")
                return 1
            print(f"unmutated (TRITON_INTERPRET={int(interpret)}): {' '.join(files) or 'none'} pass ({seconds:.0f} s)")
        results = {"caught": [], "survived": [], "not applicable": []}
        for m in mutants:
            path = repo / m.file
            original = path.read_text()
            reason = applies(m, repo)
            if reason:
                results["not applicable"].append(m)
                print(f"not applicable  {m.name} ({reason})", flush=True)
                continue
            path.write_text(original.replace(m.original, m.mutated))
            try:
                status, seconds, output = run_tests(repo, TESTS[m.file], args.timeout, m.file.startswith("kernels/"))
            finally:
                path.write_text(original)
            outcome = "survived" if status == "pass" else "caught"
            results[outcome].append(m)
            print(f"{outcome:<15} {m.name} ({status}, {seconds:.0f} s)", flush=True)
            if status == "fail":
                print(f"                by {failed_test(output)}", flush=True)
    applicable = len(results["caught"]) + len(results["survived"])
    share = 100 * len(results["caught"]) / max(applicable, 1)
    print(f"\ncaught {len(results['caught'])} of {applicable} mutants ({share:.0f}%); "
          f"{len(results['not applicable'])} not applicable")
    for m in results["survived"]:
        print(f"  survived: {m.name} ({m.file}: {m.original.strip()!r} -> {m.mutated.strip()!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
