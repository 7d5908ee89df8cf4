"""The memory plan (nanoufo/plan.py) against figures computed by hand for tiny configs, its activation
formula against the tensors a block really saves, the budget boundary (a plan exactly at it fits), and the
refusal before any weight is read.

    python -m pytest -q tests/test_plan.py
"""
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from nanoufo.config import TrainConfig
from nanoufo.model import Qwen2, QwenConfig, rotary_cos_sin
from nanoufo.plan import GIB, RESERVE_GIB, activation_bytes_per_token, episode_tokens, main, make_plan

SMALL = QwenConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096)


def test_activation_formula_equals_the_tensors_a_block_saves():
    """Every distinct storage autograd saves in one fp32 block (parameters and the shared cos/sin excluded)."""
    model, N = Qwen2(SMALL), 16
    positions = torch.arange(N)[None]
    x = torch.randn(1, N, SMALL.hidden_size, requires_grad=True)
    cos, sin = rotary_cos_sin(positions, SMALL.head_dim, SMALL.rope_theta, x.dtype)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, cos, sin, positions)
    assert sum(saved.values()) == N * activation_bytes_per_token(SMALL, 1, 4)
    # by hand: norms 2 x (4*48 + 4 + 2*4*48), q and out 2*4*48, k 4*24, merged qkv 4*(48+2*24), lse 4*4, MLP 4*4*80
    assert activation_bytes_per_token(SMALL, 1, 4) == 2 * (192 + 4 + 384) + 384 + 96 + 384 + 16 + 1280


def test_plan_figures_by_hand():
    cfg = TrainConfig(dtype="bfloat16", problems_per_step=4, n_samples_per_problem=2, keep_groups=2, minibatch_size=2,
                      max_turns=2, max_new_tokens=100, micro_batch_tokens=400, kl_coef=0.1, max_prompt_tokens=50,
                      kv_budget_gb=4.5 * 282 * 192 / GIB, cuda_graphs="false")  # 3 rows of 282 x 192 B, + the spare
    plan = make_plan(cfg, SMALL, tp=1, gpu_mem_gib=10.0)
    length = 50 + 2 * 100 + 32
    assert episode_tokens(cfg, SMALL.max_position_embeddings) == length == 282 and not plan.graphs
    assert episode_tokens(cfg, 200) == 200  # at most the model's context
    params = 64 * 48 * 2 + 2 * (2 * 48 + 48 * 48 + 48 + 2 * (48 * 24 + 24) + 48 * 48 + 3 * 48 * 80) + 48  # untied
    assert plan.phases["rollout"]["weights"] == (3 * params + 49) * 2  # actor, reference, critic (+ value head)
    assert plan.phases["rollout"]["optimizer"] == (2 * params + 49) * 12  # fp32 moments and masters
    assert plan.phases["rollout"]["kv_cache"] == 4 * length * 2 * 2 * 2 * 12 * 2  # 3 rows + spare, K and V, 2 layers
    saved = 2 * (4 * 48 + 4 + 2 * 2 * 48) + 2 * (3 * 48 + 3 * 24) + 16 + 2 * 4 * 80
    assert plan.phases["update"]["activations"] == 400 * (2 * saved + 4 * 48 + 3 * 2 * 48)
    assert plan.phases["rollout"]["decoder_state"] == 4 * (283 * (8 + 4) + 6 * 8)  # tokens and log-probs per slot
    assert plan.phases["rollout"]["decode_logits"] == 3 * 64 * 4  # fp32, no copy of the head's weight
    # one layer's transients (4*48 + 2 * (2*48 + 2*48 + 2*24 + 3*80)) and 2 splits' partials of 4 heads (16 + 2) * 4
    assert plan.phases["rollout"]["decode_step"] == 3 * (1152 + 2 * 4 * 18 * 4)
    assert plan.phases["rollout"]["prefill_kv_gather"] == 3 * length * 2 * 2 * 12 * 2  # one layer's K and V
    assert "kv_cache" not in plan.phases["update"]  # the sampler's cache is gone by then
    assert plan.phases["update"]["gradients"] == (2 * params + 49) * 4  # summed in fp32
    assert plan.phases["update"]["gradient_transient"] == 2 * 80 * 48 * 2  # the merged gate/up's bf16 gradient
    assert plan.phases["update"]["lm_head_chunk"] == 400 * 64 * (4 + 2)  # all 400 rows in one chunk of fp32 logits
    assert plan.phases["update"]["lm_head_grad"] == 64 * 48 * (4 + 2)  # fp32, accumulated in place, + its bf16 cast
    assert plan.phases["scoring"]["lm_head_chunk"] == 400 * 64 * 4
    graphs = make_plan(replace(cfg, cuda_graphs="true"), SMALL, tp=1, gpu_mem_gib=10.0)
    for phase in ("scoring", "update"):  # the decoder and its graphs' pool stay between rollouts
        assert graphs.peak(phase) - plan.peak(phase) == sum(plan.phases["rollout"][k] for k in (
            "kv_cache", "decoder_state", "decode_logits", "decode_step"))
    assert graphs.graphs and make_plan(replace(cfg, cuda_graphs="true"), SMALL, 1, 10.0, graphs=False) == plan
    tp2 = make_plan(cfg, SMALL, tp=2, gpu_mem_gib=10.0)  # half the KV: all 8 episodes at once
    assert tp2.phases["rollout"]["decode_logits"] == 8 * 4 * (32 + 32 + 2 * 32 + 64)  # with the all-gather's buffers
    assert plan.budget == int((10.0 - RESERVE_GIB) * GIB)


