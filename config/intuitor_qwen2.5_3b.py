r"""Intuitor (Zhao et al. 2025, "Learning to Reason without External Rewards") on Qwen2.5-3B: GRPO whose reward is
the policy's own self-certainty, so the training rows need no gold answers (a file of questions will do),
single-turn, one epoch of MATH, as the Intuitor repository's verl run does it (sunblaze-ucb/Intuitor,
verl-intuitor/math_intuitor.sh with its configs, read again 2026-12-07). Each "same" below holds of the line it
cites.

    python train.py config/intuitor_qwen2.5_3b.py --init_from=Qwen2.5-3B --tp=1 --train_data=MATH/train.jsonl

| setting | Intuitor's verl run (verl-intuitor/ file:line at commit 3f0cdd7, 2025-07-10) | here | same, or why not |
|---|---|---|---|
| model, data | Qwen2.5-3B, the base model (math_intuitor.sh:16); MATH-lighteval's train split, 7,500 problems, shuffled with seed 42 (examples/data_preprocess/math_dataset_ours.py:42-46, 90) | init_from, train_data | same problems; the order is the run's seed's here |
| system prompt, user turn | "You are a helpful AI Assistant, ... \boxed{Your Answer}. Please stop generation immediately after outputing the box."; the bare problem (math_dataset_ours.py:51, 56-57, 71-74, the README's --model Qwen2.5-3B); the chat template applied to the base model (verl/utils/dataset/rl_dataset.py:265) | system_prompt, user_template "{question}" | same text (the README: results depend on the prompt); the question is stripped of surrounding whitespace here (MATH500's 500 problems have none) |
| prompt filter | a chat-templated prompt, generation prompt included, over 512 tokens is dropped from the train and validation sets (math_intuitor.sh:12, 14; rl_dataset.py:142-177) | max_prompt_tokens 512 (nanoufo/task.py) | same for training, the skipped prompts counted at the start; the held-out sets are kept whole (4 of MATH500's prompts are over 512 tokens with this prompt) |
| stop token | vLLM's own stops, the tokenizer's eos and the generation_config's eos_token_id (vLLM's SamplingParams.update_from_generation_config; setup.py:51 allows vllm 0.7.3 to 0.8.5): the rollout names no stop list (verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py:191-205; ignore_eos False, verl/trainer/config/rollout/rollout.yaml:32); the response mask runs to the first eos of the generation_config, included (verl/workers/fsdp_workers.py:733-741; vllm_rollout_spmd.py:364-366; verl/utils/torch_functional.py:239-259) | stop_tokens generation_config | same: the ids are read from the checkpoint (for Qwen2.5-3B both files name <|endoftext|>, 151643; not checked here, no checkpoint on this machine), so an <|im_end|> inside a response does not end it |
| reward | self-certainty, masked mean over the response (verl/trainer/ppo/ray_trainer.py:274-289) | reward self_certainty | same |
| advantage | (score - group mean) / (sample std + 1e-6) over each prompt's 8 responses (ray_trainer.py:291-296; verl/trainer/ppo/core_algos.py:283-309) | algorithm grpo | same |
| samples | 128 problems x 8 (math_intuitor.sh:11, 34) | same | same (open-r1-intuitor's recipe uses 7) |
| steps | one epoch of batches of 128, the last partial batch dropped (ray_trainer.py:617-621, 647; total_epochs 1, math_intuitor.sh:47): 58 when at least 7,424 prompts pass the filter | max_steps 58 | same when at least 7,424 of the 7,500 prompts fit (train.py prints how many were skipped) |
| update | one optimizer step per rollout (ppo_mini_batch_size 128 problems, math_intuitor.sh:22; fsdp_workers.py:182-183), 1 epoch (verl/trainer/config/actor/actor.yaml:82) | minibatch_size 1024, ppo_epochs 1 | same |
| loss mean | token-mean (actor.yaml:63; core_algos.py:702-703) over each micro-batch of 4 sequences (math_intuitor.sh:23), divided by the accumulation steps (verl/workers/actor/dp_actor.py:498-503, 598) and averaged over the 8 GPUs: a token weighs 1 / (256 x its micro-batch's tokens) | aggregation chunk-token-mean, chunk_rows 4 | same weights; the 4 rows that share a mean are consecutive rows of the shuffled minibatch here, of the length-balanced order there (balance_batch, verl/trainer/config/ppo_trainer.yaml:183; ray_trainer.py:1222-1223) |
| PPO | clip 0.2 / 0.2 (actor.yaml:33, 36), dual clip 3 (clip_ratio_c, actor.yaml:60), entropy 0 (math_intuitor.sh:27) | same | same |
| KL | in the loss, low_var_kl (k3 clamped to [-10, 10], core_algos.py:1058-1064), coefficient 0.005 (math_intuitor.sh:24-26) | kl_in loss, k3, kl_clamp 10, kl_coef 0.005 | same |
| optimizer | AdamW lr 3e-6 (math_intuitor.sh:18), weight decay 0.01 (actor.yaml:111), grad clip 1.0 (verl/trainer/config/actor/dp_actor.yaml:20); cosine to 0 (math_intuitor.sh:19; min_lr_ratio 0, dp_actor.yaml:45) after a linear warm-up of int(0.1 x 58) = 5 steps from lr 0 (math_intuitor.sh:20; fsdp_workers.py:437-439; torch_functional.py:556-561), the scheduler stepped after each update (fsdp_workers.py:706-708) | same | same (nanoufo/schedule.py: 0, 0.6e-6, ..., 2.4e-6, then 3e-6 at step 5) |
| lengths, temperature | 512 prompt tokens, 3,072 new tokens (math_intuitor.sh:12-13), temperature 1.0 (rollout.yaml:8) | max_prompt_tokens 512, max_new_tokens 3072 | same |
| evaluation | MATH test, greedy (val_kwargs temperature 0, do_sample False: rollout.yaml:98-114) | MATH500 and GSM8K, greedy | the paper's tables' sets |

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
aggregation = "chunk-token-mean"  # verl's token-mean per micro-batch of 4 sequences (the table)
chunk_rows = 4
stop_tokens = "generation_config"  # the checkpoint's eos (a base Qwen2.5: <|endoftext|>), not also <|im_end|>

# memory: python -m nanoufo.plan config/intuitor_qwen2.5_3b.py --gpus=2 --gpu_mem_gib=80 says it fits
micro_batch_tokens = 8192  # per forward/backward; gradients accumulate over the minibatch of 1024 episodes
pack_sequences = True
checkpoint_activations = False
kv_budget_gb = 16.0  # rollout KV cache per GPU: ~260 rows of 3,584 tokens at TP=2 (of 1024 episodes per step)

max_steps = 58  # one epoch: 7,500 MATH training problems / 128 per step
eval_interval = 10
ckpt_interval = 10
plot_interval = 5
