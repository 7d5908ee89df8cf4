"""Tensor and data parallelism on CPU: 2 gloo processes launched inside pytest (tests/distributed_utils.py);
gradient clipping by hand in one process.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_parallel.py

Each launch costs a few seconds of process start-up, so one TP=2 launch runs every TP check. The children
re-import this module to find their function: heavy imports (transformers) stay inside the tests.
"""
import re

import pytest
import torch

from distributed_utils import launch, run_ranks
from nanoufo.options import SamplingOptions
from nanoufo.parallel import ParallelContext, init_parallel, split_range

TOL = 1e-5


def test_split_range_is_balanced_and_covers_everything():
    for n, size in [(101, 2), (7, 4), (151936, 8)]:
        ranges = [split_range(n, r, size) for r in range(size)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_clipping_scales_by_at_most_one_to_the_bound_by_hand():
    """Gradients (3, 4) and (0, 12): norm 13. A bound above it (or none: inf, grad_clip=0) leaves them exactly
    as they are; a bound of 6.5 halves them; the norm returned is the one before clipping."""
    from nanoufo.parallel import SINGLE, clip_grad_norm_
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False))
    raw = [torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 12.0]])]
    for max_norm, scale in ((13.5, 1.0), (1e9, 1.0), (float("inf"), 1.0), (6.5, 6.5 / (13 + 1e-6))):
        for p, g in zip(model.parameters(), raw):
            p.grad = g.clone()
        assert float(clip_grad_norm_(model, max_norm, SINGLE)) == pytest.approx(13.0)
        for p, g in zip(model.parameters(), raw):
            assert torch.equal(p.grad, g * scale) if scale == 1.0 else torch.allclose(p.grad, g * scale), max_norm


def test_unsplittable_config_fails_before_any_weight_is_read(hf_checkpoint, monkeypatch):
    from nanoufo.weights import load_model
    path, _ = hf_checkpoint(num_attention_heads=4, num_key_value_heads=1)
    (path / "model.safetensors").unlink()  # had the loader touched weights, it would fail on this instead
    with pytest.raises(ValueError, match=r"config\.json: num_key_value_heads=1 is not divisible by tp=2"):
        load_model(path, par=ParallelContext(tp_size=2))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"tp=2 does not divide the world size 3"):
        init_parallel(tp=2)


def _full_logits(model, ids, par):
    from nanoufo.parallel import all_gather_vocab
    return all_gather_vocab(_logits(model, ids), model.vocab_start, model.config.vocab_size, par)


def _logits(model, ids):
    return model.logits(model(ids, torch.arange(ids.shape[1]).expand_as(ids)))  # (B, T, V_local)


def _max_diff(model, ref, grads: bool = False) -> float:
    """Largest |model - ref| over the checkpoint's tensors (or their gradients), each of model's shards
    against the same slice of ref's full tensor; relative to the tensor's largest entry where that exceeds 1."""
    from nanoufo.parallel import hf_tensors
    pick = (lambda m: {n: p.grad for n, p in m.named_parameters()}) if grads else (lambda m: dict(m.named_parameters()))
    mine_all, want_all, ref_layout = pick(model), pick(ref), hf_tensors(ref)
    worst = 0.0
    for name, where in hf_tensors(model).items():
        if mine_all[where.param] is None or want_all[ref_layout[name].param] is None:  # a critic's unused LM head
            assert mine_all[where.param] is None and want_all[ref_layout[name].param] is None, name
            continue
        mine, want = where.local(mine_all), ref_layout[name].local(want_all)
        want = where.shard.take(want) if where.shard is not None else want
        worst = max(worst, (mine - want).abs().max().item() / max(want.abs().max().item(), 1.0))
    return worst


