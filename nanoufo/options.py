"""The options each part of the library reads, one dataclass per part, with their defaults and checks:
EnvOptions (nanoufo/env.py: how an episode is written, read and rewarded), SamplingOptions (nanoufo/sampler.py:
how attempts are sampled) and UpdateOptions with its LossOptions (nanoufo/trainer.py: how a rollout becomes
an update). Each travels whole, as one object; nanoufo/config.py's TrainConfig inherits all of them, so a
run's config is one of each and every key is declared once, here. The defaults are the built-in demo run's
(`python train.py`); config/*.py set the papers'. Nothing here imports torch, so a config is checked in
a fraction of a second.

    from nanoufo.options import EnvOptions, SamplingOptions, UpdateOptions
    env = UFOEnv(tokenizer, EnvOptions(max_turns=5, answer_format="think_answer", grading="exact"))
    graded = run_episodes(model, env, problems, SamplingOptions(max_new_tokens=400, temperature=1.0), noise)
    batch, stats = build_batch(UpdateOptions(algorithm="grpo", kl_coef=0.0), actor, None, None, scored)

Tests: python -m pytest -q tests/test_config.py
"""
import math
from dataclasses import dataclass

ANSWER_FORMATS = ("boxed", "think_answer")  # how an attempt is read (nanoufo/env.py READERS)
GRADINGS = ("math_verify", "exact")
STOP_TOKENS = ("turn_end", "generation_config")  # which tokens end an attempt (nanoufo/env.py UFOEnv.stop_ids)
REPETITION_CHARGED = ("any_answer", "solved_or_all_answered")  # which episodes pay the repetition penalty
DISTINCT_BY = ("normalized", "squeezed")  # the spelling under which two answers are one (nanoufo/grader.py answer_key)
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PRM_AGGREGATES = ("min", "product")  # how a response's step scores make one score (nanoufo/prm.py)
CUDA_GRAPHS = ("auto", "true", "false")  # auto: on a CUDA device (nanoufo/cuda_graphs.py graphs_wanted)
ALGORITHMS = ("ufo_ppo", "grpo")
REWARDS = ("gold", "self_certainty", "prm")
PLACEMENTS = ("last", "per_turn", "per_step")
# seq-mean: seq-mean-token-mean's short name; chunk-token-mean: verl's token-mean per micro-batch (nanoufo/rl.py)
AGGREGATIONS = ("token-mean", "seq-mean", "seq-mean-token-mean", "chunk-token-mean")
KL_ESTIMATORS = ("k1", "k3")
KL_PLACES = ("reward", "loss")


@dataclass
class EnvOptions:
    """How an episode is written, read and rewarded (nanoufo.env.UFOEnv)."""
    max_turns: int = 5  # attempts per episode
    feedback: str = "Try again."  # may hold {reward}, {turn}, {actions_left} (UFO's code's feedback turn)
    instruction: str = BOXED_INSTRUCTION  # the user turn's {instruction}
    system_prompt: str | None = None  # None: the chat template's own default system message (Qwen's), if any
    user_template: str = "{question} {instruction}"  # the user turn; also {actions_left} (= max_turns)
    answer_format: str = "boxed"  # "boxed" (last \\boxed{}, else <answer>) or "think_answer" (UFO's code)
    grading: str = "math_verify"  # math equivalence, or "exact" (UFO's code: lower-cased, whitespace removed)
    grade_timeout: float = 5.0  # seconds of math-verify per answer before it counts as wrong
    # "turn_end": <|im_end|> and the end-of-text tokens (a multi-turn episode needs the turn's end);
    # "generation_config": the tokenizer's eos and the checkpoint's generation_config.json eos_token_id, where
    # vLLM stops (a base Qwen2.5: <|endoftext|> only, so an <|im_end|> inside a response does not end it)
    stop_tokens: str = "turn_end"
    # rewards (magnitudes; the penalties are subtracted). The demo's: a solve at any attempt counts fully and an
    # invalid answer costs 0.5 (docs/demo-history.md); UFO's code: 0.5, 0.5, 0.1
    turn_decay: float = 1.0  # a solve after t answered attempts earns turn_decay ** t
    repetition_penalty: float = 0.5  # times (1 - distinct answers / answered attempts), at the end
    # which episodes pay it: "any_answer" (every episode that gave an answer), or "solved_or_all_answered"
    # (UFO's code: only one that ends solved or after max_turns answered attempts, so an episode that runs out
    # of turns with an attempt without an answer is never charged)
    repetition_charged: str = "any_answer"
    # the spelling under which two answers are one repeat: "normalized" (nanoufo.grader.normalize_answer: LaTeX
    # forms folded, case kept) or "squeezed" (UFO's code: lower-cased, whitespace removed, nothing else)
    distinct_by: str = "normalized"
    format_penalty: float = 0.5  # per attempt without an answer the task can accept

    def __post_init__(self):
        check_env_options(self)


