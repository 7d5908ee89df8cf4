"""Micro-batches with exact gradient accumulation, packed sequences and chunked scoring (nanoufo/packing.py,
nanoufo/trainer.py): a micro-batch's map from hidden rows to tokens by hand; the loss weights by hand;
accumulated gradients equal the one-shot minibatch's for every aggregation, packed or padded, in one process
and under DP=2 on gloo (and the DP weights by hand with an empty row; chunk-token-mean's chunks are each rank's,
as verl's micro-batches are each GPU's); packed statistics equal the padded ones, the values read where the
critic's forward puts them; scoring's largest tensor does not grow with the batch; the vectorised GAE
equals the step-by-step loop.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_micro_batches.py
"""
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distributed_utils import launch
from nanoufo import rl
from nanoufo.config import TrainConfig
from nanoufo.model import Qwen2, QwenConfig
from nanoufo import trainer
from nanoufo.packing import micro_batches, on_tokens, span_lengths, split_rows
from nanoufo.parallel import SINGLE
from nanoufo.sampler import Rollout
from nanoufo.trainer import (Batch, Scored, accumulate_gradients, build_batch, minibatch_weights, ppo_update,
                             sequence_stats, sequence_values)
from trainer_utils import minibatch_losses, optimizers_of

TINY = QwenConfig(vocab_size=41, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
LENGTHS = [12, 7, 16, 9, 5, 14]  # trajectory lengths: the mask's last token is each row's last
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "chunk-token-mean"]


def models(seed: int = 0, par=SINGLE):
    actor, critic = Qwen2(TINY, par=par), Qwen2(TINY, value_head=True, par=par)
    actor.init_weights(torch.Generator().manual_seed(seed))
    critic.load_state_dict(actor.state_dict(), strict=False)
    with torch.no_grad():
        critic.value_head.weight.copy_(torch.linspace(-0.5, 0.5, TINY.hidden_size)[None])
        critic.value_head.bias.fill_(0.1)  # the same replica in every process
    return actor, critic


