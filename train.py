"""Train a Qwen2.5 policy with multi-turn RL from unary feedback (UFO), GRPO, or Intuitor's self-certainty.

    python train.py                                   # the built-in CPU demo: tiny model, "Guess my number" task
    python train.py --max_turns=1 --out_dir=out/demo_single          # the single-turn baseline
    python train.py --out_dir=out/demo --resume                        # continue from out/demo/latest
    python train.py config/ufo_qwen2.5_3b.py --init_from=Qwen2.5-3B-Instruct
    python train.py config/intuitor_qwen2.5_3b.py --init_from=Qwen2.5-3B
    torchrun --standalone --nproc_per_node=2 train.py config/ufo_qwen2.5_3b.py --init_from=...   # TP=2
    torchrun --standalone --nproc_per_node=8 train.py config/ufo_qwen2.5_3b.py --init_from=...   # DP=4 x TP=2
    python -m nanoufo.logger out/demo/log.jsonl                        # redraw the plot at any time
    python train.py config/ufo_qwen2.5_3b.py --help                   # this, the config's reference table, every key
    python train.py --log_to=jsonl,tensorboard                         # also TensorBoard events in out_dir/tensorboard

Each step samples episodes, scores them, keeps the groups with the largest reward spread, recomputes
log-probs, computes advantages and runs PPO epochs (nanoufo/trainer.py). Every key of nanoufo/config.py
can be set in a config file or as --key=value. Every checkpoint holds the run's config (run_config.json):
`python sample.py --ckpt=OUT_DIR` evaluates it as this script does. Ctrl-C or SIGTERM saves a checkpoint and exits.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_train_cli.py tests/test_soak.py tests/test_reliability.py
"""
import dataclasses
import functools
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoufo import demo
from nanoufo.checkpoint import load_checkpoint, save_checkpoint
from nanoufo.config import format_config, help_text, parse_args, save_config
from nanoufo.cuda_graphs import graphs_wanted
from nanoufo.evaluate import held_out_metrics, with_spread
from nanoufo.logger import RunLogger, check_sinks, plot_log
from nanoufo.metrics import summarize
from nanoufo.model import QwenConfig
from nanoufo.parallel import all_ranks_true, average_gradients, init_parallel, print0
from nanoufo.plan import make_plan, model_config
from nanoufo.prm import PRMReward, PRMScorer
from nanoufo.rollout import Noise, run_episodes
from nanoufo.sampler import Decoders, run_max_len
from nanoufo.schedule import set_learning_rates
from nanoufo.task import load_task
from nanoufo.trainer import build_batch, make_optimizers, ppo_update, score_rollout
from nanoufo.weights import load_model


def fail(message: str) -> None:
    """A user mistake (config, data): that one line on stderr and exit status 2, no traceback."""
    print(message, file=sys.stderr)
    sys.exit(2)


try:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(help_text([a for a in sys.argv[1:] if a not in ("-h", "--help")], __doc__))
        sys.exit(0)
    cfg = parse_args(sys.argv[1:])
    check_sinks(cfg.log_to)
except (KeyError, ValueError, TypeError, OSError) as error:
    fail(str(error.args[0] if isinstance(error, KeyError) else error))

# -------------------------------------------------------------------------- distributed, seeds, device
par = init_parallel(tp=cfg.tp, device=None if cfg.device == "auto" else cfg.device)
master = par.is_main
dtype = getattr(torch, cfg.dtype)
torch.manual_seed(cfg.seed + par.dp_rank)  # the ranks of a TP group must draw the same numbers
np.random.seed(cfg.seed + par.dp_rank)
out_dir = Path(cfg.out_dir)
if master:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.json")
print0(f"config (saved to {out_dir / 'config.json'}):\n{format_config(cfg)}")

# -------------------------------------------------------------------------- task, environments, options
start_dir = Path(cfg.init_from) if cfg.init_from else out_dir / "warmup"
try:  # a data set that cannot be read, or a checkpoint without config.json: one line, exit status 2
    task = demo.demo_task(cfg) if cfg.is_demo else load_task(cfg, model_config(cfg.init_from).max_position_embeddings,
                                                               report=print0)
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
env, eval_env = task.env(cfg), task.env(cfg, evaluation=True)  # Succ@k needs k turns, whatever training used
eval_sampling, update = cfg.sampling(evaluation=True), cfg.update_options()
train_problems = task.train
if cfg.is_demo and not all(env.prompts_fit([p.question for p in train_problems], cfg.max_prompt_tokens)):
    fail(f"config: max_prompt_tokens={cfg.max_prompt_tokens} is shorter than the demo's prompts")


