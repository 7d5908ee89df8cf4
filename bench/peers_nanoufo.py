"""nanoufo's side of bench/peers.py: every call into nanoufo's training API is in this file (nanoufo_config,
nanoufo_env, nanoufo_step, nanoufo_loss), so a change of that API is ported here alone.

    python bench/peers.py --preset tiny      # runs run_worker in its own process

One GRPO step is nanoufo's train.py step: run_episodes (the KV-cached sampler; one attempt per episode),
score_rollout and build_batch (a no-grad forward for the old log-probs, then group advantages), ppo_update.
The rewards are the workload's (bench/peers_work.py), put in place of the environment's own: the env still
reads each attempt, which is the grading cost every nanoufo rollout pays.
"""
import torch

from nanoufo.config import TrainConfig, validate
from nanoufo.data import Problem
from nanoufo.env import UFOEnv
from nanoufo.parallel import hf_tensors
from nanoufo.rl import trajectory_lengths
from nanoufo.rollout import Graded, run_episodes
from nanoufo.tokenizer import load_tokenizer
from nanoufo.trainer import Batch, accumulate_gradients, build_batch, make_optimizers, ppo_update, score_rollout
from nanoufo.weights import load_model, save_model
from peers_work import REWARDS, Clock, Workload, phase_times, write_result


def nanoufo_config(work: Workload) -> TrainConfig:
    """GRPO as TRL runs it (bench/peers_trl.py): no KL, no entropy bonus, no dual clip, token-mean, one attempt."""
    cfg = TrainConfig(algorithm="grpo", reward="gold", max_turns=1, problems_per_step=work.prompts_per_step,
                      n_samples_per_problem=work.samples, max_new_tokens=work.max_new_tokens,
                      temperature=work.temperature, ppo_epochs=work.epochs, minibatch_size=work.minibatch,
                      actor_lr=work.lr, grad_clip=work.grad_clip, clip_low=work.clip_low, clip_high=work.clip_high,
                      dual_clip=0.0, kl_coef=0.0, entropy_coef=0.0, aggregation="token-mean", dtype=work.dtype,
                      device=work.device, micro_batch_tokens=0)
    validate(cfg, check_paths=False)
    return cfg


def nanoufo_env(work: Workload) -> UFOEnv:
    """The prompts as the workload's user turns (no instruction added: it is in the text); rewards are replaced."""
    return UFOEnv(load_tokenizer(work.checkpoint), max_turns=1, instruction="", turn_decay=1.0,
                  repetition_penalty=0.0, grading="exact")


def nanoufo_prompt_ids(work: Workload, contents: list[str]) -> list[list[int]]:
    """The prompt tokens nanoufo's sampler starts from, for these user turns."""
    env = nanoufo_env(work)
    return [env.prompt_ids(c) for c in contents]


def nanoufo_step(cfg: TrainConfig, actor, env: UFOEnv, optimizers: dict, prompts: list[dict], reward_fn,
                 step: int) -> dict:
    """One GRPO step; returns each phase's wall and CPU seconds, the tokens it handled and the mean reward."""
    problems = [Problem(p["content"], p["answer"], f"peers:{i}") for i, p in enumerate(prompts)]
    start = Clock.now()
    graded = run_episodes(actor, env, problems, n_samples_per_problem=cfg.n_samples_per_problem,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=step)
    generated = Clock.now()
    rewards = [[reward_fn(e.responses[0], e.problem.answer)] for e in graded.episodes]
    scored, _ = score_rollout(cfg, actor, Graded(graded.rollout, graded.episodes, rewards))
    batch, _ = build_batch(cfg, actor, None, None, scored)
    scored_at = Clock.now()
    ppo_update(cfg, actor, None, optimizers, batch, seed=step)
    done = Clock.now()
    rollout = graded.rollout
    return phase_times(generated - start, scored_at - generated, done - scored_at) | dict(
        sampled_tokens=int(rollout.loss_mask.sum()), tokens=int(rollout.lengths.sum()),
        reward=sum(r for [r] in rewards) / len(rewards))


def nanoufo_loss(cfg: TrainConfig, actor, tokens: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                 advantages: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """The update's loss on one fixed batch, token-aligned (B, T) right-padded rows, and its gradient under each
    Hugging Face tensor name (nanoufo merges q/k/v and gate/up into one parameter each)."""
    actor.zero_grad(set_to_none=True)
    batch = Batch(tokens, mask, old_logp, advantages[:, None] * mask)
    loss, _ = accumulate_gradients(cfg, actor, None, batch, trajectory_lengths(mask).tolist())
    grads = {name: p.grad for name, p in actor.named_parameters()}
    return float(loss), {name: where.local(grads) for name, where in hf_tensors(actor).items()}


def load_actor(work: Workload):
    return load_model(work.checkpoint, device=work.device, dtype=getattr(torch, work.dtype))


def run_worker(work: Workload, out: str) -> None:
    """Run the workload's steps and write the per-step figures (and the trained weights, if asked) to out."""
    cfg, env, actor = nanoufo_config(work), nanoufo_env(work), load_actor(work)
    optimizers = make_optimizers(cfg, actor, None)
    reward_fn = REWARDS[work.reward]
    steps = [nanoufo_step(cfg, actor, env, optimizers, work.step_prompts(s), reward_fn, s) for s in range(work.steps)]
    if work.save_to:
        save_model(actor, work.save_to)
    write_result(out, "nanoufo", work, steps)