def uneven_batch(lengths=LENGTHS, seed: int = 0) -> Batch:
    """Right-padded rows of these lengths: a prompt of 3 tokens, then sampled tokens with a feedback gap."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) + 2
    tokens = torch.randint(1, TINY.vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        tokens[b, n:] = 0
        mask[b, 3:n] = 1.0
        mask[b, 5:6] = 0.0 if n > 6 else mask[b, 5:6]  # a feedback token inside the longer rows
    noise = lambda: 0.3 * torch.randn(B, T, generator=g) * mask
    logp = -2.0 + noise()
    return Batch(tokens, mask, old_logp=logp, advantages=torch.randn(B, T, generator=g) * mask,
                 ref_logp=logp + noise(), old_values=noise(), returns=noise())


def grads(*modules) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def assert_grads_close(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= tol * max(1.0, w.abs().max().item()), (g - w).abs().max()


def test_loss_weights_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    token = rl.loss_weights(mask, "token-mean")
    assert torch.allclose(token, mask / 5.0)
    seq = rl.loss_weights(mask, "seq-mean-token-mean")  # two rows hold tokens: 1/(2*2) and 1/(3*2)
    assert torch.allclose(seq, torch.tensor([[0.25, 0.25, 0, 0], [0, 1 / 6, 1 / 6, 1 / 6], [0, 0, 0, 0]]))
    assert torch.equal(rl.loss_weights(mask, "seq-mean"), seq)
    # verl's token-mean per micro-batch of 2 rows over the accumulation steps: rows 0-1 (5 tokens) and row 2 (none),
    # 2 chunks: 1 / (5 x 2) on the first chunk's tokens; the empty chunk still counts among the steps
    chunks = rl.loss_weights(mask, "chunk-token-mean", chunk_rows=2)
    assert torch.allclose(chunks, mask / 10.0)
    five = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]])  # chunks of 4, 1, 1, 0 and 3 tokens
    assert torch.allclose(rl.loss_weights(five, "chunk-token-mean", chunk_rows=2),
                          five / torch.tensor([[12.0], [12], [3], [1], [9]]))
    assert torch.allclose(rl.loss_weights(five, "chunk-token-mean", chunk_rows=1), rl.loss_weights(five, "seq-mean")
                          * 4 / 5)  # chunks of one row: the mean over all 5 rows, the empty one included
    with pytest.raises(AssertionError):
        rl.loss_weights(mask, "seq-sum")


def test_micro_batch_split_and_a_budget_below_the_longest_trajectory():
    assert split_rows([5, 4, 3, 6], 9) == [[0, 1], [2, 3]]
    assert split_rows([5, 4, 3, 6], 9, padded=True) == [[0], [1, 2], [3]]  # 2 rows x 5 > 9
    assert split_rows([5, 4, 3, 6], 0) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"micro_batch_tokens=5 is smaller than the longest trajectory \(6"):
        split_rows([5, 4, 3, 6], 5)
    cfg = TrainConfig(minibatch_size=6, micro_batch_tokens=10, problems_per_step=6,
                                       n_samples_per_problem=1)
    actor, critic = models()
    weights = {k: v.clone() for k, v in actor.state_dict().items()}
    with pytest.raises(ValueError, match="micro_batch_tokens=10"):  # before any forward: nothing changes
        ppo_update(cfg, actor, critic, optimizers_of(cfg, actor, critic), uneven_batch(), seed=0)
    assert all(torch.equal(v, weights[k]) for k, v in actor.state_dict().items())


def test_a_micro_batch_maps_its_hidden_rows_to_the_tokens_they_predict_by_hand():
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])  # trajectories of 3 and 2 tokens, T = 4
    packed, = micro_batches(tokens, [3, 2], 0, packed=True)
    assert packed.inputs.tolist() == [[5, 6, 7, 8, 9]] and packed.positions.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.targets.tolist() == [6, 7, -100, 9, -100]  # a trajectory's last token predicts nothing
    assert packed.following.tolist() == [1, 2, 0, 5, 4] and packed.n_computed == 5  # flat indices into (B * T)
    x = torch.arange(8.0).view(2, 4)
    assert packed.take(x).tolist() == [1.0, 2.0, 0.0, 5.0, 0.0]
    out = torch.zeros(2, 4)
    packed.put(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), out)
    assert out.tolist() == [[0, 1, 2, 0], [0, 4, 0, 0]]  # row n's statistic on the token it predicts
    padded, = micro_batches(tokens, [3, 2], 0, packed=False)
    assert padded.inputs.tolist() == [[5, 6, 7], [8, 9, 0]] and padded.n_computed == 6  # cut to the longest
    assert padded.targets.tolist() == [6, 7, 9, 0]  # the padding is predicted too (its loss mask is 0)
    assert padded.following.tolist() == [1, 2, 5, 6]
    split = micro_batches(tokens, [3, 2], 3, packed=True)  # 5 tokens over a budget of 3: one row each
    assert [mb.targets.tolist() for mb in split] == [[6, 7, -100], [9, -100]]
    assert [mb.following.tolist() for mb in split] == [[1, 2, 0], [5, 4]]


def test_with_spans_a_forward_keeps_only_the_rows_that_predict_a_scored_token_by_hand():
    tokens = torch.tensor([[5, 6, 7, 3, 0], [8, 9, 4, 0, 0]])  # trajectories of 4 and 3 tokens, T = 5
    spans = [[(1, 2), (3, 4)], [(2, 3)]]  # scored: tokens 6 and 3 of row 0, token 4 of row 1
    packed, = micro_batches(tokens, [4, 3], 0, packed=True, spans=spans)
    assert packed.inputs.tolist() == [[5, 6, 7, 3, 8, 9, 4]] and packed.n_computed == 7  # the trunk reads all
    assert packed.keep.tolist() == [0, 2, 5]  # hidden rows 0 (-> 6), 2 (-> 3) and 4 + 1 (-> 4)
    assert packed.following.tolist() == [1, 3, 7] and packed.targets.tolist() == [6, 3, 4]
    padded, = micro_batches(tokens, [4, 3], 0, packed=False, spans=spans)
    assert padded.keep.tolist() == [0, 2, 4] and padded.following.tolist() == [1, 3, 7]  # rows of width 4 - 1
    assert padded.targets.tolist() == [6, 3, 4]
    assert span_lengths(spans + [[(2, 2)]]) == [4, 3, 1]  # a row without scored tokens: 1, as trajectory_lengths


@pytest.mark.parametrize("packed", [True, False])
def test_the_head_on_the_scored_rows_gives_the_same_statistics_loss_and_gradients(packed):
    """Keeping only the rows that predict a sampled token changes nothing a loss reads: the statistics on the
    sampled tokens, the minibatch's loss and metrics, and both models' gradients (the spans are where the mask is)."""
    batch = uneven_batch()
    spans = [[(3, 5), (6, n)] if n > 6 else [(3, n)] for n in LENGTHS]
    assert all(batch.mask[b, a:e].all() for b, row in enumerate(spans) for a, e in row)
    assert sum(e - a for row in spans for a, e in row) == batch.mask.sum()
    cfg = TrainConfig(pack_sequences=packed, micro_batch_tokens=0, kl_in="loss", entropy_coef=0.01)
    results = []
    for with_spans in (False, True):
        actor, critic = models()
        forwards = micro_batches(batch.tokens, LENGTHS, 0, packed, spans if with_spans else None)
        with torch.no_grad():
            logp, = on_tokens(lambda forward: trainer.token_stats(actor, forward, 1.0)[:1], forwards,
                              batch.tokens.shape)
        mb = replace(batch, spans=spans if with_spans else None)
        loss, metrics = accumulate_gradients(cfg, actor, critic, mb, LENGTHS)
        grads = [p.grad.clone() for model in (actor, critic) for p in model.parameters() if p.grad is not None]
        results.append((logp * batch.mask, loss, metrics, grads))
    (logp, loss, metrics, grads), (logp_kept, loss_kept, metrics_kept, grads_kept) = results
    torch.testing.assert_close(logp_kept, logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_kept, loss, rtol=1e-5, atol=1e-7)
    for key in ("pg/clip_frac", "pg/approx_kl", "pg/kl", "pg/entropy", "ratio_dev", "value_loss"):
        torch.testing.assert_close(metrics_kept[key], metrics[key], rtol=1e-5, atol=1e-7)
    assert len(grads_kept) == len(grads)
    for got, want in zip(grads_kept, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_budget_below_the_attempts_is_a_config_error():
    from nanoufo.config import parse_args
    with pytest.raises(ValueError, match=r"micro_batch_tokens=50 .*max_turns x max_new_tokens = 80"):
        parse_args(["--micro_batch_tokens=50", "--max_turns=5", "--max_new_tokens=16"])


def test_trajectory_lengths_end_at_the_last_sampled_token():
    assert rl.trajectory_lengths(uneven_batch().mask).tolist() == LENGTHS
    assert rl.trajectory_lengths(torch.zeros(1, 4)).tolist() == [1]


def test_packed_statistics_and_values_equal_the_padded_ones():
    actor, critic = models()
    batch = uneven_batch()
    valid = torch.arange(batch.tokens.shape[1]) < torch.tensor(LENGTHS)[:, None]  # (B, T)
    padded = sequence_stats(actor, batch.tokens, 0.7) + (sequence_values(critic, batch.tokens),)
    packed = sequence_stats(actor, batch.tokens, 0.7, LENGTHS) + (sequence_values(critic, batch.tokens, LENGTHS),)
    for p, q in zip(packed, padded):
        assert (p - q)[valid].abs().max() < 1e-5
        assert torch.all(p[~valid] == 0)  # nothing is computed past a trajectory's end
    with torch.no_grad():  # independently: token i's value is the critic's at position i - 1, the state before it
        T = batch.tokens.shape[1]
        direct = critic.values(critic(batch.tokens, torch.arange(T).expand_as(batch.tokens)))  # (B, T)
    assert (padded[3][:, 1:] - direct[:, :-1])[valid[:, 1:]].abs().max() < 1e-5 and torch.all(padded[3][:, 0] == 0)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_accumulated_gradients_equal_the_one_shot_minibatch(aggregation, pack):
    cfg = TrainConfig(aggregation=aggregation, micro_batch_tokens=24, pack_sequences=pack, chunk_rows=2,
                      kl_in="loss", kl_coef=0.05, entropy_coef=0.01)  # chunk_rows 2 (not the default): 3 chunks
    batch = uneven_batch()
    actor, critic = models()
    loss, want_metrics, want_ratio_dev = minibatch_losses(cfg, actor, critic, batch)
    loss.backward()
    want = grads(actor, critic)
    actor.zero_grad(), critic.zero_grad()
    total, metrics = accumulate_gradients(cfg, actor, critic, batch, LENGTHS)
    assert len(split_rows(LENGTHS, 24, padded=not pack)) >= 3  # really split
    assert abs(total.item() - loss.item()) < 1e-6
    assert_grads_close(grads(actor, critic), want)
    for name, value in (want_metrics | {"ratio_dev": want_ratio_dev}).items():  # token-means of the whole minibatch
        assert abs(metrics[name].item() - value) < 1e-5, name
    assert metrics["padding_frac"].item() == 0.0 if pack else metrics["padding_frac"].item() > 0.1


def test_ppo_update_logs_the_padding_fraction(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch references: the kernels are not the point
    cfg = TrainConfig(minibatch_size=3, micro_batch_tokens=30, problems_per_step=6, n_samples_per_problem=1,
                      ppo_epochs=2)  # 2 epochs x 2 minibatches
    for pack, check in ((True, lambda f: f == 0.0), (False, lambda f: 0.0 < f < 1.0)):
        actor, critic = models()
        out = ppo_update(replace(cfg, pack_sequences=pack), actor, critic, optimizers_of(cfg, actor, critic),
                         uneven_batch(), seed=0)
        assert out["updates"] == 4 and check(out["padding_frac"])


def _dp_accumulation() -> dict:
    """One rank of DP=2: its half of the minibatch in micro-batches, gradients averaged; returns, per
    aggregation, the largest difference against the whole minibatch's one-shot gradients in this process."""
    from nanoufo.parallel import average_gradients, init_parallel
    par = init_parallel(tp=1, timeout_s=60)
    batch, errors = uneven_batch(), {}
    rows = [0, 2, 4] if par.dp_rank == 0 else [1, 3, 5]  # uneven token counts per rank
    for aggregation in ("token-mean", "seq-mean-token-mean"):  # (chunk-token-mean's chunks are per rank: below)
        cfg = TrainConfig(aggregation=aggregation, micro_batch_tokens=20, kl_in="loss",
                                           kl_coef=0.05, entropy_coef=0.01)
        actor, critic = models()
        minibatch_losses(cfg, actor, critic, batch)[0].backward()  # one process, the whole minibatch
        want = grads(actor, critic)
        actor, critic = models(par=par)  # the same weights as a DP replica
        accumulate_gradients(cfg, actor, critic, batch.rows(torch.tensor(rows)), [LENGTHS[i] for i in rows])
        for model in (actor, critic):
            average_gradients(model.parameters(), par)
        got = grads(actor, critic)
        assert len(got) == len(want)
        errors[aggregation] = max(((g - w).abs().max() / max(1.0, w.abs().max())).item() for g, w in zip(got, want))
    # chunk-token-mean: each rank chunks its own rows (verl's micro-batches of a GPU's share), so the one process
    # holds the rows in the ranks' order: chunks of 3 are rows 0, 2, 4 and rows 1, 3, 5
    cfg = TrainConfig(aggregation="chunk-token-mean", chunk_rows=3, micro_batch_tokens=20, kl_in="loss",
                      kl_coef=0.05, entropy_coef=0.01)
    actor, critic = models()
    minibatch_losses(cfg, actor, critic, batch.rows(torch.tensor([0, 2, 4, 1, 3, 5])))[0].backward()
    want = grads(actor, critic)
    actor, critic = models(par=par)
    accumulate_gradients(cfg, actor, critic, batch.rows(torch.tensor(rows)), [LENGTHS[i] for i in rows])
    for model in (actor, critic):
        average_gradients(model.parameters(), par)
    errors["chunk-token-mean_by_rank"] = max(((g - w).abs().max() / max(1.0, w.abs().max())).item()
                                             for g, w in zip(grads(actor, critic), want))
    # by hand, with an empty row on rank 0: rows of 3 and 0 tokens here, of 2 and 1 on rank 1. Averaged over
    # the 2 ranks the weights are, per token, 1 / (its row's tokens x 3 rows with tokens) for seq-mean and
    # 1 / 6 tokens for token-mean
    mask = torch.tensor([[1.0, 1, 1], [0, 0, 0]] if par.dp_rank == 0 else [[1.0, 1, 0], [1, 0, 0]])
    want = torch.tensor([[1 / 9] * 3, [0] * 3] if par.dp_rank == 0 else [[1 / 6, 1 / 6, 0], [1 / 3, 0, 0]])
    seq_mean, token_mean = (minibatch_weights(mask, agg, par) for agg in ("seq-mean", "token-mean"))
    errors["seq_mean_weights_with_an_empty_row"] = (seq_mean / par.dp_size - want).abs().max().item()
    errors["token_mean_weights_with_an_empty_row"] = (token_mean / par.dp_size - mask / 6).abs().max().item()
    return errors