@functools.lru_cache(maxsize=2)
def epoch_order(epoch: int) -> list[int]:
    return torch.randperm(len(train_problems), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()


def problems_at(position: int, n: int) -> list:
    """n problems of the shuffled stream from `position` on; the order depends only on the position (which
    a checkpoint stores), epoch e being shuffled with seed + e."""
    return [train_problems[epoch_order(i // len(train_problems))[i % len(train_problems)]]
            for i in range(position, position + n)]


# -------------------------------------------------------------------------- memory plan (before any weight is read)
try:  # the demo's tiny model is not written yet on its first run
    shape = QwenConfig(vocab_size=len(task.tokenizer), **demo.TINY_MODEL) if cfg.is_demo and not cfg.init_from \
        else model_config(str(start_dir))
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
gpu_mem_gib = cfg.gpu_mem_gib or (torch.cuda.get_device_properties(par.device).total_memory / 2**30
                                  if par.device.type == "cuda" else None)
try:
    graphs = graphs_wanted(cfg.cuda_graphs, par.device)
except ValueError as e:
    fail(f"config: {e}")
plan = make_plan(cfg, shape, par.tp_size, gpu_mem_gib, env.max_feedback_tokens(), graphs)
print0(plan.format())
if plan.refusal():
    fail(plan.refusal())  # a config that cannot fit is the user's to change
sampling = dataclasses.replace(cfg.sampling(), cuda_graphs=cfg.cuda_graphs if plan.graphs else "false")

# -------------------------------------------------------------------------- models
if cfg.is_demo and not cfg.init_from:
    demo.warm_up_once(cfg, start_dir, par, env, train_problems)
load = functools.partial(load_model, start_dir, device=par.device, dtype=dtype, par=par)  # this rank's TP slices
actor = load()
critic = load(value_head=True, head_init=cfg.critic_head_init, seed=cfg.seed) if cfg.algorithm == "ufo_ppo" else None
ref = load().requires_grad_(False) if cfg.kl_coef > 0 else None
prm = PRMReward(PRMScorer.load(cfg.prm, device=par.device, dtype=dtype, par=par), task.tokenizer, cfg.prm_aggregate,
                cfg.prm_gold_weight) if cfg.reward == "prm" else None  # the PRM's trunk split like the actor's
optimizers = make_optimizers(actor, critic, actor_lr=cfg.actor_lr, critic_lr=cfg.critic_lr,
                             weight_decay=cfg.weight_decay)
models = {"actor": actor} | ({"critic": critic} if critic is not None else {})
print0(f"actor: {actor.num_params() / 1e6:.2f}M parameters per rank from {start_dir}; critic: {critic is not None}; "
       f"reference: {ref is not None}; {par.world} ranks = DP {par.dp_size} x TP {par.tp_size}")
grad_hook = (lambda model: average_gradients(model.parameters(), par)) if par.dp_size > 1 else None
decoders = Decoders(required=cfg.cuda_graphs == "true")  # with graphs: kept from rollout to rollout, and counted
max_len = run_max_len(cfg.max_prompt_tokens, cfg.max_turns, cfg.max_new_tokens, env.max_feedback_tokens(),
                      shape.max_position_embeddings)  # the sampler's, for the whole run: one capture per bucket


# -------------------------------------------------------------------------- resume
step, data_pos = 0, 0
state = load_checkpoint(out_dir, models, optimizers) if cfg.resume else None
if state is not None:
    step, data_pos = state["step"], state["data_pos"]
    print0(f"resumed from {out_dir} at step {step}")
elif cfg.resume:
    print0(f"--resume: no checkpoint in {out_dir}, starting from step 0")
logger = RunLogger(out_dir, cfg.log_to, resume_step=step if state is not None else None,
                   config=dataclasses.asdict(cfg), wandb_project=cfg.wandb_project) if master else None


def save(reason: str) -> None:  # every rank takes part (TP slices are gathered)
    path = save_checkpoint(out_dir, step, models, optimizers, {"data_pos": data_pos}, dataclasses.asdict(cfg))
    print0(f"checkpoint ({reason}): {path}")


def run_eval(tag: str) -> dict:
    """Succ@k, Pass@k and the failure modes on every held-out set (DP groups share the problems), the mean over
    the evaluation seeds with its spread; logged as eval/<set>/<metric> (and <metric>_sd)."""
    results, k, seeds = {}, cfg.eval_k, cfg.evaluation_seeds
    for name, problems in task.evals.items():
        metrics = held_out_metrics(actor, eval_env, problems, eval_sampling, k=k, seeds=seeds, progress=False,
                                   par=par)
        shown = {f"Succ@{k}": "succ_at_k", f"Pass@{k}": "pass_at_k", "no answer": "no_answer_rate",
                 "repeated answer": "repeat_rate", "invalid answer": "invalid_rate"}
        print0(f"eval {name} ({tag}, step {step}, {len(problems)} held-out problems x {len(seeds)} seeds): "
               + ", ".join(f"{label} {with_spread(metrics, key, 3)}" for label, key in shown.items()))
        results |= {f"{name}/{key}": v for key, v in metrics.items()}
    if logger:
        logger.log({"kind": "eval", "step": step, **{f"eval/{key}": v for key, v in results.items()}})
    return results


def peak_memory_mb() -> float:
    if par.device.type == "cuda":
        return torch.cuda.max_memory_allocated(par.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


stop_signal = []
def request_stop(signum, frame):  # finish the current step, then save and exit; a second signal kills
    stop_signal.append(signum)
    signal.signal(signum, signal.SIG_DFL)
signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

# -------------------------------------------------------------------------- the loop
before = run_eval("start") if state is None else None
bad_steps = 0
bar = tqdm(total=cfg.max_steps, initial=step, desc="rl", disable=not master)
while step < cfg.max_steps and all_ranks_true(not stop_signal, par):  # a signal on any rank stops them all here
    t0 = time.time()
    n = cfg.problems_per_step
    problems = problems_at(data_pos + par.dp_rank * n, n)
    data_pos += n * par.dp_size
    episodes_per_rank = n * cfg.n_samples_per_problem  # ids unique over the run: every rollout draws new noise
    noise = Noise(cfg.seed, next_episode=(step * par.dp_size + par.dp_rank) * episodes_per_rank)  # resumes exactly
    graded = run_episodes(actor, env, problems, sampling, noise, n_samples_per_problem=cfg.n_samples_per_problem,
                          max_len=max_len, decoders=decoders if plan.graphs else None)
    scored, stats = score_rollout(update, actor, graded, prm)  # the env's rewards, or a reward model's
    batch, batch_stats = build_batch(update, actor, critic, ref, scored)
    stats |= batch_stats
    stats |= set_learning_rates(optimizers, cfg, step)  # a function of the step: resumes exactly
    updated = ppo_update(update, actor, critic, optimizers, batch, seed=cfg.seed + step, grad_hook=grad_hook)
    for opt in optimizers.values():  # no gradient lives into the next rollout (plan.py counts them in the update)
        opt.zero_grad(set_to_none=True)
    step += 1
    bad_steps = bad_steps + 1 if updated["skipped_updates"] else 0
    elapsed = time.time() - t0
    summary = summarize(graded.episodes, k=cfg.max_turns, distinct_by=cfg.distinct_by)
    record = {"kind": "train", "step": step, "reward": float(np.mean(graded.scores.numpy())),  # the env's
              "succ_at_k": summary[f"succ@{cfg.max_turns}"], **summary, **stats, **updated,
              "tokens_per_s": float(graded.rollout.lengths.sum()) / elapsed, "step_time_s": elapsed,
              "decode_steps": graded.rollout.n_decode_steps, "decode_graph_replays": graded.rollout.n_graph_replays,
              **decoders.stats(),
              "peak_memory_mb": peak_memory_mb()}
    if logger:
        logger.log(record)
    bar.update(1)
    bar.set_postfix(reward=f"{record['reward']:.3f}", succ=f"{record['succ_at_k']:.2f}")
    if decoders.failure:  # on every rollout: a run that asked for graphs is decoding without them
        print0(f"step {step}: decoded eagerly, the CUDA graph capture failed: {decoders.failure}")
    if updated["skipped_updates"]:
        print0(f"step {step}: {updated['skipped_updates']} updates skipped (non-finite loss or gradients)")
    if bad_steps >= cfg.max_bad_steps:
        sys.exit(f"aborting: {bad_steps} consecutive steps with non-finite loss or gradients "
                 f"(max_bad_steps={cfg.max_bad_steps}); the last good weights are in {out_dir}/latest")
    if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.max_steps:
        run_eval("periodic")
    if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < cfg.max_steps:
        save("periodic")
    if master and cfg.plot_interval and step % cfg.plot_interval == 0:
        plot_log(out_dir / "log.jsonl")
bar.close()

# -------------------------------------------------------------------------- the end (or a signal)
stopped = step < cfg.max_steps  # only a signal ends the loop early
save("signal" if stopped else "end")
after = None if stopped else run_eval("end")
if logger:
    logger.close()
if stopped:
    sys.exit(f"stopped by a signal at step {step}; continue with --resume")
if master:
    print(f"plot: {plot_log(out_dir / 'log.jsonl')}")
    if before is not None:
        print(f"held-out sets, before -> after (mean over {len(cfg.evaluation_seeds)} evaluation seeds"
              + (" +- their spread):" if len(cfg.evaluation_seeds) > 1 else "):"))
        for key in after:
            if isinstance(after[key], float) and not key.endswith("_sd"):
                print(f"  {key:>32}: {with_spread(before, key)} -> {with_spread(after, key)}")
