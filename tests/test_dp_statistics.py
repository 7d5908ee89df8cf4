"""Statistics over the whole data-parallel batch: with DP=2 (2 gloo processes, tests/distributed_utils.py) the
group filter, advantage whitening and the held-out evaluation give what one process with the whole batch gives.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_dp_statistics.py
"""
import dataclasses
import math

import torch

from distributed_utils import launch
from nanoufo.options import EnvOptions, SamplingOptions

# 8 groups of 2 episodes: the four with the largest spread are 0, 1, 2 (first half) and 5 (second half), so
# the global filter moves group 2 to the second rank, where a per-rank filter would keep groups 4 and 5.
SCORES = [0.0, 1.0, 0.0, 0.9, 0.0, 0.8, 0.0, 0.0, 0.0, 0.1, 0.0, 0.7, 0.0, 0.0, 0.2, 0.2]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _dp_checks() -> dict:
    from nanoufo import demo
    from nanoufo.config import TrainConfig
    from nanoufo.env import UFOEnv
    from nanoufo.evaluate import evaluate
    from nanoufo.model import Qwen2
    from nanoufo.parallel import init_parallel
    from nanoufo.rollout import Noise, run_episodes
    from nanoufo.trainer import build_batch, score_rollout
    par = init_parallel(tp=1, timeout_s=60)
    tokenizer = demo.build_tokenizer()
    env = UFOEnv(tokenizer, EnvOptions(instruction="", max_turns=2))
    single = demo.build_model(len(tokenizer), seed=0)
    models = {}
    for layout in (None, par):  # the same weights as one process and as a DP replica
        kw = {} if layout is None else {"par": layout}
        actor, critic = Qwen2(single.config, **kw), Qwen2(single.config, value_head=True, **kw)
        actor.load_state_dict(single.state_dict())
        critic.load_state_dict(single.state_dict(), strict=False)
        with torch.no_grad():
            critic.value_head.weight.copy_(torch.linspace(-1, 1, single.config.hidden_size)[None])
            critic.value_head.bias.fill_(0.1)
        models[layout is not None] = actor, critic
    problems = demo.make_problems("train", 8, seed=0)
    graded = run_episodes(single, env, problems, SamplingOptions(max_new_tokens=4, temperature=1.0), Noise(0),
                          n_samples_per_problem=2)  # every rank samples the same whole batch
    cfg = TrainConfig(max_turns=2, problems_per_step=8, n_samples_per_problem=2, keep_groups=4, minibatch_size=8,
                      kl_coef=0.0)  # no reference model
    scored = dataclasses.replace(score_rollout(cfg, single, graded)[0], scores=torch.tensor(SCORES))
    whole, _ = build_batch(cfg, *models[False], None, scored)
    cfg_dp = dataclasses.replace(cfg, keep_groups=2, minibatch_size=4)
    mine, _ = build_batch(cfg_dp, *models[True], None, scored.rows(list(range(8 * par.dp_rank, 8 * par.dp_rank + 8))))
    want = whole.rows(torch.arange(4 * par.dp_rank, 4 * par.dp_rank + 4))
    T = mine.tokens.shape[1]
    assert torch.equal(mine.tokens, want.tokens[:, :T]) and not want.mask[:, T:].any()
    errors = {f: (getattr(mine, f) - getattr(want, f)[:, :T]).abs().max().item()
              for f in ("advantages", "returns", "old_logp", "old_values")}

    sampling, eval_options = SamplingOptions(max_new_tokens=3, temperature=1.0), dict(k=2, batch_size=2, seed=5,
                                                                                       progress=False)
    for mode in ("succ", "pass"):  # 5 problems in batches of 1 or 2: the ranks take different numbers
        alone = evaluate(models[False][0], env, problems[:5], sampling, mode=mode, **eval_options)
        shared = evaluate(models[True][0], env, problems[:5], sampling, mode=mode, par=par, **eval_options)
        errors[f"eval_{mode}"] = 0.0 if _same(alone, shared) else 1.0
    return errors


def test_dp2_filter_whitening_and_evaluation_equal_one_process():
    for errors in launch(_dp_checks, 2, timeout_s=300):
        assert all(e < 1e-5 for e in errors.values()), str(errors)