def _toy_batch(vocab: int, rows: int = 4, length: int = 10):
    """A PPO batch with uneven token counts per row, so data-parallel halves hold different counts."""
    from nanoufo.trainer import Batch
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (rows, length), generator=g)
    mask = (torch.arange(length) >= torch.tensor([3, 5, 2, 7])[:rows, None]).float()  # (B, T)
    noise = lambda: 0.3 * torch.randn(rows, length, generator=g)
    logp = -2.0 + noise()
    return Batch(tokens, mask, old_logp=logp, advantages=torch.randn(rows, length, generator=g) * mask,
                 ref_logp=logp + 0.1 * noise(), old_values=noise(), returns=noise())


def _load_pair(ckpt: str, par):
    """(actor, critic) on this rank's layout; the critic's head gets fixed non-zero weights so the value loss
    reaches the trunk."""
    from nanoufo.weights import load_model
    actor, critic = load_model(ckpt, par=par), load_model(ckpt, value_head=True, par=par)
    with torch.no_grad():
        critic.value_head.weight.copy_(torch.linspace(-0.5, 0.5, critic.config.hidden_size)[None])
    return actor, critic


def _sampling_differences(ckpt: str, par) -> float:
    """Greedy multi-turn rollouts of the TP model against one process; then, sampling at temperature 1 with
    top-p, the two TP ranks against each other. Returns the number of differing tokens (0 expected)."""
    import torch.distributed as dist
    from nanoufo.sampler import generate
    from nanoufo.weights import load_model
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    feedback = lambda rows, responses, stopped: [[20, 21, 22]] * len(rows)  # "Try again." after every attempt
    run = lambda model, seed=0, **sampling: generate(  # noqa: E731
        model, prompts, feedback, SamplingOptions(max_new_tokens=5, **sampling), max_turns=3, stop_ids=[0],
        seed=seed).tokens
    want = run(load_model(ckpt), temperature=0.0)
    got = run(load_model(ckpt, par=par), temperature=0.0)
    assert got.shape == want.shape and got.shape[1] > 8 + 5  # a row went past its first attempt
    differing = (got != want).sum()
    sampled = run(load_model(ckpt, par=par), temperature=1.0, top_p=0.9, seed=3)
    other = [torch.empty_like(sampled) for _ in range(par.tp_size)]
    dist.all_gather(other, sampled, group=par.tp_group)
    return float(differing + sum((o != sampled).sum() for o in other))


def _sgd(actor, critic) -> dict:
    """Plain SGD for comparing updates: Adam's first steps turn float noise in near-zero gradients into whole
    lr-sized moves, which would hide the comparison; the update is elementwise either way. (The checkpoint
    round trip uses AdamW, whose per-rank moments are what it must keep.)"""
    return {name: torch.optim.SGD(m.parameters(), lr=0.1) for name, m in [("actor", actor), ("critic", critic)]}