def test_a_plan_exactly_at_the_budget_fits_and_one_byte_over_does_not():
    plan = make_plan(TrainConfig(), SMALL, tp=1, gpu_mem_gib=80)
    worst = max(plan.phases, key=plan.peak)
    assert replace(plan, budget=plan.peak(worst)).refusal() is None
    refusal = replace(plan, budget=plan.peak(worst) - 1).refusal()
    assert refusal is not None and f"the {worst} phase" in refusal


def test_a_plan_that_does_not_fit_names_the_knobs():
    cfg = TrainConfig(dtype="bfloat16", max_new_tokens=1024, max_turns=5, micro_batch_tokens=0)
    big = QwenConfig(**{**SMALL.__dict__, "hf": {}, "hidden_size": 2048, "intermediate_size": 11008,
                        "num_hidden_layers": 36, "num_attention_heads": 16, "vocab_size": 151936})
    refusal = make_plan(cfg, big, tp=1, gpu_mem_gib=80).refusal()
    assert refusal and "update" in refusal and "micro_batch_tokens" in refusal and "checkpoint_activations" in refusal
    fits = make_plan(TrainConfig(), SMALL, tp=1, gpu_mem_gib=80)
    assert fits.refusal() is None and "rollout" in fits.format()
    checkpointed = make_plan(TrainConfig(checkpoint_activations=True, micro_batch_tokens=8192, dtype="bfloat16",
                                         max_new_tokens=1024), big, tp=1, gpu_mem_gib=80)
    assert checkpointed.phases["update"]["activations"] < make_plan(
        TrainConfig(micro_batch_tokens=8192, dtype="bfloat16", max_new_tokens=1024), big, 1, 80
    ).phases["update"]["activations"] / 5


def test_cuda_graphs_auto_plans_them_where_they_fit_and_true_insists():
    cfg = TrainConfig(dtype="bfloat16", max_new_tokens=100, max_turns=2, micro_batch_tokens=400, minibatch_size=32,
                      max_prompt_tokens=50, kv_budget_gb=0.001)
    fits = make_plan(cfg, SMALL, tp=1, gpu_mem_gib=10.0)
    assert fits.graphs and "kv_cache" in fits.phases["update"] and "CUDA graphs on" in fits.format()
    eager = make_plan(replace(cfg, cuda_graphs="false"), SMALL, tp=1, gpu_mem_gib=10.0)
    tight = (max(eager.peak(p) for p in eager.phases) + RESERVE_GIB * GIB + 1) / GIB  # fits without the decoder only
    auto = make_plan(cfg, SMALL, tp=1, gpu_mem_gib=tight)
    assert not auto.graphs and auto.refusal() is None and auto.phases == eager.phases
    assert "CUDA graphs off (cuda_graphs=auto: the decoder they keep does not fit" in auto.format()
    insisted = make_plan(replace(cfg, cuda_graphs="true"), SMALL, tp=1, gpu_mem_gib=tight).refusal()
    assert insisted and "CUDA graphs keep the decoder" in insisted and "cuda_graphs=false" in insisted


@pytest.mark.parametrize("config", ["config/ufo_qwen2.5_3b.py", "config/intuitor_qwen2.5_3b.py"])
def test_both_paper_configs_fit_two_80_gb_gpus_with_cuda_graphs(config, capsys):
    assert main([config, "--gpus=2", "--gpu_mem_gib=80", "--cuda_graphs=true"]) == 0
    assert "CUDA graphs on" in capsys.readouterr().out


@pytest.mark.parametrize("args, status", [(["--gpus=2", "--gpu_mem_gib=80"], 0),
                                          (["--gpus=1", "--tp=1", "--gpu_mem_gib=141"], 0),
                                          (["--gpus=1", "--tp=1", "--gpu_mem_gib=80"], 1)])
def test_the_paper_config_fits_its_gpus(args, status, capsys):
    assert main(["config/ufo_qwen2.5_3b.py", *args]) == status
    out = capsys.readouterr().out
    assert ("fits" in out) == (status == 0) and "update" in out


def test_the_plan_runs_alone():
    out = subprocess.run([sys.executable, "-m", "nanoufo.plan", "config/ufo_qwen2.5_3b.py", "--gpus=2",
                          "--gpu_mem_gib=80"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("fits"), out.stdout + out.stderr
    bad = subprocess.run([sys.executable, "-m", "nanoufo.plan", "config/ufo_qwen2.5_3b.py", "--model=Qwen9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Qwen9" in bad.stderr and "Traceback" not in bad.stderr


def test_train_refuses_before_reading_weights(tmp_path):
    """A demo run planned for a 2.05 GiB GPU (0.05 usable) stops with the plan's line before the warm-up writes
    anything."""
    out = subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path}/run", "--gpu_mem_gib=2.05"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "memory plan:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "warmup").exists()