def test_accumulated_gradients_under_dp2_equal_one_process():
    for errors in launch(_dp_accumulation, 2):
        assert all(err < 1e-5 for err in errors.values()), errors


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor (elements) any op allocates while active; in-place ops allocate nothing
    (the Triton interpreter's set_ of a whole storage after a launch is one)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _scoring_peak(batch_size: int) -> int:
    g = torch.Generator().manual_seed(batch_size)
    lengths = torch.tensor([20 if i % 3 == 0 else 10 for i in range(batch_size)])  # runs of 40 tokens
    T = 20
    tokens = torch.randint(1, TINY.vocab_size, (batch_size, T), generator=g) * (torch.arange(T) < lengths[:, None])
    mask = ((torch.arange(T) >= 4) & (torch.arange(T) < lengths[:, None])).float()
    rewards = torch.tensor([float(i % 3 == 0) for i in range(batch_size)])
    sampled = Rollout(tokens, lengths, mask, torch.zeros_like(mask), [[(4, int(n))] for n in lengths], 0, 0)
    scored = Scored(**vars(sampled), scores=rewards, rewards=rl.place_rewards(mask, episode_rewards=rewards),
                    group_size=1)
    cfg = TrainConfig(problems_per_step=batch_size, n_samples_per_problem=1,
                                       minibatch_size=batch_size, micro_batch_tokens=40, kl_coef=0.01)
    actor, critic = models()
    with LargestOutput() as mode:
        build_batch(cfg, actor, critic, actor, scored)
    return mode.largest


def test_scoring_peak_does_not_grow_with_the_batch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch references (their Triton twins allocate alike)
    small, large = _scoring_peak(8), _scoring_peak(64)
    assert small == large and large < 64 * 20 * TINY.hidden_size  # far below one whole-batch hidden state


def _gae_loop(rewards, values, mask, gamma, lam):
    """The step-by-step reference: one backward pass over T, skipping non-action tokens."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value, next_adv = rewards.new_zeros(B), rewards.new_zeros(B)
    m = mask.to(rewards.dtype)
    for t in reversed(range(T)):
        adv = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        advantages[:, t] = adv * m[:, t]
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        next_adv = torch.where(m[:, t] > 0, adv, next_adv)
    return advantages, (advantages + values) * m


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_vectorised_gae_equals_the_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 300
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[2] = 0.0  # a row without actions
    rewards = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)  # garbage on non-actions must never be read
    got, want = rl.gae(rewards, values, mask, gamma, lam), _gae_loop(rewards, values, mask, gamma, lam)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())


def test_checkpointed_blocks_give_the_same_gradients():
    cfg = TrainConfig(micro_batch_tokens=24)
    batch = uneven_batch()
    results = []
    for checkpointed in (False, True):
        actor, critic = models()
        actor.checkpoint_activations = critic.checkpoint_activations = checkpointed
        accumulate_gradients(cfg, actor, critic, batch, LENGTHS)
        results.append(grads(actor, critic))
    assert_grads_close(results[1], results[0], tol=1e-6)


class HostReads(TorchDispatchMode):
    """Counts the ops that read a value back to the host (.item(), bool(), int())."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_packing_is_found_once_per_forward_and_never_with_lengths():
    config = replace(TINY, num_hidden_layers=4)
    model = Qwen2(config)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]  # two sequences packed in one row
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.no_grad(), HostReads() as from_positions:
        by_positions = model(ids, positions)
    with torch.no_grad(), HostReads() as from_lengths:
        by_lengths = model(ids, positions, seq_lens=[5, 7])
    assert from_positions.reads == 1 and from_lengths.reads == 0  # not once per layer
    assert (by_positions - by_lengths).abs().max() < 1e-5
    alone = model(ids[:, 5:], torch.arange(7)[None])  # the second sequence sees none of the first
    assert (by_lengths[:, 5:] - alone).abs().max() < 1e-5
