"""nanoufo's side of bench/peers.py: every call into nanoufo's training API is in this file (nanoufo_options,
nanoufo_env, nanoufo_step, nanoufo_loss), so a change of that API is ported here alone.

    python bench/peers.py --preset tiny      # runs run_worker in its own process

One GRPO step is nanoufo's train.py step, through the library's options objects (docs/scripting.md):
run_episodes (the KV-cached sampler; one attempt per episode), score_rollout and build_batch (group
advantages, and the old log-probs where the update needs a forward for them), ppo_update. The rewards are
the workload's (bench/peers_work.py), given to the environment as its reward function: the env still reads
each attempt, which is the grading cost every nanoufo rollout pays.
"""
import torch

from nanoufo.data import Problem
from nanoufo.env import Episode, UFOEnv
from nanoufo.options import EnvOptions, SamplingOptions, UpdateOptions
from nanoufo.parallel import hf_tensors
from nanoufo.rl import trajectory_lengths
from nanoufo.rollout import Noise, run_episodes
from nanoufo.tokenizer import load_tokenizer
from nanoufo.trainer import Batch, accumulate_gradients, build_batch, make_optimizers, ppo_update, score_rollout
from nanoufo.weights import load_model, save_model
from peers_work import REWARDS, Clock, Workload, phase_times, write_result


def nanoufo_options(work: Workload) -> UpdateOptions:
    """GRPO as TRL runs it (bench/peers_trl.py): no KL, no entropy bonus, no dual clip, token-mean."""
    return UpdateOptions(algorithm="grpo", reward="gold", ppo_epochs=work.epochs, minibatch_size=work.minibatch,
                         grad_clip=work.grad_clip, clip_low=work.clip_low, clip_high=work.clip_high, dual_clip=0.0,
                         kl_coef=0.0, entropy_coef=0.0, aggregation="token-mean", micro_batch_tokens=0)


def nanoufo_sampling(work: Workload) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=work.max_new_tokens, temperature=work.temperature, cuda_graphs="false")


def nanoufo_env(work: Workload) -> UFOEnv:
    """One attempt, the prompts as the workload's user turns (no instruction added: it is in the text); the
    reward is the workload's function of the attempt's text, the env's own shaping off."""
    reward_fn = REWARDS[work.reward]

    def reward(episode: Episode) -> float:
        return reward_fn(episode.responses[0], episode.problem.answer)

    options = EnvOptions(max_turns=1, instruction="", user_template="{question}", turn_decay=1.0,
                         repetition_penalty=0.0, format_penalty=0.0, grading="exact")
    return UFOEnv(load_tokenizer(work.checkpoint), options, reward=reward)


def nanoufo_prompt_ids(work: Workload, contents: list[str]) -> list[list[int]]:
    """The prompt tokens nanoufo's sampler starts from, for these user turns."""
    env = nanoufo_env(work)
    return [env.prompt_ids(c) for c in contents]


def nanoufo_step(work: Workload, actor, env: UFOEnv, optimizers: dict, prompts: list[dict], noise: Noise,
                 step: int) -> dict:
    """One GRPO step; returns each phase's wall and CPU seconds, the tokens it handled and the mean reward."""
    update = nanoufo_options(work)
    problems = [Problem(p["content"], p["answer"], f"peers:{i}") for i, p in enumerate(prompts)]
    start = Clock.now()
    graded = run_episodes(actor, env, problems, nanoufo_sampling(work), noise, n_samples_per_problem=work.samples)
    generated = Clock.now()
    scored, _ = score_rollout(update, actor, graded)
    batch, stats = build_batch(update, actor, None, None, scored)
    scored_at = Clock.now()
    ppo_update(update, actor, None, optimizers, batch, seed=step)
    done = Clock.now()
    rollout = graded.rollout
    return phase_times(generated - start, scored_at - generated, done - scored_at) | dict(
        sampled_tokens=int(rollout.loss_mask.sum()), tokens=int(rollout.lengths.sum()), reward=stats["score"])


def nanoufo_loss(work: Workload, actor, tokens: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                 advantages: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """The update's loss on one fixed batch, token-aligned (B, T) right-padded rows, and its gradient under each
    Hugging Face tensor name (nanoufo merges q/k/v and gate/up into one parameter each)."""
    actor.zero_grad(set_to_none=True)
    batch = Batch(tokens, mask, old_logp, advantages[:, None] * mask, temperature=work.temperature)
    loss, _ = accumulate_gradients(nanoufo_options(work), actor, None, batch, trajectory_lengths(mask).tolist())
    grads = {name: p.grad for name, p in actor.named_parameters()}
    return float(loss), {name: where.local(grads) for name, where in hf_tensors(actor).items()}


def load_actor(work: Workload):
    return load_model(work.checkpoint, device=work.device, dtype=getattr(torch, work.dtype))


def run_worker(work: Workload, out: str) -> None:
    """Run the workload's steps and write the per-step figures (and the trained weights, if asked) to out."""
    env, actor, noise = nanoufo_env(work), load_actor(work), Noise(seed=work.seed)  # one Noise: no replayed noise
    optimizers = make_optimizers(actor, None, actor_lr=work.lr)
    steps = [nanoufo_step(work, actor, env, optimizers, work.step_prompts(s), noise, s) for s in range(work.steps)]
    if work.save_to:
        save_model(actor, work.save_to)
    write_result(out, "nanoufo", work, steps)
