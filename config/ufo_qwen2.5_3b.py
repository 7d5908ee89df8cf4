"""UFO's setting (DESIGN.md section 3): Qwen2.5-3B-Instruct, MetaMathQA MATH_ rows, 5-turn episodes with
"Try again." feedback, PPO with a critic, GAE gamma = lambda = 1, KL to the reference as a k1 reward
penalty (0.001), actor lr 1e-6, critic lr 1e-5, 200 steps, temperature 1.0 to train and 0.5 to evaluate.

    torchrun --standalone --nproc_per_node=2 train.py config/ufo_qwen2.5_3b.py \
        --init_from=Qwen2.5-3B-Instruct --train_data=MetaMathQA-395K.json

The batch sizes are this project's choice for one 8-GPU node, not numbers from the paper.
"""
out_dir = "out/ufo_qwen2.5_3b"
init_from = "Qwen2.5-3B-Instruct"  # a local HF checkpoint directory; override with --init_from
dtype = "bfloat16"
train_data = "MetaMathQA-395K.json"
train_format = "metamath"  # keeps only the MATH_ rows
eval_data = "data/math500/test.jsonl"
eval_format = "math500"
n_eval_problems = 500

max_turns = 5
feedback = "Try again."
turn_decay = 0.5  # reward 0.5**t for a solve at turn t
repetition_penalty = 0.5
format_penalty = 0.0
reward_placement = "last"

problems_per_step = 128
n_samples_per_problem = 4
keep_groups = 64  # the groups with the largest reward spread
max_new_tokens = 1024
temperature = 1.0
eval_temperature = 0.5
eval_k = 5

algorithm = "ufo_ppo"
reward = "gold"
ppo_epochs = 1
minibatch_size = 64
actor_lr = 1e-6
critic_lr = 1e-5
grad_clip = 1.0
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
aggregation = "token-mean"

# memory: python -m nanoufo.plan config/ufo_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 (and --gpus=1 --tp=1
# --gpu_mem_gib=141 for one H200) says both fit; an episode is at most 512 + 5 x 1024 + 4 x 32 = 5,760 tokens
micro_batch_tokens = 6144  # per forward/backward; gradients accumulate over the minibatch of 64 episodes
pack_sequences = True
checkpoint_activations = False
kv_budget_gb = 24.0  # rollout KV cache per GPU: ~240 rows of 5,760 tokens at TP=2 (120 at TP=1), not 512

max_steps = 200
eval_interval = 20
ckpt_interval = 20
plot_interval = 10