def _tp_dp_checks(ckpts: list, out_dir: str) -> dict:
    """On each of 2 ranks: TP=2 checks, then DP=2 checks on the same processes. Returns the largest
    differences against one process holding the whole model and the whole batch."""
    from dataclasses import replace
    from nanoufo.config import TrainConfig
    from nanoufo.options import AGGREGATIONS
    from nanoufo.parallel import average_gradients
    from nanoufo.trainer import ppo_update
    from trainer_utils import minibatch_losses
    from nanoufo.weights import load_model, save_model
    tp_par = init_parallel(tp=2, timeout_s=60)
    errors = {}
    for i, ckpt in enumerate(ckpts):  # logits, sharded loading, gathered saving
        ref, model = load_model(ckpt).eval(), load_model(ckpt, par=tp_par).eval()
        assert model.num_params() < 0.6 * ref.num_params()  # each rank holds about half the weights
        ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            errors[f"logits_{i}"] = (_full_logits(model, ids, tp_par) - _logits(ref, ids)).abs().max().item()
        save_model(model, f"{out_dir}/saved_{i}")

    errors["sampled_tokens"] = _sampling_differences(ckpts[0], tp_par)

    cfg = TrainConfig(minibatch_size=4, kl_in="loss", kl_coef=0.05, entropy_coef=0.01, actor_lr=1e-3)
    batch = _toy_batch(101)
    single, split = _load_pair(ckpts[0], ParallelContext()), _load_pair(ckpts[0], tp_par)
    for (actor, critic) in (single, split):  # PPO + value loss through the vocab-parallel head: gradients
        minibatch_losses(cfg, actor, critic, batch)[0].backward()
    errors["actor_grads"] = _max_diff(split[0], single[0], grads=True)
    errors["critic_grads"] = _max_diff(split[1], single[1], grads=True)
    for actor, critic in (single, split):  # and whole updates (clipping by the full model's gradient norm)
        ppo_update(cfg, actor, critic, _sgd(actor, critic), batch, seed=0)
    errors["tp_update"] = max(_max_diff(split[0], single[0]), _max_diff(split[1], single[1]))
    errors["tp_resume"] = _tp_resume_difference(ckpts[0], cfg, batch, split, tp_par, out_dir)

    dp_par = init_parallel(tp=1, timeout_s=60)  # the same 2 processes as DP=2 x TP=1
    half = batch.rows(torch.arange(2 * dp_par.dp_rank, 2 * dp_par.dp_rank + 2))
    # each weights its DP shares differently (tokens, rows); chunk-token-mean's chunks are each rank's rows, not
    # the one process's: tests/test_micro_batches.py compares it with the rows in the ranks' order
    for aggregation in [name for name in AGGREGATIONS if name != "chunk-token-mean"]:
        whole = _load_pair(ckpts[0], ParallelContext())
        ppo_update(replace(cfg, aggregation=aggregation), *whole, _sgd(*whole), batch, seed=0)
        actor, critic = _load_pair(ckpts[0], dp_par)
        ppo_update(replace(cfg, minibatch_size=2, aggregation=aggregation), actor, critic, _sgd(actor, critic), half,
                   seed=0, grad_hook=lambda model: average_gradients(model.parameters(), dp_par))
        errors[f"dp_update_{aggregation}"] = max(_max_diff(actor, whole[0]), _max_diff(critic, whole[1]))
    return errors


