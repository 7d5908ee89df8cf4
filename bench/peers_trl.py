"""TRL's side of bench/peers.py: the workload (bench/peers_work.py) as GRPOConfig options, and GRPOTrainer with
each rollout's phases timed.

    pip install -e ".[peers]"                # trl, pinned in requirements-lock.txt
    python bench/peers.py --preset tiny      # runs run_worker in its own process

How the workload maps onto TRL (nanoufo's side: bench/peers_nanoufo.py nanoufo_options):
- the group is num_generations; a rollout is steps_per_generation minibatches of per_device_train_batch_size
  completions (no gradient accumulation), each passed over num_iterations times: nanoufo's minibatch_size and
  ppo_epochs. With one minibatch and one pass TRL takes the old log-probs as the detached current ones and runs
  no scoring forward (so does nanoufo: build_batch leaves the old log-probs to the update's own forward).
- loss_type "dapo" (every completion token of the minibatch weighs the same) is nanoufo's token-mean; epsilon and
  epsilon_high are clip_low and clip_high; beta 0 (no KL, no reference model), entropy_coef 0.
- scale_rewards "group": (r - group mean) / (group sample std + 1e-4); nanoufo divides by (std + 1e-6). The
  constant is not an option on either side, the one difference in the loss that cannot be set equal.
- AdamW (torch's, fused) with a constant learning rate, no weight decay, gradients clipped at grad_clip.
- gradient_checkpointing False and bf16 False in fp32 (TRL's defaults are True for both); in bf16 TRL keeps fp32
  weights and computes under autocast, nanoufo keeps bf16 weights and fp32 masters: the same optimizer state.
"""
from tempfile import TemporaryDirectory

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from peers_work import REWARDS, Clock, Workload, phase_times, write_result


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records, for each rollout, the wall and CPU seconds spent generating (_generate) and
    scoring (the rest of _generate_and_score_completions: rewards, advantages, old log-probs when it needs
    them), and the tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts: list[dict] = []

    def _generate(self, prompts: list):
        start = Clock.now()
        out = super()._generate(prompts)
        self._generation = Clock.now() - start
        return out

    def _generate_and_score_completions(self, inputs):
        start = Clock.now()
        out = super()._generate_and_score_completions(inputs)
        sampled = int(out["completion_mask"].sum())
        self.rollouts.append(dict(generation=self._generation, scoring=Clock.now() - start - self._generation,
                                  sampled_tokens=sampled, tokens=sampled + int(out["prompt_mask"].sum())))
        return out


class StepClock(TrainerCallback):
    """Wall and CPU seconds of each optimizer step: its rollout (when it makes one), forward, backward, AdamW."""

    def __init__(self):
        self.steps: list[Clock] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = Clock.now()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(Clock.now() - self._start)


def trl_config(work: Workload, output_dir: str) -> GRPOConfig:
    return GRPOConfig(
        output_dir=output_dir, use_cpu=work.device == "cpu", seed=work.seed, report_to="none", save_strategy="no",
        disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
        bf16=work.dtype == "bfloat16", gradient_checkpointing=False,
        num_generations=work.samples, per_device_train_batch_size=work.minibatch, gradient_accumulation_steps=1,
        steps_per_generation=work.minibatches, num_iterations=work.epochs, shuffle_dataset=False,
        max_steps=work.steps * work.minibatches * work.epochs, max_completion_length=work.max_new_tokens,
        temperature=work.temperature, top_p=1.0, top_k=0,
        loss_type="dapo", epsilon=work.clip_low, epsilon_high=work.clip_high, beta=0.0, entropy_coef=0.0,
        scale_rewards="group", learning_rate=work.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=work.grad_clip)


def trl_dataset(work: Workload) -> Dataset:
    """The prompts as conversations (TRL adds the chat template's default system turn, as nanoufo's env does)."""
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p["content"]}], "answer": p["answer"]}
                              for p in work.prompts])


def reward_recorder(work: Workload):
    """The workload's reward as a TRL reward function, and the list it appends each rollout's mean reward to."""
    reward_fn, means = REWARDS[work.reward], []

    def reward(completions, answer, **kwargs) -> list[float]:
        scores = [reward_fn(c[-1]["content"], a) for c, a in zip(completions, answer)]
        means.append(sum(scores) / len(scores))
        return scores
    reward.__name__ = work.reward  # TRL logs each reward function under its name
    return reward, means


def make_trainer(work: Workload, output_dir: str, reward=None) -> TimedGRPOTrainer:
    reward = reward or reward_recorder(work)[0]
    trainer = TimedGRPOTrainer(model=work.checkpoint, reward_funcs=reward, args=trl_config(work, output_dir),
                               train_dataset=trl_dataset(work),
                               processing_class=AutoTokenizer.from_pretrained(work.checkpoint))
    trainer.remove_callback(PrinterCallback)  # its log lines would bury the table; the logging itself still runs
    return trainer


def run_worker(work: Workload, out: str) -> None:
    """Train for the workload's steps and write per-rollout figures (and the trained weights, if asked) to out."""
    reward, means = reward_recorder(work)
    clock = StepClock()
    with TemporaryDirectory() as tmp:
        trainer = make_trainer(work, tmp, reward)
        trainer.add_callback(clock)
        trainer.train()
        if work.save_to:
            trainer.save_model(work.save_to)
    per_rollout = work.minibatches * work.epochs  # optimizer steps per rollout
    steps = []
    for i, (rollout, mean) in enumerate(zip(trainer.rollouts, means)):
        step = sum(clock.steps[i * per_rollout + 1:(i + 1) * per_rollout], clock.steps[i * per_rollout])
        generation, scoring = rollout["generation"], rollout["scoring"]
        steps.append(phase_times(generation, scoring, step - generation - scoring) | dict(
            sampled_tokens=rollout["sampled_tokens"], tokens=rollout["tokens"], reward=mean))
    write_result(out, "trl", work, steps)
