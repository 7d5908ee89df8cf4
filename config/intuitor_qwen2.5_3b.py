"""Intuitor (Zhao et al. 2025, "Learning to Reason without External Rewards") on Qwen2.5-3B: GRPO whose reward is
the policy's own self-certainty, so the training rows need no gold answers (a file of questions will do),
single-turn, one epoch of MATH, as the Intuitor repository's verl run does it (sunblaze-ucb/Intuitor,
verl-intuitor/math_intuitor.sh with its configs, read 2026-12-06).

    python train.py config/intuitor_qwen2.5_3b.py --init_from=Qwen2.5-3B --tp=1 --train_data=MATH/train.jsonl

| setting | Intuitor's verl run (file) | here | same, or why not |
|---|---|---|---|
| model, data | Qwen2.5-3B (base), MATH train, 7,500 problems (math_intuitor.sh) | same | same |
| system prompt, user turn | "You are a helpful AI Assistant, ... \\boxed{Your Answer}. Please stop generation immediately after outputing the box."; the bare problem (examples/data_preprocess/math_dataset_ours.py --model Qwen2.5-3B) | system_prompt, user_template "{question}" | same (the README: results depend on the prompt) |
| reward | self-certainty, masked mean over the response (trainer/ppo/ray_trainer.py, INTUITOR) | reward self_certainty | same |
| advantage | GRPO, normalised by the group's std | algorithm grpo | same |
| samples | 128 problems x 8 (rollout.n) per step | same | same (open-r1-intuitor's recipe uses 7) |
| steps | one epoch: 58 steps | max_steps 58 | same |
| update | one optimizer step per rollout (ppo_mini_batch_size 128 problems), 1 epoch; token-mean | minibatch_size 1024, ppo_epochs 1 | same |
| PPO | clip 0.2 / 0.2, dual clip 3 (clip_ratio_c), entropy 0 (trainer/config/actor/actor.yaml) | same | same |
| KL | in the loss, low_var_kl (k3 clamped to [-10, 10]), coefficient 0.005 | kl_in loss, k3, kl_clamp 10, kl_coef 0.005 | same |
| optimizer | AdamW lr 3e-6, cosine, 10% warm-up, weight decay 0.01, grad clip 1.0 | same | same |
| lengths, temperature | 512 prompt tokens (longer filtered), 3,072 new tokens, temperature 1.0 | max_prompt_tokens 512, max_new_tokens 3072 | same |
| evaluation | MATH test, greedy (val_kwargs temperature 0) | MATH500 and GSM8K, greedy | the paper's tables' sets |

Memory: python -m nanoufo.plan config/intuitor_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 says it fits.
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

system_prompt = ("You are a helpful AI Assistant, designed to provide well-reasoned and detailed responses. You FIRST "
                 "think about the reasoning process step by step and then provide the user with the answer. Please "
                 "enclose your final answer in the box: \\boxed{Your Answer}. Please stop generation immediately "
                 "after outputing the box.")
user_template = "{question}"  # the bare problem
instruction = ""

max_turns = 1  # Intuitor is single-turn
turn_decay = 0.5
repetition_penalty = 0.0
format_penalty = 0.0

problems_per_step = 128
n_samples_per_problem = 8
keep_groups = 0  # self-certainty always varies within a group: keep them all
max_prompt_tokens = 512  # longer prompts are skipped, as verl's filter_overlong_prompts
max_new_tokens = 3072
temperature = 1.0
eval_temperature = 0.0  # greedy
eval_k = 1

algorithm = "grpo"
reward = "self_certainty"
ppo_epochs = 1
minibatch_size = 1024  # = problems_per_step x n_samples_per_problem: one optimizer step per rollout
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
kl_clamp = 10.0
kl_in = "loss"
whiten_advantages = False
aggregation = "token-mean"

# memory: python -m nanoufo.plan config/intuitor_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 says it fits
micro_batch_tokens = 8192  # per forward/backward; gradients accumulate over the minibatch of 1024 episodes
pack_sequences = True
checkpoint_activations = False
kv_budget_gb = 16.0  # rollout KV cache per GPU: ~260 rows of 3,584 tokens at TP=2 (of 1024 episodes per step)

max_steps = 58  # one epoch: 7,500 MATH training problems / 128 per step
eval_interval = 10
ckpt_interval = 10
plot_interval = 5
