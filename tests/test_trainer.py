"""The update step (nanoufo/trainer.py) on tiny models: the log-prob shift, a PPO step that lowers the
loss with a first ratio of 1 (up to fp32 rounding), the value loss and the critic's loss by hand, where the KL
term goes, skipped non-finite updates (a NaN loss, an inf gradient), the minibatch shuffle counted over
epochs, grad_clip=0, self-certainty scores against transformers' logits in float64, and a batch built from
real episodes.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_trainer.py
"""
import math
from dataclasses import replace

import pytest
import torch

from nanoufo import demo, rl, trainer
from nanoufo.config import TrainConfig
from nanoufo.env import UFOEnv
from nanoufo.model import QwenConfig, Qwen2
from nanoufo.options import EnvOptions, SamplingOptions
from nanoufo.rollout import Graded, Noise, run_episodes
from nanoufo.sampler import Rollout
from nanoufo.trainer import (Batch, build_batch, critic_loss, ppo_update,
                             score_rollout, sequence_stats, value_loss)
from nanoufo.weights import load_model
from trainer_utils import minibatch_losses, optimizers_of, update_rows

TINY = QwenConfig(vocab_size=41, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def tiny_models(seed=0):
    actor, critic = Qwen2(TINY), Qwen2(TINY, value_head=True)
    actor.init_weights(torch.Generator().manual_seed(seed))
    critic.load_state_dict(actor.state_dict(), strict=False)  # the critic starts from the actor
    return actor, critic


def fixed_batch(actor, B=4, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[:, 5:] = 1.0
    mask[1, 9:] = 0.0  # a shorter row
    with torch.no_grad():
        old_logp, _, _ = sequence_stats(actor, tokens, 1.0)
    advantages = torch.randn(B, T, generator=g) * mask
    returns = torch.randn(B, T, generator=g) * mask
    return Batch(tokens, mask, old_logp, advantages, None, torch.zeros(B, T), returns)


def test_sequence_stats_aligns_each_tokens_logp_with_the_previous_position():
    actor, _ = tiny_models()
    tokens = torch.randint(0, TINY.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    logp, entropy, _ = sequence_stats(actor, tokens, temperature=0.7)
    with torch.no_grad():
        logits = actor.logits(actor(tokens, torch.arange(7).expand(2, 7))) / 0.7  # (B, T, V)
    expected = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # position i-1 -> token i
    assert torch.allclose(logp[:, 1:], expected, atol=1e-5) and torch.all(logp[:, 0] == 0)
    p = logits.softmax(-1)[:, :-1]
    assert torch.allclose(entropy[:, 1:], -(p * p.log()).sum(-1), atol=1e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_ppo_step_lowers_the_loss_and_the_first_ratio_is_one(aggregation):
    cfg = TrainConfig(ppo_epochs=3, minibatch_size=4, actor_lr=1e-3, critic_lr=1e-3,
                                       aggregation=aggregation)
    actor, critic = tiny_models()
    batch = fixed_batch(actor)
    before, _, _ = minibatch_losses(cfg, actor, critic, batch)
    out = ppo_update(cfg, actor, critic, optimizers_of(cfg, actor, critic), batch, seed=0)
    after, _, _ = minibatch_losses(cfg, actor, critic, batch)
    # old log-probs come from the trainer's own forward (the sampler's differ by ~1e-6 in fp32): the ratio is 1 up
    # to the rounding of the scoring kernel (linear_token_stats) against the fused head + loss's own sums
    assert out["first_ratio_dev"] < 1e-7
    assert out["updates"] == 3 and out["skipped_updates"] == 0
    assert after.item() < before.item() - 1e-3


def test_a_non_finite_update_is_skipped_and_leaves_the_weights_alone():
    cfg = TrainConfig(ppo_epochs=2, minibatch_size=2)
    actor, critic = tiny_models()
    batch = fixed_batch(actor)
    batch.advantages[0, 6] = float("nan")  # poisons the minibatches that hold row 0
    weights = {k: v.clone() for k, v in actor.state_dict().items()}
    optimizers = optimizers_of(cfg, actor, critic)
    out = ppo_update(cfg, actor, critic, optimizers, batch, seed=0)
    assert out["skipped_updates"] == 2 and out["updates"] == 2  # one bad minibatch per epoch
    assert all(torch.isfinite(p).all() for p in actor.parameters())
    batch.advantages[:] = float("nan")
    fresh_actor, fresh_critic = tiny_models()
    out = ppo_update(cfg, fresh_actor, fresh_critic, optimizers_of(cfg, fresh_actor, fresh_critic), batch, seed=0)
    assert out["updates"] == 0 and out["skipped_updates"] == 4
    assert all(torch.equal(v, weights[k]) for k, v in fresh_actor.state_dict().items())


def test_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 1.0, 0.2, 100.0]]), torch.zeros(1, 4), torch.tensor([[0.0, 2.0, 0.1, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # clip 0.5: v_clipped = 0.5, 0.5, 0.2; 0.5 * max((v - R)^2, (v_clipped - R)^2) = 0.5, 1.125, 0.005
    loss, clip_frac = value_loss(values, old, returns, mask, clip=0.5)
    assert (loss * mask)[0, :3].tolist() == pytest.approx([0.5, 1.125, 0.005])
    assert float(clip_frac) == pytest.approx(1 / 3)  # the clipped branch is the larger one on token 1 only


def test_the_critic_loss_by_hand_where_old_values_differ_from_the_returns():
    """critic_loss on a critic worth 0.5 on every token (value head: zero weights, bias 0.5), value_clip 0.2:
    per token 0.5 * max((v - R)^2, (v_clipped - R)^2) with v_clipped = old + clamp(v - old, -0.2, 0.2)."""
    cfg = TrainConfig(value_clip=0.2)
    _, critic = tiny_models()
    with torch.no_grad():
        critic.value_head.weight.zero_()
        critic.value_head.bias.fill_(0.5)
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1, 0]])  # the last column: padding, with targets nobody may read
    old = torch.tensor([[0.0, 0.0, 1.0, 0.4, 0.0, 1.0, 7.0]])
    returns = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.45, 2.0, -7.0]])
    # v_clipped: 0.2, 0.8, 0.5, 0.2, 0.8; (v - R)^2: 0.25, 0.25, 0.25, 0.0025, 2.25;
    # (v_clipped - R)^2: 0.64, 0.64, 0.25, 0.0625, 1.44 -> losses 0.32, 0.32, 0.125, 0.03125, 1.125
    tokens = torch.randint(1, TINY.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    zero = torch.zeros_like(mask)
    mb = Batch(tokens, mask, zero, zero, None, old, returns)
    loss, metrics = critic_loss(cfg, critic, update_rows(mb, rl.loss_weights(mask, "token-mean")))
    assert loss.item() == pytest.approx(1.92125 / 5, abs=1e-6)
    assert metrics["value_loss"].item() == pytest.approx(1.92125 / 5, abs=1e-6)
    assert metrics["value_clip_frac"].item() == pytest.approx(3 / 5)  # the clipped branch larger on 3 tokens
    loss.backward()  # d/dv: 0 where the clipped branch (saturated) wins; v - R = 0.5 and -1.5 on tokens 3, 5
    assert critic.value_head.bias.grad.item() == pytest.approx((0.5 - 1.5) / 5, abs=1e-6)


def test_seq_mean_averages_the_value_loss_per_sequence_as_verls_micro_batches_of_one():
    """UFO's critic (verl, one sequence per micro-batch) averages each sequence's tokens, then the sequences.
    With a critic worth 0.5 everywhere and returns 0.5 + d, a token's loss is d^2 / 2 and its gradient on the
    value head's bias -d. Row 0 has one token (d = 2), row 1 three (d = 0): the update's bias gradient is
    -2 / 2 rows under seq-mean, -2 / 4 tokens under token-mean."""
    mask = torch.tensor([[0.0, 1, 0, 0], [0, 1, 1, 1]])
    returns = 0.5 + torch.tensor([[0.0, 2, 0, 0], [0, 0, 0, 0]])
    tokens = torch.randint(1, TINY.vocab_size, (2, 4), generator=torch.Generator().manual_seed(3))
    zero = torch.zeros_like(mask)
    for aggregation, want in (("seq-mean", -1.0), ("token-mean", -0.5)):
        actor, critic = tiny_models()
        with torch.no_grad():
            critic.value_head.weight.zero_()
            critic.value_head.bias.fill_(0.5)
        cfg = TrainConfig(aggregation=aggregation, value_clip=10.0)
        trainer.accumulate_gradients(cfg, actor, critic, Batch(tokens, mask, zero, zero, None, returns, returns),
                                     rl.trajectory_lengths(mask).tolist())
        assert critic.value_head.bias.grad.item() == pytest.approx(want, abs=1e-6), aggregation


def test_minibatches_are_a_fresh_random_partition_in_every_epoch(monkeypatch):
    """Each epoch splits the rows into disjoint minibatches that cover every row once, in a new random order:
    two given rows share a minibatch with probability (m - 1) / (B - 1) and a row comes first with
    probability m / B, counted over 200 epochs (an unshuffled split: always). The same seed, the same order."""
    B, m, epochs = 8, 2, 200

    def minibatches(seed: int) -> list[list[int]]:
        seen = []

        def record(cfg, actor, critic, mb, lengths):  # no forward: the rows are the point
            seen.append(sorted(mb.tokens[:, 0].tolist()))
            return torch.zeros(()), {"ratio_dev": torch.zeros(())}

        monkeypatch.setattr(trainer, "accumulate_gradients", record)
        cfg = TrainConfig(ppo_epochs=epochs, minibatch_size=m)
        actor = Qwen2(TINY)
        tokens = torch.arange(B)[:, None].expand(B, 3).contiguous()  # row b's tokens are all b
        mask = torch.tensor([[0.0, 1.0, 1.0]]).expand(B, 3)
        zero = torch.zeros(B, 3)
        ppo_update(cfg, actor, None, {"actor": torch.optim.SGD(actor.parameters(), lr=0.1)},
                   Batch(tokens, mask, zero, zero), seed=seed)
        return seen

    seen = minibatches(seed=0)
    per_epoch = [seen[i:i + B // m] for i in range(0, len(seen), B // m)]
    assert len(per_epoch) == epochs and all(sorted(sum(e, [])) == list(range(B)) for e in per_epoch)
    together = sum([0, 1] in epoch for epoch in per_epoch)
    first = sum(0 in epoch[0] for epoch in per_epoch)
    for count, p in ((together, (m - 1) / (B - 1)), (first, m / B)):
        assert abs(count - epochs * p) <= 4.5 * (epochs * p * (1 - p)) ** 0.5, (count, p)
    assert len({str(e) for e in per_epoch}) > epochs * 0.9  # not one order repeated epoch after epoch
    assert minibatches(seed=0) == seen and minibatches(seed=1) != seen  # a resumed step shuffles alike


def test_grad_clip_zero_means_no_clipping_and_non_finite_steps_are_still_skipped(torch_paths):
    """grad_clip=0 (config: no clipping): one SGD step moves every weight by exactly lr x its unclipped
    gradient, which is far above norm 1, and stays finite; an inf gradient is still skipped."""
    cfg = TrainConfig(ppo_epochs=1, minibatch_size=4, grad_clip=0.0)
    actor, critic = tiny_models()
    batch = fixed_batch(actor)
    minibatch_losses(cfg, actor, critic, batch)[0].backward()
    grads = {name: p.grad.clone() for name, p in actor.named_parameters() if p.grad is not None}
    assert torch.stack([g.norm() for g in grads.values()]).norm() > 1.0  # a clip at 1 would have scaled them
    start = {name: p.detach().clone() for name, p in actor.named_parameters()}
    sgd = {"actor": torch.optim.SGD(actor.parameters(), lr=0.1), "critic": torch.optim.SGD(critic.parameters(), lr=0.1)}
    out = ppo_update(cfg, actor, critic, sgd, batch, seed=0)
    assert out["updates"] == 1 and out["grad_norm/actor"] > 1.0
    for name, p in actor.named_parameters():
        assert torch.isfinite(p).all(), name
        assert torch.allclose(p, start[name] - 0.1 * grads.get(name, 0.0), atol=1e-6), name
    after = {name: p.detach().clone() for name, p in actor.named_parameters()}
    poison = lambda model: next(model.parameters()).grad.view(-1)[0].fill_(float("inf"))  # noqa: E731
    out = ppo_update(cfg, actor, critic, sgd, batch, seed=0, grad_hook=poison)
    assert out["skipped_updates"] == 1 and out["updates"] == 0
    assert all(torch.equal(p, after[name]) for name, p in actor.named_parameters())


def test_self_certainty_scores_equal_the_float64_formula_on_transformers_logits(hf_checkpoint):
    """Intuitor's score: per episode, the mean over its sampled tokens of logsumexp(z) - mean(z) over the
    vocabulary, z = logits / temperature at position i-1 (which predicts token i); here from transformers'
    logits in float64, rows with a feedback gap and padding, scored in micro-batches; placed on each
    episode's last sampled token."""
    path, hf = hf_checkpoint()
    actor = load_model(path)
    lengths = [12, 7, 10]
    B, T = len(lengths), max(lengths)
    tokens = torch.randint(1, 101, (B, T), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        tokens[b, n:] = 0
        mask[b, 3:n] = 1.0
    mask[0, 6:8] = 0.0  # feedback tokens between two attempts
    sampled = Rollout(tokens, torch.tensor(lengths), mask, torch.zeros(B, T), [[(3, n)] for n in lengths], 0, 0,
                      temperature=0.7)
    rollout = Graded(sampled, [None] * B, [[0.0]] * B, group_size=1)
    cfg = TrainConfig(reward="self_certainty", micro_batch_tokens=20)
    scored, _ = score_rollout(cfg, actor, rollout)
    with torch.no_grad():
        z = hf.double()(tokens).logits / 0.7  # (B, T, V)
    per_position = torch.logsumexp(z, -1) - z.mean(-1)  # (B, T): position i predicts token i + 1
    want = (per_position[:, :-1] * mask[:, 1:]).sum(1) / mask[:, 1:].sum(1)
    assert torch.allclose(scored.scores.double(), want, atol=1e-5), (scored.scores, want)
    assert (want.max() - want.min()) > 1e-3  # the rows' scores differ: a wrong row or token would show
    last = [11, 6, 9]
    assert torch.equal(scored.rewards.nonzero()[:, 1], torch.tensor(last))
    assert torch.allclose(scored.rewards[torch.arange(B), last].double(), want, atol=1e-5)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_the_kl_term_is_in_the_loss_only_when_asked(kl_in):
    cfg = TrainConfig(kl_in=kl_in, kl_coef=0.5, kl_estimator="k1")
    actor, critic = tiny_models()
    batch = fixed_batch(actor)
    losses = [minibatch_losses(cfg, actor, critic, replace(batch, ref_logp=batch.old_logp + shift))[0].item()
              for shift in (-1.0, 1.0)]  # k1 KL = logp - ref: +1 or -1 on every token
    if kl_in == "reward":  # build_batch put it in the rewards: the loss does not see the reference
        assert losses[0] == losses[1]
    else:
        assert losses[0] - losses[1] == pytest.approx(0.5 * 2, rel=1e-4)


def test_an_update_with_a_finite_loss_and_an_inf_gradient_is_skipped():
    cfg = TrainConfig(ppo_epochs=1, minibatch_size=2)
    actor, critic = tiny_models()
    batch = fixed_batch(actor)
    weights = {k: v.clone() for k, v in actor.state_dict().items()}
    poisoned = []

    def one_inf_gradient(model):  # runs after backward, before clipping: the loss itself stayed finite
        if model is actor:
            poisoned.append(next(model.parameters()).grad.view(-1)[0].fill_(float("inf")))

    optimizers = optimizers_of(cfg, actor, critic)
    out = ppo_update(cfg, actor, critic, optimizers, batch, seed=0, grad_hook=one_inf_gradient)
    assert len(poisoned) == 2 and out["skipped_updates"] == 2 and out["updates"] == 0
    assert all(torch.equal(v, weights[k]) for k, v in actor.state_dict().items())
    assert all(not opt.state for opt in optimizers.values())  # no moment was touched


@pytest.fixture(scope="module")
def demo_rollout():
    """Real episodes of the demo, sampled with the kernels' PyTorch references (as the tests that use them run:
    their point is the batch built around the kernels; the interpreter would spend most of a minute here)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return demo_episodes()


def demo_episodes():
    tokenizer = demo.build_tokenizer()
    env = UFOEnv(tokenizer, EnvOptions(instruction="", max_turns=3))
    actor = demo.build_model(len(tokenizer), seed=0)
    problems = demo.make_problems("train", 4, seed=0)
    graded = run_episodes(actor, env, problems, SamplingOptions(max_new_tokens=4, temperature=1.0), Noise(0),
                          n_samples_per_problem=2)
    return env, actor, graded


@pytest.mark.parametrize("algorithm, placement", [("ufo_ppo", "last"), ("ufo_ppo", "per_turn"), ("grpo", "last")])
def test_build_batch_from_real_episodes(demo_rollout, torch_paths, algorithm, placement):
    env, actor, graded = demo_rollout
    cfg = TrainConfig(algorithm=algorithm, reward_placement=placement, max_turns=3,
                                       problems_per_step=4, n_samples_per_problem=2, keep_groups=2, minibatch_size=4)
    critic = Qwen2(actor.config, value_head=True) if algorithm == "ufo_ppo" else None
    if critic is not None:
        critic.load_state_dict(actor.state_dict(), strict=False)
        critic.value_head.weight.data.zero_()
    batch, stats = build_batch(cfg, actor, critic, actor, score_rollout(cfg, actor, graded)[0])
    assert batch.tokens.shape[0] == 4  # the two groups of two with the largest reward spread
    assert stats["logp_diff_sampler"] < 1e-4  # sampler and trainer agree on the sampled tokens
    assert torch.all(batch.advantages[batch.mask == 0] == 0)
    if algorithm == "grpo":  # one advantage per trajectory on all its tokens
        per_row = [batch.advantages[b][batch.mask[b] > 0].unique() for b in range(4)]
        assert all(len(u) == 1 for u in per_row)


def test_one_step_per_rollout_takes_the_old_log_probs_from_the_update_itself(demo_rollout):
    """ppo_epochs=1 and one minibatch (Intuitor's update): build_batch runs no forward of the actor (old_logp None),
    and the update's own forward gives each token's old log-prob (ratio exactly 1) and the sampler gap; its step
    equals the one from old log-probs recomputed by a scoring forward (ratio 1 up to rounding)."""
    import copy
    env, actor, graded = demo_rollout
    cfg = TrainConfig(algorithm="grpo", kl_coef=0.0, max_turns=3, problems_per_step=4, n_samples_per_problem=2,
                      minibatch_size=8, ppo_epochs=1, entropy_coef=0.01)
    batch, stats = build_batch(cfg, actor, None, None, score_rollout(cfg, actor, graded)[0])
    assert batch.old_logp is None and batch.sampler_logp is not None and "logp_diff_sampler" not in stats
    with torch.no_grad():
        old_logp = sequence_stats(actor, batch.tokens, batch.temperature)[0] * batch.mask  # the scoring forward's
    steps = []
    for old in (None, old_logp):
        model = copy.deepcopy(actor)
        out = ppo_update(cfg, model, None, optimizers_of(cfg, model, None), replace(batch, old_logp=old), seed=0)
        steps.append((model.state_dict(), out))
    (on_policy, out), (recomputed, out_recomputed) = steps
    assert out["first_ratio_dev"] == 0.0 and out_recomputed["first_ratio_dev"] < 1e-5
    assert out["logp_diff_sampler"] < 1e-4 and out["logp_diff_sampler"] == pytest.approx(
        out_recomputed["logp_diff_sampler"], abs=1e-6)  # the sampler gap, measured by the update's forward
    for name, value in on_policy.items():
        torch.testing.assert_close(value, recomputed[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(value, actor.state_dict()[name]) for name, value in on_policy.items())  # it moved


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_grpo_kl_in_the_reward_lowers_each_score_by_its_summed_kl(demo_rollout, torch_paths, kl_in):
    """kl_in="reward" under GRPO: advantages are the group-normalized (score - kl_coef * sum of the token KL);
    kl_in="loss" leaves the scores alone (the loss adds the KL). The reference differs from the actor."""
    from nanoufo import rl
    env, actor, graded = demo_rollout
    cfg = TrainConfig(algorithm="grpo", kl_in=kl_in, kl_coef=0.5, max_turns=3,
                                       problems_per_step=4, n_samples_per_problem=2, minibatch_size=8)
    ref = demo.build_model(actor.config.vocab_size, seed=1)  # other weights: a non-zero KL on every token
    batch, _ = build_batch(cfg, actor, None, ref, score_rollout(cfg, actor, graded)[0])
    scores = torch.tensor([sum(env.turn_rewards(e)) for e in graded.episodes])  # the environment's, by hand
    if kl_in == "reward":
        scores = scores - 0.5 * (rl.kl_penalty(batch.old_logp, batch.ref_logp) * batch.mask).sum(1)
    expected = rl.group_advantages(scores, 2)[:, None] * batch.mask
    assert torch.allclose(batch.advantages, expected, atol=1e-5)


@pytest.mark.parametrize("dual_clip, want", [(3.0, 3.0), (0.0, math.exp(2.0))])
def test_dual_clip_zero_turns_it_off(dual_clip, want):
    """Every token with A = -1 and ratio e^2 (old log-probs 2 below the actor's): the clipped surrogate is
    max(e^2, 1.28) = e^2, which the dual clip caps at -A * 3 = 3; dual_clip = 0 (UFO's actor) leaves it."""
    actor, _ = tiny_models()
    tokens = torch.randint(1, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1]])
    cfg = TrainConfig(dual_clip=dual_clip, entropy_coef=0.0, kl_coef=0.0)
    with torch.no_grad():
        logp = trainer.sequence_stats(actor, tokens, cfg.temperature)[0]
    mb = Batch(tokens, mask, logp - 2.0, -torch.ones_like(mask))
    loss, _ = trainer.policy_loss(cfg, actor, update_rows(mb, rl.loss_weights(mask, "token-mean")))
    assert loss.item() == pytest.approx(want, rel=1e-5)
