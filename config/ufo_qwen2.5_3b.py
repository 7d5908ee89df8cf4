r"""UFO (Liu et al. 2025, "A Simple 'Try Again' Can Elicit Multi-Turn LLM Reasoning") on Qwen2.5-3B-Instruct:
PPO with a critic on MetaMathQA's MATH_ rows, 5-turn episodes, as UFO's code runs it (lichengliu03/unary-feedback,
read again 2026-12-07), except where the paper's text or a held-out evaluation says otherwise. Each "same" below holds of
the line it cites; the rewards are checked against episodes worked by hand from that code
(tests/test_ufo_reward.py).

    torchrun --standalone --nproc_per_node=2 train.py config/ufo_qwen2.5_3b.py \
        --init_from=Qwen2.5-3B-Instruct --train_data=MetaMathQA-395K.json

| setting | UFO's code (file:line at commit b9eb4bd, 2025-08-15) | here | same, or why not |
|---|---|---|---|
| model, data | Qwen2.5-3B-Instruct (config/base.yaml:10); MetaMathQA's rows whose type starts with MATH_ (ragen/env/metamathqa/env.py:17-20) | init_from, train_data | same |
| gold answer | everything after the first "The answer is: " to the end of the response, stripped (env.py:32-37, 46) | train_format metamath_first | same, as format metamath_first (a quirk: a response that states its answer twice keeps both statements, and "5." keeps its full stop, which exact grading then asks for; format metamath reads the last statement's line without it); a row without that text stays in the pool there, never solvable, and is skipped here |
| turns, tokens per turn | 5 (agent_proxy.max_turn, base.yaml:111), 400 (rollout.response_length, base.yaml:51) | max_turns 5, max_new_tokens 400 | same |
| context | 8,192 tokens for a whole episode (rollout.max_model_len, base.yaml:49); no prompt limit (prompt_length "useless", base.yaml:50) | max_prompt_tokens 512: an episode is at most 512 + 5 x 400 + 4 x 32 = 2,640 tokens | bounded from the prompt up, so that the sampler's cache and CUDA graphs are sized once per run; longer prompts are skipped and counted |
| system prompt | "You're a helpful assistant. " (ragen/llm_agent/ctx_manager.py:298) | system_prompt | same |
| user turn | env_instruction (config/envs.yaml:91), then "\nTurn 1:\nState:\n<question>\nYou have 5 actions left. Always output: <think> [Your thoughts] </think> <answer> [your answer] </answer> with no extra text. Strictly follow this format. Max response length: 1000 words (tokens).\n" (ctx_manager.py:302-307; 1000: envs.yaml:92) | instruction, user_template | same text, its final newline included (the question is stripped of surrounding whitespace here) |
| answer format | "<think>" forced (ctx_manager.py:318-323, enable_think base.yaml:115); the first <think>..</think><answer>..</answer>, tags removed, stripped (ctx_manager.py:202-219) | answer_format think_answer | same; an answer holding the action separator, two bars (base.yaml:112), stays one answer here, the code splits it into up to 5 actions (ctx_manager.py:219-224) |
| grading | equal after lower-casing and removing whitespace (env.py:100-116) | grading exact | same (math-verify: grading=math_verify) |
| feedback | "Reward:\n<reward>\n", then "\nTurn k:\nState:\nIncorrect. Please think again.\nYou have n actions left. ..." (ctx_manager.py:302-312, env.py:87) | "Try again." | the paper's text: only "Try again." is shown; the code's turn is _UFO_CODE_FEEDBACK below |
| turn decay | 1/2^k on the correct answer, k the earlier answered attempts (env.py:59, 68); a turn without an answer never steps the env (es_manager.py:155-156) | turn_decay 0.5 | same |
| format penalty | -0.1 per turn without an answer (es_manager.py:157-158, base.yaml:124), added to the episode's score (ctx_manager.py:268-272) | format_penalty 0.1 | same (with exact grading every answer is acceptable here, as every parsed action is valid there: es_manager.py:227-237) |
| repetition penalty | 0.5 (1 - E/T) over the answered attempts (env.py:29, 75-79), computed only on the step that ends the episode: a correct answer, or the 5th answered attempt (env.py:30, 75); an episode whose turns run out with one unanswered is never charged | repetition_penalty 0.5, repetition_charged solved_or_all_answered | same, as option repetition_charged (a quirk: ending on a turn without an answer escapes the penalty: answers 1, 1, 1, 1, none score -0.1 there, 1, 1, 1, 1, 1 score -0.4) |
| distinct answers E | counted lower-cased with whitespace removed, nothing else (env.py:61-62, 93-98) | distinct_by squeezed | same, as option distinct_by (a quirk: \dfrac{1}{2} after \frac{1}{2} counts as a new answer, X after x as a repeat); E counts acceptable answers only here, every answer there: the same answers under exact grading |
| reward placement | the sum on the last token (use_turn_scores False, base.yaml:114; ctx_manager.py:108-111) | reward_placement last | same |
| batch, group filter | 8 problems x 16 samples (base.yaml:126-131); the 2 groups whose episode scores, format penalty included, have the largest std (rollout_filter_ratio 0.25, std: base.yaml:55-56; ragen/trainer/agent_trainer.py:331-341 ranks original_rm_scores, the tensor ctx_manager.py:269-278 wrote the penalty into in place) | keep_groups 2 | same (the population std here, the sample std there: the same order for groups of one size; ties may break differently) |
| minibatches | 8 trajectories per optimizer step (ppo_mini_batch_size, base.yaml:9; ragen/workers/fsdp_workers.py:132-133), split in order (ragen/workers/actor/dp_actor.py:271), 1 epoch (ppo_trainer.yaml:39) | minibatch_size 8, ppo_epochs 1 | same size; shuffled here |
| PPO | GAE gamma = lambda = 1 (base.yaml:88-89), whitened (verl/verl/trainer/ppo/core_algos.py:106); clip 0.2 / 0.28 (base.yaml:33-34); no dual clip (dp_actor.py:40-52); value clip 0.5 (ppo_trainer.yaml:140); entropy 0.001 (base.yaml:29) | same, dual_clip 0 | same |
| KL | k1 in the reward, fixed 0.001 (base.yaml:30, 91-94; agent_trainer.py:469-473) | kl_estimator k1, kl_in reward | same |
| loss | micro-batches of one sequence (base.yaml:8, 26-27, 71): each sequence's token mean divided by the accumulation steps, actor and critic (dp_actor.py:286-288, 338; ragen/workers/critic/dp_critic.py:201-202, 234) | aggregation seq-mean | same |
| critic | the model's trunk with a token-classification head (fsdp_workers.py:823-841): Linear(hidden, 1) with a bias, weights N(0, initializer_range), bias 0 (transformers 4.53.3, requirements.txt:17: Qwen2ForTokenClassification and Qwen2PreTrainedModel._init_weights) | critic_head_init normal | same (drawn from the run's seed) |
| optimizer | AdamW, actor lr 1e-6 (ppo_trainer.yaml:45), critic lr 1e-5 (ppo_trainer.yaml:109), constant without warm-up (ppo_trainer.yaml:46-47, 110), weight decay 0.01 (fsdp_workers.py:300-303, 906-909), grad clip 1.0 (ppo_trainer.yaml:32, 139) | same | same |
| steps, temperatures | 200 (base.yaml:99); 1.0 to sample (base.yaml:54), 0.5 to evaluate (base.yaml:59-61) | same | same |
| evaluation | 128 questions of the training pool (base.yaml:132-137) | MATH500 (500 held-out problems) | held out on purpose |
| text trained on | each parsed turn re-rendered as <think>{think}</think><answer>{answer}</answer> (ctx_manager.py:215-226), later turns and the training sequence built from it, positions counted from 1 (ctx_manager.py:308-309, 318, 327-329); the loss mask runs from each assistant turn's "assistant\n" to the next turn's start token (ctx_manager.py:44-46, 114-116, 333-334; base.yaml:11; agent_trainer.py:421) | the sampled tokens and their stop token | not reproduced: there the ratio is taken on a text the model did not sample (whitespace around and outside the tags dropped) and tokens the model never chose carry the advantage and enter the whitening (each turn's header "assistant\n", its forced "<think>", the newline after it and the next turn's start token); here the loss is on exactly what was sampled and later turns see the attempt as sampled |

Memory: python -m nanoufo.plan config/ufo_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 (and --gpus=1 --tp=1
--gpu_mem_gib=141 for one H200) says both fit, with CUDA graphs at 2 x 80 GB (on one H200 cuda_graphs=auto leaves
them off: the decoder they keep does not fit beside the update).
Tests (every key valid, the plan fits): python -m pytest -q tests/test_config.py tests/test_plan.py
"""
out_dir = "out/ufo_qwen2.5_3b"
init_from = "Qwen2.5-3B-Instruct"  # a local HF checkpoint directory; override with --init_from
dtype = "bfloat16"
train_data = "MetaMathQA-395K.json"
train_format = "metamath_first"  # only the MATH_ rows; the gold as UFO's code reads it (the table)
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
repetition_charged = "solved_or_all_answered"  # as UFO's code: only on the step that ends its environment
distinct_by = "squeezed"  # as UFO's code: answers lower-cased, whitespace removed
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
critic_head_init = "normal"  # N(0, 0.02) weights, as transformers starts verl's critic head
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