def _tp_resume_difference(ckpt: str, cfg, batch, split, par, out_dir: str) -> float:
    """AdamW steps on the TP=2 pair, a checkpoint, a resume into fresh models: the largest difference in
    weights and in optimizer state (each TP rank's moments are its own slices' and must come back)."""
    from nanoufo.checkpoint import load_checkpoint, save_checkpoint
    from nanoufo.trainer import ppo_update
    from trainer_utils import optimizers_of
    models, optimizers = {"actor": split[0], "critic": split[1]}, optimizers_of(cfg, *split)
    ppo_update(cfg, *split, optimizers, batch, seed=1)
    save_checkpoint(f"{out_dir}/run", 1, models, optimizers, {"data_pos": 7})
    resumed = dict(zip(models, _load_pair(ckpt, par)))
    resumed_optimizers = optimizers_of(cfg, *resumed.values())
    assert load_checkpoint(f"{out_dir}/run", resumed, resumed_optimizers)["data_pos"] == 7
    pairs = [(a, b) for k in models for a, b in zip(resumed[k].parameters(), models[k].parameters())]
    for name, opt in optimizers.items():
        saved, loaded = opt.state_dict()["state"], resumed_optimizers[name].state_dict()["state"]
        assert saved.keys() == loaded.keys() and saved, name
        pairs += [(loaded[i][key], saved[i][key]) for i in saved for key in saved[i]]
    return max((a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("inf") for a, b in pairs)


def test_tp2_and_dp2_match_one_process(hf_checkpoint, tmp_path):
    untied = hf_checkpoint("untied")  # vocab 101: ranks hold 51 and 50 rows
    tied = hf_checkpoint("tied", tie_word_embeddings=True, num_key_value_heads=4, vocab_size=96)
    for errors in launch(_tp_dp_checks, 2, args=([str(untied[0]), str(tied[0])], str(tmp_path)), timeout_s=600):
        assert all(e < TOL for e in errors.values()), errors
    from transformers import Qwen2ForCausalLM
    ids = torch.randint(0, 96, (2, 9))
    for i, (_, hf) in enumerate([untied, tied]):  # the TP=2 model saved one ordinary HF checkpoint
        saved = Qwen2ForCausalLM.from_pretrained(tmp_path / f"saved_{i}").eval()
        with torch.no_grad():
            assert (saved(ids).logits - hf(ids).logits).abs().max() < TOL


def _master_moves(model, optimizer, start: list) -> dict:
    """{parameter name: how far the optimizer moved its fp32 master}."""
    return {name: m - s for (name, _), m, s in zip(model.named_parameters(), optimizer.masters, start)}


def _flat_slices(model, full_moves: dict) -> torch.Tensor:
    """One process's moves cut to the slices this rank's model holds, flattened in parameter order (a merged
    projection's rank slice is its parts' slices, concatenated)."""
    from nanoufo.model import Qwen2
    from nanoufo.parallel import hf_tensors
    with torch.device("meta"):
        whole = hf_tensors(Qwen2(model.config, value_head=model.value_head is not None))
    parts = {}  # this rank's parameter name -> [(first row, slice)]
    for name, where in hf_tensors(model).items():
        full = whole[name].local(full_moves)
        parts.setdefault(where.param, []).append((where.row, full if where.shard is None else where.shard.take(full)))
    return torch.cat([torch.cat([t for _, t in sorted(parts[n], key=lambda p: p[0])]).flatten()
                      for n, _ in model.named_parameters()])


def _bf16_updates(ckpt: str, out_dir: str) -> dict:
    """bf16 models with fp32 masters at lr 1e-6: a PPO update under TP=2 and under DP=2 against one process
    (cosine and norm ratio of the masters' moves: bf16 compute sums in another order, so not bit-equal), and
    a TP checkpoint round trip of each rank's masters."""
    from dataclasses import replace
    from nanoufo.checkpoint import load_checkpoint, save_checkpoint
    from nanoufo.config import TrainConfig
    from nanoufo.parallel import average_gradients
    from nanoufo.trainer import ppo_update
    from trainer_utils import optimizers_of
    cfg = TrainConfig(minibatch_size=4, ppo_epochs=2, kl_in="loss", kl_coef=0.05, actor_lr=1e-6,
                                       critic_lr=1e-6)
    batch, tp_par = _toy_batch(101), init_parallel(tp=2, timeout_s=60)

    def update(layout, rows, grad_hook=None, minibatch=4):
        models = dict(zip(("actor", "critic"), (m.to(torch.bfloat16) for m in _load_pair(ckpt, layout))))
        opts = optimizers_of(cfg, *models.values())
        start = {name: [m.clone() for m in opt.masters] for name, opt in opts.items()}
        ppo_update(replace(cfg, minibatch_size=minibatch), *models.values(), opts, rows, seed=0, grad_hook=grad_hook)
        return models, opts, start

    models, opts, start = update(ParallelContext(), batch)
    single = {name: _master_moves(model, opts[name], start[name]) for name, model in models.items()}
    dp_par = init_parallel(tp=1, timeout_s=60)
    half = batch.rows(torch.arange(2 * dp_par.dp_rank, 2 * dp_par.dp_rank + 2))
    runs = {"tp": update(tp_par, batch),
            "dp": update(dp_par, half, lambda model: average_gradients(model.parameters(), dp_par), minibatch=2)}
    out = {}
    for layout, (models, opts, start) in runs.items():
        for name, model in models.items():
            got = torch.cat([d.flatten() for d in _master_moves(model, opts[name], start[name]).values()])
            want = _flat_slices(model, single[name])
            out[f"{layout}_{name}_cosine"] = float(got @ want / (got.norm() * want.norm()))
            out[f"{layout}_{name}_norm_ratio"] = float(got.norm() / want.norm())
            out[f"{layout}_{name}_compute_is_rounded_master"] = all(
                torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(model.parameters(), opts[name].masters))
    models, opts, _ = runs["tp"]  # each TP rank saves and restores its own slices' masters
    save_checkpoint(f"{out_dir}/bf16", 1, models, opts, {})
    fresh = dict(zip(models, (m.to(torch.bfloat16) for m in _load_pair(ckpt, tp_par))))
    fresh_opts = optimizers_of(cfg, *fresh.values())
    load_checkpoint(f"{out_dir}/bf16", fresh, fresh_opts)
    out["tp_resumed_masters_equal"] = all(torch.equal(a, b) for name in opts
                                          for a, b in zip(opts[name].masters, fresh_opts[name].masters))
    return out


def test_bf16_master_updates_under_tp2_and_dp2_match_one_process(hf_checkpoint, tmp_path):
    ckpt, _ = hf_checkpoint("untied")
    for result in launch(_bf16_updates, 2, args=(str(ckpt), str(tmp_path)), timeout_s=600):
        assert all(v for k, v in result.items() if isinstance(v, bool)), result
        assert all(v > 0.99 for k, v in result.items() if k.endswith("cosine")), result
        assert all(0.98 < v < 1.02 for k, v in result.items() if k.endswith("norm_ratio")), result


def test_a_single_process_runs_without_tp_whatever_tp_says(hf_checkpoint, monkeypatch):
    from nanoufo.config import TrainConfig
    from nanoufo.weights import load_model
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # as `python train.py` runs
        monkeypatch.delenv(name, raising=False)
    default_tp = TrainConfig().tp
    assert default_tp > 1  # the case under test: the default asks for TP
    par = init_parallel(tp=default_tp, device="cpu")
    assert (par.world, par.tp_size, par.dp_size, par.tp_group, par.dp_group) == (1, 1, 1, None, None)
    path, hf = hf_checkpoint()
    model, ids = load_model(path, par=par).eval(), torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert (_logits(model, ids) - hf(ids).logits).abs().max() < TOL  # the whole vocabulary on one process


def _all_reduce_with_a_failing_peer(mode: str, timeout_s: float, marker: str) -> str:
    """Rank 1 is SIGKILLed ("killed") or stays away ("hung") until rank 0 has given up (it touches `marker`),
    at most a minute; rank 0 must raise within its timeout, not wait for the peer. The error names the wait."""
    import os
    import signal
    import time
    from pathlib import Path
    import torch.distributed as dist
    par = init_parallel(tp=1, timeout_s=timeout_s)
    if par.rank == 1:
        if mode == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not Path(marker).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return "late"
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as error:
        Path(marker).touch()
        raise RuntimeError(f"all_reduce raised after {time.monotonic() - start:.1f} s") from error
    return "all_reduce returned without its peer"


@pytest.mark.parametrize("mode", ["killed", "hung"])
def test_a_failed_rank_does_not_leave_the_other_hanging(mode, tmp_path):
    timeout_s = 3.0
    # the deadline only bounds a broken test: start-up on a loaded machine can take most of a minute
    survivor, failed = run_ranks(_all_reduce_with_a_failing_peer, 2, args=(mode, timeout_s, str(tmp_path / "gave_up")),
                                 timeout_s=300)
    assert survivor.exitcode == 1 and "Traceback" in (survivor.error or ""), survivor  # raised and exited
    waited = float(re.search(r"all_reduce raised after ([0-9.]+) s", survivor.error)[1])
    assert waited < timeout_s + 10  # the timeout fired (slack for a loaded machine); the peer stayed away 60 s
    if mode == "killed":
        assert failed.exitcode == -9
