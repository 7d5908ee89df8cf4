"""UFO's setting: Qwen2.5-3B-Instruct, MetaMathQA MATH_ rows, 5-turn episodes with
"Try again." feedback, PPO with a critic, GAE gamma = lambda = 1, KL to the reference as a k1 reward
penalty (0.001), actor lr 1e-6, critic lr 1e-5, 200 steps, temperature 1.0 to train and 0.5 to evaluate;
rewards 0.5**t for a solve at turn t, a format penalty of -0.1 for an attempt without an answer, and the
repetition penalty -0.5 * (1 - E/T) counting only the attempts that gave an answer (nanoufo/env.py); a
seq-mean-token-mean loss (UFO's micro-batches of one sequence average each sequence's tokens, then the
sequences: aggregation "seq-mean" here).

    torchrun --standalone --nproc_per_node=2 train.py config/ufo_qwen2.5_3b.py \
        --init_from=Qwen2.5-3B-Instruct --train_data=MetaMathQA-395K.json

This project's choices, not numbers from the paper: the batch sizes (for one 8-GPU node), the group filter,
the asymmetric clip range (clip_high 0.28) and the dual clip.
Tests (every key valid, the plan fits): python -m pytest -q tests/test_config.py tests/test_plan.py
"""
out_dir = "out/ufo_qwen2.5_3b"
init_from = "Qwen2.5-3B-Instruct"  # a local HF checkpoint directory; override with --init_from
dtype = "bfloat16"
train_data = "MetaMathQA-395K.json"
train_format = "metamath"  # keeps only the MATH_ rows
eval_data = "math500"  # the bundled MATH500 test set
eval_format = "auto"
n_eval_problems = 500

max_turns = 5
feedback = "Try again."
turn_decay = 0.5  # reward 0.5**t for a solve at turn t
repetition_penalty = 0.5
format_penalty = 0.1  # subtracted: -0.1 per attempt without an extractable answer
reward_placement = "last"

problems_per_step = 8
n_samples_per_problem = 16
keep_groups = 2  # the groups with the largest reward spread
max_new_tokens = 400
temperature = 1.0
eval_temperature = 0.5
eval_k = 5

algorithm = "ufo_ppo"
reward = "gold"
ppo_epochs = 1
minibatch_size = 8
actor_lr = 1e-6
critic_lr = 1e-5
grad_clip = 1.0
weight_decay = 0.01
clip_low = 0.2
clip_high = 0.28
dual_clip = 3.0
value_clip = 0.5
entropy_coef = 0.001
kl_coef = 0.001
kl_estimator = "k1"
kl_in = "reward"
gamma = 1.0
lam = 1.0
aggregation = "seq-mean"  # seq-mean-token-mean

# memory: python -m nanoufo.plan config/ufo_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 (and --gpus=1 --tp=1
# --gpu_mem_gib=141 for one H200) says both fit; an episode is at most 512 + 5 x 400 + 4 x 32 = 2,640 tokens
micro_batch_tokens = 4096  # per forward/backward; gradients accumulate over the minibatch of 8 episodes
pack_sequences = True
checkpoint_activations = False
kv_budget_gb = 8.0  # rollout KV cache per GPU: every one of the 128 episodes at once (2,640 tokens, TP=2)

max_steps = 200
eval_interval = 20
ckpt_interval = 20
plot_interval = 10