def check_env_options(options: EnvOptions) -> None:
    """ValueError naming the first option out of its range (config.validate calls it on the run's config)."""
    if options.max_turns < 1:
        raise ValueError(f"config: max_turns={options.max_turns} must be at least 1")
    choices = (("answer_format", ANSWER_FORMATS), ("grading", GRADINGS), ("stop_tokens", STOP_TOKENS),
               ("repetition_charged", REPETITION_CHARGED), ("distinct_by", DISTINCT_BY))
    for key, allowed in choices:
        if getattr(options, key) not in allowed:
            raise ValueError(f"config: {key}={getattr(options, key)!r} is not one of {', '.join(allowed)}")
    for key in ("turn_decay", "repetition_penalty", "format_penalty", "grade_timeout"):
        if not 0 <= getattr(options, key) < float("inf"):
            raise ValueError(f"config: {key}={getattr(options, key)} must be a finite number >= 0")


@dataclass
class SamplingOptions:
    """How attempts are sampled (nanoufo.sampler.generate). A run's held-out evaluations replace temperature and
    top_p with its eval_temperature and eval_top_p (TrainConfig.sampling)."""
    max_new_tokens: int = 16  # per attempt (the demo's: its answers are a few characters)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    kv_budget_gb: float = 0.0  # rollout KV cache per rank, GiB (an ended episode's row takes the next); 0: a row each
    # decode steps as CUDA graph replays, captured once per run (they keep the KV cache): "auto" on a CUDA device,
    # "true" (a failed capture ends the run) or "false"
    cuda_graphs: str = "auto"

    def __post_init__(self):
        check_sampling_options(self)

    @property
    def kv_budget_bytes(self) -> int | None:
        return int(self.kv_budget_gb * 2**30) or None


def check_sampling_options(options: SamplingOptions) -> None:
    """ValueError naming the first option out of its range (config.validate calls it on the run's config)."""
    if options.max_new_tokens < 1:
        raise ValueError(f"config: max_new_tokens={options.max_new_tokens} must be at least 1")
    if not (0.0 <= options.temperature < math.inf and 0.0 < options.top_p <= 1.0):
        raise ValueError(f"config: temperature={options.temperature} must be >= 0 (0: greedy) and "
                         f"top_p={options.top_p} in (0, 1]")
    if not 0 <= options.kv_budget_gb < math.inf:
        raise ValueError(f"config: kv_budget_gb={options.kv_budget_gb} must be a finite number >= 0")
    if options.cuda_graphs not in CUDA_GRAPHS:
        raise ValueError(f"config: cuda_graphs={options.cuda_graphs!r} is not one of {', '.join(CUDA_GRAPHS)}")


