"""Mixed precision (nanoufo/optim.py): bf16 training at lr 1e-6 moves its fp32 masters as an fp32 run moves
its weights, the bf16 compute weights follow the masters, a minibatch's gradient sums its micro-batches in
fp32, clipping and the non-finite skip act on the fp32 gradients the master step reads, and the fp32 path is
plain AdamW bit for bit.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_optim.py
"""
import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch

from nanoufo.config import TrainConfig
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.optim import MasterWeightAdamW, adamw, grad_of
from nanoufo.trainer import Batch, ppo_update, sequence_stats
from trainer_utils import optimizers_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
grad_accumulation = importlib.import_module("grad_accumulation")

TINY = QwenConfig(vocab_size=41, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    """The kernels' PyTorch references: under the Triton interpreter a bf16 tl.dot is noise (bench/RESULTS.md)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def models_in(dtype: torch.dtype) -> tuple[Qwen2, Qwen2]:
    """Actor and critic from one fixed bf16-representable start, so fp32 and bf16 runs start equal."""
    torch.manual_seed(0)  # the value head's default init
    actor, critic = Qwen2(TINY), Qwen2(TINY, value_head=True)
    actor.init_weights(torch.Generator().manual_seed(0))
    critic.load_state_dict(actor.state_dict(), strict=False)
    return actor.to(torch.bfloat16).to(dtype), critic.to(torch.bfloat16).to(dtype)


def batch_for(actor: Qwen2, B: int = 4, T: int = 12) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[:, 5:] = 1.0
    with torch.no_grad():
        old_logp = sequence_stats(actor, tokens, 1.0)[0].float()
    advantages = torch.randn(B, T, generator=g) * mask
    return Batch(tokens, mask, old_logp, advantages, None, torch.zeros(B, T), torch.randn(B, T, generator=g) * mask)


def trained_weights(optimizer) -> torch.Tensor:
    """Every tensor the optimizer updates, flattened in fp32: the masters, or the parameters themselves."""
    return torch.cat([p.detach().float().flatten() for g in optimizer.param_groups for p in g["params"]])


def ppo_run(dtype: torch.dtype, cfg: TrainConfig, poison: bool = False):
    actor, critic = models_in(dtype)
    batch = batch_for(actor)
    if poison:
        batch.advantages[0, 6] = float("nan")
    optimizers = optimizers_of(cfg, actor, critic)
    start = {name: trained_weights(opt) for name, opt in optimizers.items()}
    out = ppo_update(cfg, actor, critic, optimizers, batch, seed=0)
    deltas = {name: trained_weights(opt) - start[name] for name, opt in optimizers.items()}
    return deltas, out, {"actor": actor, "critic": critic}, optimizers


def test_bf16_masters_move_like_an_fp32_run_at_lr_1e_6():
    cfg = TrainConfig(ppo_epochs=2, minibatch_size=2, actor_lr=1e-6, critic_lr=1e-6)
    fp32, _, _, _ = ppo_run(torch.float32, cfg)
    bf16, out, models, optimizers = ppo_run(torch.bfloat16, cfg)
    assert out["updates"] == 4
    for name in fp32:  # bf16 parameters stepped directly moved about 17% as far, along a cosine of 0.15
        want, got = fp32[name], bf16[name]
        assert (want @ got) / (want.norm() * got.norm()) > 0.99, name
        assert 0.95 < got.norm() / want.norm() < 1.05, name
        assert optimizers[name].param_groups[0]["params"][0].dtype == torch.float32
        for p, master in zip(models[name].parameters(), optimizers[name].param_groups[0]["params"]):
            assert p.dtype == torch.bfloat16 and torch.equal(p, master.to(torch.bfloat16))


def test_bf16_compute_weights_follow_the_masters():
    """The issue's case: 100 steps of lr 1e-6 with a gradient of 1 on a bf16 weight of 0.02."""
    weight = torch.nn.Parameter(torch.full((3,), 0.02).to(torch.bfloat16))
    start = weight.detach().clone()
    optimizer = adamw([weight], lr=1e-6, weight_decay=0.0)
    assert isinstance(optimizer, MasterWeightAdamW)
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert weight.grad is None and torch.equal(weight, optimizer.masters[0].to(torch.bfloat16))
    moved = start.float() - optimizer.masters[0]  # fp32 where fp32 weights would move to 0.0199
    assert torch.allclose(moved, torch.full_like(moved, 100e-6), rtol=1e-3, atol=0)
    assert torch.all(weight < start)  # 1e-4 crossed the bf16 rounding boundary below 0.02


def test_a_minibatch_gradient_sums_hundreds_of_micro_batches_in_fp32():
    """300 micro-batches of one bf16 minibatch: the sum the optimizer steps with is within 0.3% of the exact sum
    of the micro-batches' gradients; summed in the bf16 .grad (as before fp32 gradients) it is not."""
    errors = grad_accumulation.accumulation_errors(300)
    assert errors["fp32 main grad"] < 3e-3 < errors["bf16 .grad"], errors


def test_clipping_and_the_master_step_read_the_same_fp32_gradients():
    cfg = TrainConfig(ppo_epochs=1, minibatch_size=4, grad_clip=1e-3, actor_lr=1e-6, critic_lr=1e-6)
    _, out, models, optimizers = ppo_run(torch.bfloat16, cfg)
    actor, optimizer = models["actor"], optimizers["actor"]
    assert out["grad_norm/actor"] > 1e-3  # clipped; the last minibatch's gradients stay in the masters
    assert all(p.grad is None for p in actor.parameters())  # the bf16 gradients went into the fp32 sums
    clipped = [grad_of(p) for p in actor.parameters()]
    assert all(g.dtype == torch.float32 and g is m.grad for g, m in zip(clipped, optimizer.masters))
    assert torch.stack([g.pow(2).sum() for g in clipped]).sum().sqrt().item() == pytest.approx(1e-3, rel=1e-2)
    for g, master in zip(clipped, optimizer.masters):  # first step: exp_avg = (1 - beta1) * gradient, in fp32
        assert torch.allclose(optimizer.state[master]["exp_avg"], 0.1 * g, rtol=1e-6, atol=0)


def test_a_non_finite_bf16_update_is_skipped_and_leaves_masters_and_moments_alone():
    cfg = TrainConfig(ppo_epochs=2, minibatch_size=2, actor_lr=1e-6, critic_lr=1e-6)
    deltas, out, models, optimizers = ppo_run(torch.bfloat16, cfg, poison=True)
    assert out["skipped_updates"] == 2 and out["updates"] == 2
    for name, opt in optimizers.items():
        assert torch.isfinite(trained_weights(opt)).all() and deltas[name].abs().max() > 0
        assert all(torch.isfinite(s["exp_avg_sq"]).all() and s["step"] == 2 for s in opt.state.values())
        assert all(torch.isfinite(p).all() for p in models[name].parameters())


def test_the_fp32_path_is_torch_adamw_bit_for_bit():
    """fp32 parameters get a plain AdamW (foreach on the CPU): the same numbers as torch's default loop."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    theirs.load_state_dict(ours.state_dict())
    opt_ours = adamw(ours.parameters(), lr=1e-3, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=0.1)
    assert type(opt_ours) is torch.optim.AdamW and opt_ours.param_groups[0]["foreach"]
    for step in range(5):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_a_resumed_optimizer_steps_as_the_original_and_a_new_one_takes_over_the_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    copies = [copy.deepcopy(model) for _ in range(2)]
    opts = [MasterWeightAdamW(m.parameters(), lr=1e-3, weight_decay=0.1, foreach=True) for m in copies]
    for step in range(3):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        if step == 2:  # the second copy, still at the start, resumes from the first's state
            opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
        for m, opt in zip(copies, opts) if step == 2 else zip(copies[:1], opts[:1]):
            opt.zero_grad(set_to_none=True)
            m(x).float().pow(2).sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(opts[0].masters, opts[1].masters))
    assert all(torch.equal(a, b) for a, b in zip(copies[0].parameters(), copies[1].parameters()))
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in zip(opts[0].state.values(),
                                                                              opts[1].state.values()))
    state = opts[0].state_dict()
    del state["masters"]
    with pytest.raises(ValueError, match="no fp32 master weights"):
        opts[1].load_state_dict(state)
    opts[0].zero_grad(set_to_none=True)
    replacement = MasterWeightAdamW(copies[0].parameters(), lr=1e-3)  # the parameters' gradients go to it now
    copies[0](x).float().pow(2).sum().backward()
    assert all(m.grad is not None for m in replacement.masters) and all(m.grad is None for m in opts[0].masters)
