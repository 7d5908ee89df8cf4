"""Intuitor's setting: GRPO whose reward is the policy's own self-certainty, so the
training rows need no gold answers (a file of questions will do), single-turn, trained on MATH and evaluated
on MATH500 and GSM8K.

    python train.py config/intuitor_qwen2.5_3b.py --init_from=Qwen2.5-3B --tp=1 --train_data=MATH/train.jsonl

From the Intuitor run: self-certainty as the only reward; KL to the reference in the loss, k3 estimator,
beta 0.005; 128 problems per step for one epoch of MATH's 7,500 training problems (58 steps); a cosine
learning-rate schedule with 10% warm-up; 3,072 new tokens; one optimizer step per rollout (the minibatch is
the whole batch: 128 x 7 = 896 episodes, accumulated over micro-batches of micro_batch_tokens); evaluation
on MATH500 and GSM8K.
This project's choices, not numbers from the paper: the learning rate, the group size of 7, the clip range,
the token-mean aggregation, the sampling and evaluation temperatures and eval_k.
Tests (every key valid): python -m pytest -q tests/test_config.py
"""
out_dir = "out/intuitor_qwen2.5_3b"
init_from = "Qwen2.5-3B"  # a local HF checkpoint directory; override with --init_from
dtype = "bfloat16"
train_data = "MATH/train.jsonl"  # hendrycks MATH (problem, solution, level, type); unlabeled questions work too
train_format = "auto"
eval_data = "math500,gsm8k"  # the bundled test sets, each logged as eval/<set>/...
eval_format = "auto"
n_eval_problems = 0  # all of each set

max_turns = 1  # Intuitor is single-turn
turn_decay = 0.5
repetition_penalty = 0.0
format_penalty = 0.0

problems_per_step = 128
n_samples_per_problem = 7
keep_groups = 0  # self-certainty always varies within a group: keep them all
max_new_tokens = 3072
temperature = 1.0
eval_temperature = 0.5
eval_k = 5

algorithm = "grpo"
reward = "self_certainty"
ppo_epochs = 1
minibatch_size = 896  # = problems_per_step x n_samples_per_problem: one optimizer step per rollout
actor_lr = 3e-6
lr_schedule = "cosine"
lr_warmup_ratio = 0.1
grad_clip = 1.0
weight_decay = 0.01
clip_low = 0.2
clip_high = 0.2
dual_clip = 3.0
entropy_coef = 0.0
kl_coef = 0.005
kl_estimator = "k3"
kl_in = "loss"
whiten_advantages = False
aggregation = "token-mean"

# memory: python -m nanoufo.plan config/intuitor_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 says it fits
micro_batch_tokens = 8192  # per forward/backward; gradients accumulate over the minibatch of 896 episodes
pack_sequences = True
checkpoint_activations = False
kv_budget_gb = 16.0  # rollout KV cache per GPU: ~260 rows of 3,584 tokens at TP=2 (of 896 episodes per step)

max_steps = 58  # one epoch: 7,500 MATH training problems / 128 per step
eval_interval = 10
ckpt_interval = 10
plot_interval = 5
