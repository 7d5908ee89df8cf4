"""Intuitor's setting (DESIGN.md section 3): GRPO whose reward is the policy's own self-certainty (no gold
answers), single-turn, KL to the reference in the loss with the k3 estimator (beta 0.005), trained on
MATH problems and evaluated on MATH500 and GSM8K.

    torchrun --standalone --nproc_per_node=2 train.py config/intuitor_qwen2.5_3b.py \
        --init_from=Qwen2.5-3B --train_data=MATH/train.jsonl

The learning rate, group size and batch sizes are this project's choices, not numbers from the paper.
"""
out_dir = "out/intuitor_qwen2.5_3b"
init_from = "Qwen2.5-3B"  # a local HF checkpoint directory; override with --init_from
dtype = "bfloat16"
train_data = "MATH/train.jsonl"
train_format = "auto"
eval_data = "data/math500/test.jsonl"
eval_format = "math500"
n_eval_problems = 500

max_turns = 1  # Intuitor is single-turn
turn_decay = 0.5
repetition_penalty = 0.0
format_penalty = 0.0

problems_per_step = 128
n_samples_per_problem = 7
keep_groups = 0  # self-certainty always varies within a group: keep them all
max_new_tokens = 1024
temperature = 1.0
eval_temperature = 0.5
eval_k = 5

algorithm = "grpo"
reward = "self_certainty"
ppo_epochs = 1
minibatch_size = 112
actor_lr = 3e-6
grad_clip = 1.0
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
micro_batch_tokens = 8192  # per forward/backward; gradients accumulate over the minibatch of 112 episodes
pack_sequences = True
checkpoint_activations = False
kv_budget_gb = 16.0  # rollout KV cache per GPU: ~260 rows of 3,584 tokens at TP=2 (of 896 episodes per step)

max_steps = 200
eval_interval = 20
ckpt_interval = 20
plot_interval = 10
