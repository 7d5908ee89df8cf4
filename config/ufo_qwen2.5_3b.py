"""UFO (Liu et al. 2025, "A Simple 'Try Again' Can Elicit Multi-Turn LLM Reasoning") on Qwen2.5-3B-Instruct:
PPO with a critic on MetaMathQA's MATH_ rows, 5-turn episodes, as UFO's code runs it (lichengliu03/unary-feedback,
read 2026-12-06), except where the paper's text or a held-out evaluation says otherwise.

    torchrun --standalone --nproc_per_node=2 train.py config/ufo_qwen2.5_3b.py \\
        --init_from=Qwen2.5-3B-Instruct --train_data=MetaMathQA-395K.json

| setting | UFO's code (file) | here | same, or why not |
|---|---|---|---|
| model, data | Qwen2.5-3B-Instruct, MetaMathQA MATH_ rows (config/base.yaml, ragen/env/metamathqa/env.py) | same | same |
| turns, tokens per turn | 5 (agent_proxy.max_turn), 400 (rollout.response_length) | max_turns 5, max_new_tokens 400 | same |
| context | 8,192 tokens for a whole episode (rollout.max_model_len); no prompt limit (prompt_length "useless") | max_prompt_tokens 512: an episode is at most 512 + 5 x 400 + 4 x 32 = 2,640 tokens | bounded from the prompt up, so that the sampler's cache and CUDA graphs are sized once per run; longer prompts are skipped |
| system prompt | "You're a helpful assistant. " (ragen/llm_agent/ctx_manager.py) | system_prompt | same |
| user turn | env_instruction, then "Turn 1: State: <question> You have 5 actions left. Always output: <think> ..." (config/envs.yaml, ctx_manager.py) | instruction, user_template | same text |
| answer format | <think>..</think><answer>..</answer>, "<think>" forced (enable_think, ctx_manager.py) | answer_format think_answer | same; an answer holding the action separator (two bars) stays one answer (the code splits it into actions) |
| grading | exact match, lower-cased, whitespace removed (env.py _check_answer) | grading exact | same (math-verify: grading=math_verify) |
| feedback | "Reward: 0.0", then "Turn k: State: Incorrect. Please think again. You have n actions left. ..." (env.py, ctx_manager.py) | "Try again." | the paper's text: only "Try again." is shown; the code's turn is _UFO_CODE_FEEDBACK below |
| reward | 1/2^k, k the earlier answered attempts; -0.5 (1 - E/T) over answered attempts at the end; -0.1 per turn without an answer (env.py, es_manager.py) | turn_decay 0.5, repetition_penalty 0.5, format_penalty 0.1 | same; E counts acceptable answers only, answers normalised by nanoufo.grader.normalize_answer (the code: lower-cased, no whitespace) |
| reward placement | the sum on the last turn (use_turn_scores False) | reward_placement last | same |
| batch | 8 problems x 16 samples, the 2 groups of largest reward std (rollout_filter_ratio 0.25), minibatches of 8, 1 epoch | same | same; minibatches are shuffled here, split in order there |
| PPO | GAE gamma = lambda = 1, whitened; clip 0.2 / 0.28; no dual clip (ragen/workers/actor/dp_actor.py); value clip 0.5; entropy 0.001 | same, dual_clip 0 | same |
| KL | k1 in the reward, fixed 0.001 (algorithm.kl_ctrl) | kl_estimator k1, kl_in reward | same |
| loss | micro-batches of one sequence: each sequence's token mean, then the mean over sequences, actor and critic | aggregation seq-mean | same |
| optimizer | AdamW, actor lr 1e-6, critic lr 1e-5, constant, weight decay 0.01 (fsdp_workers.py), grad clip 1.0 | same | same |
| steps, temperatures | 200; 1.0 to sample, 0.5 to evaluate | same | same |
| evaluation | 128 questions of the training pool | MATH500 (500 held-out problems) | held out on purpose |

Memory: python -m nanoufo.plan config/ufo_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 (and --gpus=1 --tp=1
--gpu_mem_gib=141 for one H200) says both fit, with CUDA graphs at 2 x 80 GB (on one H200 cuda_graphs=auto leaves
them off: the decoder they keep does not fit beside the update).
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

_FORMAT = ("Always output: <think> [Your thoughts] </think> <answer> [your answer] </answer> with no extra text. "
           "Strictly follow this format. Max response length: 1000 words (tokens).\n")
system_prompt = "You're a helpful assistant. "
instruction = "You are solving Math problems. Only give the final answer between <answer> and </answer>."
user_template = "{instruction}\nTurn 1:\nState:\n{question}\nYou have {actions_left} actions left. " + _FORMAT
answer_format = "think_answer"
grading = "exact"
_UFO_CODE_FEEDBACK = ("Reward:\n{reward}\n\nTurn {turn}:\nState:\nIncorrect. Please think again.\n"
                      "You have {actions_left} actions left. " + _FORMAT)  # feedback = _UFO_CODE_FEEDBACK: the code's
feedback = "Try again."

max_turns = 5
turn_decay = 0.5  # reward 0.5**k for a solve after k answered attempts
repetition_penalty = 0.5
format_penalty = 0.1  # subtracted: -0.1 per attempt without an answer
reward_placement = "last"

problems_per_step = 8
n_samples_per_problem = 16
keep_groups = 2  # the groups with the largest reward spread
max_prompt_tokens = 512  # longer prompts are skipped
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
dual_clip = 0.0  # none
value_clip = 0.5
entropy_coef = 0.001
kl_coef = 0.001
kl_estimator = "k1"
kl_in = "reward"
gamma = 1.0
lam = 1.0
aggregation = "seq-mean"  # seq-mean-token-mean, for the actor and the critic

micro_batch_tokens = 4096  # per forward/backward; gradients accumulate over the minibatch of 8 episodes
pack_sequences = True
checkpoint_activations = False
kv_budget_gb = 8.0  # rollout KV cache per GPU: every one of the 128 episodes at once (2,640 tokens, TP=2)

max_steps = 200
eval_interval = 20
ckpt_interval = 20
plot_interval = 10