@dataclass
class LossOptions:
    """The PPO losses (nanoufo.trainer.policy_loss, critic_loss): the clipped surrogate, its KL and entropy terms,
    the critic's clipped value loss and how token losses are averaged."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0  # caps the loss of a negative-advantage token at -A * dual_clip; 0 = none (UFO's actor)
    value_clip: float = 0.5
    entropy_coef: float = 0.001
    kl_coef: float = 0.001  # > 0 needs a reference model (build_batch refuses to go without one)
    kl_estimator: str = "k1"
    kl_clamp: float = 10.0  # k3's value capped here, as verl's low_var_kl (zero gradient past it); 0 = no cap
    kl_in: str = "reward"  # "reward": a per-token penalty (UFO), "loss": a term of the policy loss (GRPO)
    aggregation: str = "token-mean"
    chunk_rows: int = 4  # chunk-token-mean's rows per chunk (verl's ppo_micro_batch_size_per_gpu)


@dataclass
class UpdateOptions(LossOptions):
    """Everything nanoufo.trainer's score_rollout, build_batch and ppo_update read. The defaults are UFO's PPO with
    a critic, tuned for the demo. Plain GRPO (DeepSeekMath's, TRL's default loss) is algorithm="grpo", clip_high=0.2,
    dual_clip=0, entropy_coef=0, with kl_in="loss" and kl_estimator="k3" (or kl_coef=0 and no reference model)."""
    algorithm: str = "ufo_ppo"  # "ufo_ppo": GAE over a critic's values; "grpo": group-normalised scores
    reward: str = "gold"  # the environment's; "self_certainty" (Intuitor, label-free); "prm" (a process reward model)
    reward_placement: str = "last"  # "last" token of the episode, "per_turn" (each attempt's), "per_step" (PRM)
    keep_groups: int = 0  # groups kept by the reward-spread filter; 0 keeps all
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    ppo_epochs: int = 4
    minibatch_size: int = 32  # episodes per optimizer step
    grad_clip: float = 1.0  # bound on each model's whole gradient norm per optimizer step; 0 = no clipping
    micro_batch_tokens: int = 0  # tokens per forward/backward; gradients accumulate over a minibatch. 0 = no split
    pack_sequences: bool = True  # micro-batches hold trajectories end to end (no padding) instead of padded rows
    checkpoint_activations: bool = False  # recompute each transformer block in the backward

    def __post_init__(self):
        check_update_options(self)


def check_update_options(o: UpdateOptions) -> None:
    """ValueError naming the first option out of its range or combination (config.validate calls it on the
    run's config)."""
    choices = dict(algorithm=ALGORITHMS, reward=REWARDS, reward_placement=PLACEMENTS, aggregation=AGGREGATIONS,
                   kl_estimator=KL_ESTIMATORS, kl_in=KL_PLACES)
    for key, allowed in choices.items():
        if getattr(o, key) not in allowed:
            raise ValueError(f"config: {key}={getattr(o, key)!r} is not one of {', '.join(allowed)}")
    for key in ("ppo_epochs", "minibatch_size", "chunk_rows"):
        if getattr(o, key) < 1:
            raise ValueError(f"config: {key}={getattr(o, key)} must be at least 1")
    for key in ("micro_batch_tokens", "keep_groups", "kl_coef", "kl_clamp", "grad_clip", "entropy_coef", "value_clip"):
        if not 0 <= getattr(o, key) < math.inf:
            raise ValueError(f"config: {key}={getattr(o, key)} must be a finite number >= 0")
    if not (0.0 <= o.clip_low < 1.0 and o.clip_high >= 0.0 and (o.dual_clip > 1.0 or o.dual_clip == 0)):
        raise ValueError("config: need 0 <= clip_low < 1, clip_high >= 0 and dual_clip > 1 (or 0: none)")
    if o.reward_placement == "per_turn" and (o.algorithm != "ufo_ppo" or o.reward == "self_certainty"):
        raise ValueError("config: reward_placement='per_turn' needs algorithm='ufo_ppo' and reward='gold' or 'prm' "
                         "(GRPO and self-certainty give one score per episode)")
    if o.reward_placement == "per_step" and (o.algorithm != "ufo_ppo" or o.reward != "prm"):
        raise ValueError("config: reward_placement='per_step' needs algorithm='ufo_ppo' and reward='prm' "
                         "(only a process reward model scores steps)")
