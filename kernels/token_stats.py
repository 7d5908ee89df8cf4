"""Fused per-token statistics of the softmax over the vocabulary: the log-prob of the target token, the
entropy and the self-certainty, in one pass over the logits; a plain PyTorch reference; the vocab-parallel
form. The backward is kernels/token_stats_grad.py; what both share is kernels/softmax_stats.py.

    from nanoufo.kernels.token_stats import token_stats
    logp, entropy, self_certainty = token_stats(logits, targets, temperature=0.7)   # each (N,) fp32

How it works: each row of a vocab slice reduces to five partial statistics of z = logits / T (m = max z,
s = sum e^(z - m), a = sum (z - m) e^(z - m), b = sum z, z_target), which merge exactly across slices; then
lse = m + log s, logp = z_y - lse, entropy = -sum p log p = log s - a/s, self-certainty = lse - b/V
(= KL(U || p) + log V, U uniform over the FULL vocabulary of size V). The backward needs only lse and
mu = E_p[z] = m + a/s per row, so a vocab-parallel rank differentiates its own slice with no communication.

When the slice is the whole vocabulary (no group), the Triton forward is one launch and no host sync: the
kernel finishes logp, entropy, self-certainty, lse and mu itself. For few rows it splits each row over
several programs (a 2D grid); the last program of a row to arrive merges their partials. Otherwise the
partials of every rank's slice are all-gathered (one collective, no host sync) and finished by PyTorch ops
(finish_slice).

Edge cases: a row whose target is ignore_index is masked: its three outputs are 0, it gets no
gradient and its logits are not read. A -inf logit has p = 0 and no gradient, and adds nothing to
logp or the entropy; the mean logit is then -inf, so the self-certainty is +inf (KL(U || p) is
infinite). A row that is -inf everywhere but at the target has logp = 0 and entropy 0 (to rounding); a row
that is -inf everywhere is no distribution and gives NaN, as torch.log_softmax does. A target outside
[0, V) makes the row's logp NaN, and a NaN logit all three of its outputs (never a plausible number), on every
path and without a host sync; with debug=True or NANOUFO_KERNEL_DEBUG=1 they raise instead, naming the first
bad row (one host sync).

Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_token_stats.py
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import TL_ACC, acc_dtype, debug_mode, pick_impl
from nanoufo.kernels.softmax_stats import (A, B, LN2_TL, LOG2E, M, S, ZY, SliceConfig, bf16_pairs, block_of,
                                           lane_rescale, lanes, merge_partial_stats, multiprocessors, owned_targets,
                                           row_stats, scaled_logits, split_columns, splits_of)
from nanoufo.kernels.token_stats_grad import token_stats_grad

MIN_ARRIVAL_COUNTERS = 1024  # the split kernel's per-row counters: 1024 rows at least, so few batches regrow them


def partial_stats_reference(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    """(5, N) partial statistics (m, s, a, b, z_target) of a (N, V_slice) block of logits."""
    valid = targets != cfg.ignore_index
    z = scaled_logits(logits, valid, cfg)  # (N, V)
    m = z.amax(1)  # (N,)
    m_safe = torch.where(m == float("-inf"), 0.0, m)[:, None]  # (N, 1)
    e = torch.exp(z - m_safe)  # (N, V)
    a = torch.where(e > 0, (z - m_safe) * e, 0.0).sum(1)
    b = torch.where(valid[:, None], z, 0.0).sum(1)
    owned, local = owned_targets(targets, valid, cfg, logits.shape[1])
    z_y = torch.where(owned, z.gather(1, local[:, None])[:, 0], 0.0)
    return torch.stack([m, e.sum(1), a, b, z_y])  # (5, N)


def _raise_bad_target(where: str, row: int, target: int, vocab_size: int, ignore_index: int) -> None:
    raise ValueError(f"{where}: targets[{row}] = {target} is outside the vocabulary [0, {vocab_size}); mark "
                     f"masked rows with ignore_index={ignore_index}")


@triton.jit
def _finish_row(row, target, valid, m, s, a, b, row_ptr, logp_ptr, ent_ptr, sc_ptr, lse_ptr, bad_ptr, n_rows,
                n_cols, inv_temp, DEBUG: tl.constexpr, ACC: tl.constexpr):
    """logp, entropy, self-certainty, lse and mu (the backward's inputs) of one whole-vocabulary row."""
    in_vocab = (target >= 0) & (target < n_cols)
    x_y = tl.load(row_ptr + tl.where(in_vocab, target, 0), mask=valid & in_vocab, other=0.0).to(ACC)
    nan_row = b != b  # a NaN logit anywhere makes the sum of the logits NaN
    s = tl.where(valid, s, 1.0)  # a masked row has s = 0 and writes zeros
    log_s = tl.log(s)
    lse = m * inv_temp + log_s
    a_over_s = a * LN2_TL / s  # E_p[z] - m / T
    # an out-of-vocabulary target or a NaN logit gives NaN, never a plausible number
    logp = tl.where(in_vocab & ~nan_row, x_y * inv_temp - lse, float("nan"))
    entropy = tl.where(nan_row, float("nan"), log_s - a_over_s)
    self_certainty = lse - b * inv_temp / n_cols
    if DEBUG:  # the first bad row, for the launcher's error message
        tl.atomic_min(bad_ptr, tl.where(valid & ~in_vocab, row, n_rows))
        tl.atomic_min(bad_ptr + 1, tl.where(valid & nan_row, row, n_rows))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, entropy, 0.0))
    tl.store(sc_ptr + row, tl.where(valid, self_certainty, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    tl.store(lse_ptr + n_rows + row, tl.where(valid, m * inv_temp + a_over_s, 0.0))  # mu = E_p[z]


@triton.jit
def _token_stats_kernel(logits_ptr, targets_ptr, logp_ptr, ent_ptr, sc_ptr, lse_ptr, part_ptr, count_ptr, bad_ptr,
                        n_rows, n_cols, row_stride, c, inv_temp, ignore_index, SPLIT: tl.constexpr,
                        DEBUG: tl.constexpr, K: tl.constexpr, GROUPS: tl.constexpr, BF16_PAIRS: tl.constexpr,
                        ACC: tl.constexpr):
    # grid (N, SPLIT): program (row, j) reduces the row's columns split_columns(j) gives
    row = tl.program_id(0).to(tl.int64)  # int64 so row * row_stride cannot overflow past 2^31
    split = tl.program_id(1)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    row_ptr = logits_ptr + row * row_stride
    lo, hi = split_columns(split, SPLIT, n_cols, 2 * K * GROUPS)
    end = tl.where(valid, hi, lo)  # masked: read nothing
    m, s, a, b = row_stats(row_ptr, lo, end, c, K, GROUPS, BF16_PAIRS, ACC)
    if SPLIT == 1:
        _finish_row(row, target, valid, m, s, a, b, row_ptr, logp_ptr, ent_ptr, sc_ptr, lse_ptr, bad_ptr,
                    n_rows, n_cols, inv_temp, DEBUG, ACC)
    else:
        part = part_ptr + (row * SPLIT + split) * 4
        tl.store(part, m)
        tl.store(part + 1, s)
        tl.store(part + 2, a)
        tl.store(part + 3, b)
        # the last program of the row to arrive merges the SPLIT partials and finishes; the acq_rel atomic
        # makes the other programs' stores visible to it; it re-zeroes the counter for the next launch
        if tl.atomic_add(count_ptr + row, 1) == SPLIT - 1:
            parts = part_ptr + (row * SPLIT + tl.arange(0, SPLIT)) * 4
            ms, ss = tl.load(parts).to(ACC), tl.load(parts + 1).to(ACC)
            as_, bs = tl.load(parts + 2).to(ACC), tl.load(parts + 3).to(ACC)
            m = tl.max(ms, 0)
            ss, as_ = lane_rescale(ms, ss, as_, m, c, ACC)
            tl.store(count_ptr + row, 0)
            _finish_row(row, target, valid, m, tl.sum(ss, 0), tl.sum(as_, 0), tl.sum(bs, 0), row_ptr, logp_ptr,
                        ent_ptr, sc_ptr, lse_ptr, bad_ptr, n_rows, n_cols, inv_temp, DEBUG, ACC)


@triton.jit
def _partial_stats_kernel(logits_ptr, targets_ptr, stats_ptr, n_rows, n_cols, row_stride, vocab_start, c,
                          inv_temp, ignore_index, K: tl.constexpr, GROUPS: tl.constexpr,
                          BF16_PAIRS: tl.constexpr, ACC: tl.constexpr):
    # one vocab slice of one row: (m, s, a, b, z_target) in natural units, merged by the caller
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    local = target - vocab_start
    owned = valid & (local >= 0) & (local < n_cols)
    row_ptr = logits_ptr + row * row_stride
    z_y = tl.load(row_ptr + tl.where(owned, local, 0), mask=owned, other=0.0).to(ACC) * inv_temp
    m, s, a, b = row_stats(row_ptr, 0, tl.where(valid, n_cols, 0), c, K, GROUPS, BF16_PAIRS, ACC)
    tl.store(stats_ptr + row, m * inv_temp)
    tl.store(stats_ptr + n_rows + row, s)
    tl.store(stats_ptr + 2 * n_rows + row, a * LN2_TL)
    tl.store(stats_ptr + 3 * n_rows + row, b * inv_temp)
    tl.store(stats_ptr + 4 * n_rows + row, z_y)


_ARRIVALS: dict[torch.device, torch.Tensor] = {}  # per-row arrival counters of the split kernel, kept zeroed


def _arrivals(n_rows: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per row; the kernel leaves it zeroed, so only growing it costs a launch.
    Calls on one device must not overlap (one stream), as they share the counters."""
    counters = _ARRIVALS.get(device)
    if counters is None or counters.numel() < n_rows:
        counters = _ARRIVALS[device] = torch.zeros(max(n_rows, MIN_ARRIVAL_COUNTERS), dtype=torch.int32,
                                                   device=device)
    return counters


def token_stats_triton(logits: torch.Tensor, targets: torch.Tensor,
                       cfg: SliceConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
    """logp, entropy, self-certainty, each (N,), and lse, mu (2, N) of whole-vocabulary rows, in one launch."""
    n, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n,) and targets.dtype == torch.int64
    acc = acc_dtype(logits.dtype)
    outs = [torch.empty(n, dtype=acc, device=logits.device) for _ in range(3)]  # 3 x (N,)
    lse_mu = torch.empty((2, n), dtype=acc, device=logits.device)  # (2, N)
    block = block_of(cfg, v)
    k, groups, warps = lanes(block)
    splits = splits_of(cfg, n, v, block, multiprocessors(logits.device))
    parts = torch.empty((n, splits, 4), dtype=acc, device=logits.device) if splits > 1 else lse_mu  # (N, S, 4)
    counts = _arrivals(n, logits.device) if splits > 1 else lse_mu  # lse_mu: an unused pointer
    bad = torch.full((2,), n, dtype=torch.int64, device=logits.device) if cfg.debug else lse_mu
    _token_stats_kernel[(n, splits)](logits, targets, *outs, lse_mu, parts, counts, bad, n, v, logits.stride(0),
                                     LOG2E / cfg.temperature, 1.0 / cfg.temperature, cfg.ignore_index,
                                     SPLIT=splits, DEBUG=cfg.debug, K=k, GROUPS=groups,
                                     BF16_PAIRS=bf16_pairs(logits), ACC=TL_ACC[acc], num_warps=warps)
    if cfg.debug:  # the first out-of-vocabulary target or NaN row the kernel recorded (one host sync)
        bad_target, nan_row = bad.tolist()
        if bad_target < n:
            _raise_bad_target("token_stats", bad_target, int(targets[bad_target]), v, cfg.ignore_index)
        if nan_row < n:
            raise ValueError(f"token_stats: row {nan_row} of the logits holds NaN")
    return outs, lse_mu


def partial_stats_triton(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    n, v = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n,) and targets.dtype == torch.int64
    stats = torch.empty((5, n), dtype=acc_dtype(logits.dtype), device=logits.device)  # (5, N)
    k, groups, warps = lanes(block_of(cfg, v))
    _partial_stats_kernel[(n,)](logits, targets, stats, n, v, logits.stride(0), cfg.vocab_start,
                                LOG2E / cfg.temperature, 1.0 / cfg.temperature, cfg.ignore_index, K=k, GROUPS=groups,
                                BF16_PAIRS=bf16_pairs(logits), ACC=TL_ACC[stats.dtype], num_warps=warps)
    return stats


def partial_stats(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig) -> torch.Tensor:
    """(5, N) partial statistics of a (N, V_slice) block of logits; no autograd."""
    if cfg.impl == "triton" and logits.shape[0] > 0:  # no rows: no launch
        return partial_stats_triton(logits, targets, cfg)
    return partial_stats_reference(logits, targets, cfg)


# all_gather_into_tensor, the name torch 2.8 knows, is deprecated in newer torch (2.13 here) for all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather_stats(stats: torch.Tensor, n_cols: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel merge in one collective: every rank's (5, N) statistics and slice width, all-gathered and
    merged exactly in rank order (the same bits on every rank). Returns the full vocabulary's (5, N) statistics
    and its size as a 0-d tensor (not read on the host)."""
    n = stats.shape[1]
    packed = stats.new_full((5 * n + 1,), float(n_cols))  # (5N + 1,): the statistics, then the width
    packed[:-1] = stats.flatten()
    gathered = packed.new_empty(dist.get_world_size(group) * packed.numel())  # flat, as gloo wants it
    _all_gather(gathered, packed, group=group)
    gathered = gathered.view(-1, packed.numel())  # (ranks, 5N + 1)
    return merge_partial_stats(gathered[:, :-1].view(-1, 5, n)), gathered[:, -1].sum()


def _check_rows(stats: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, vocab_size: int | torch.Tensor,
                cfg: SliceConfig) -> None:
    """debug: raise naming the first row whose target is outside [0, vocab_size) or whose logits hold NaN."""
    if len(bad := (valid & ((targets < 0) | (targets >= vocab_size))).nonzero()):
        row = int(bad[0, 0])
        _raise_bad_target("token_stats", row, int(targets[row]), int(vocab_size), cfg.ignore_index)
    if (nan_rows := (valid & stats[B].isnan()).nonzero()).numel():
        raise ValueError(f"token_stats: row {int(nan_rows[0, 0])} of the logits holds NaN")


def finish_slice(stats: torch.Tensor, targets: torch.Tensor, n_cols: int, cfg: SliceConfig,
                 group=None) -> tuple[list[torch.Tensor], torch.Tensor, int | torch.Tensor]:
    """From the (5, N) statistics of this rank's slice of n_cols columns: logp, entropy, self-certainty, each
    (N,), (2, N) lse and mu, masked rows 0, and the full vocabulary's size V. group: the tensor-parallel process
    group whose ranks hold the other slices (one all-gather; V is then cfg.vocab_size, or when that is None the
    gathered widths' sum as a 0-d tensor, which the backward reads on the host), or None when the slice is the
    whole vocabulary (V = n_cols). No host sync: a target outside [0, V) gives a NaN logp, as on the one-launch
    path; with cfg.debug the rows are checked on the host and the first bad one named."""
    vocab_size = n_cols
    if group is not None:
        stats, gathered_size = _all_gather_stats(stats, n_cols, group)
        if cfg.debug and cfg.vocab_size is not None and int(gathered_size) != cfg.vocab_size:
            raise ValueError(f"token_stats: vocab_size={cfg.vocab_size} but the ranks' slices hold "
                             f"{int(gathered_size)} columns")
        vocab_size = cfg.vocab_size or gathered_size
    valid = targets != cfg.ignore_index
    if cfg.debug:
        _check_rows(stats, targets, valid, vocab_size, cfg)
    log_s = torch.log(stats[S])
    lse = stats[M] + log_s  # (N,)
    a_over_s = stats[A] / stats[S]
    logp = torch.where((targets >= 0) & (targets < vocab_size), stats[ZY] - lse, float("nan"))
    outs = (logp, log_s - a_over_s, lse - stats[B] / vocab_size)
    lse_mu = torch.stack([lse, stats[M] + a_over_s])  # (2, N); mu = E_p[z]
    return [torch.where(valid, out, 0.0) for out in outs], torch.where(valid, lse_mu, 0.0), vocab_size


def finished_stats(logits: torch.Tensor, targets: torch.Tensor, cfg: SliceConfig,
                   group=None) -> tuple[list[torch.Tensor], torch.Tensor, int | torch.Tensor]:
    """No autograd: finish_slice's outputs for a logits slice; the whole vocabulary on the Triton path: one launch."""
    if group is None and cfg.vocab_start == 0 and cfg.impl == "triton" and logits.shape[0] > 0:
        return (*token_stats_triton(logits, targets, cfg), logits.shape[1])
    return finish_slice(partial_stats(logits, targets, cfg), targets, logits.shape[1], cfg, group)


class TokenStatsFn(torch.autograd.Function):
    """Hands out the finished logp, entropy, self-certainty (computed without autograd); the backward
    differentiates the local slice given the global lse and mu (no communication):
    grad_fn(targets, lse, mu, vocab_size, grads, needs_input_grad, *inputs) -> a gradient per input."""

    @staticmethod
    def forward(ctx, grad_fn, targets, vocab_size, outs, lse_mu, *inputs):
        ctx.save_for_backward(targets, lse_mu, *inputs)
        ctx.grad_fn, ctx.vocab_size = grad_fn, vocab_size
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_sc):
        targets, lse_mu, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        grads = (g_logp, g_ent, g_sc)
        if not any(needs) or all(g is None for g in grads):
            return (None,) * (5 + len(inputs))
        vocab_size = int(ctx.vocab_size)  # a 0-d tensor when vocab-parallel without vocab_size: one host read
        return (None,) * 5 + tuple(ctx.grad_fn(targets, *lse_mu, vocab_size, grads, needs, *inputs))


def check_targets_shape(targets: torch.Tensor, n_rows: int, where: str, device: torch.device) -> torch.Tensor:
    if targets.shape != (n_rows,) or targets.dtype.is_floating_point or targets.device != device:
        raise ValueError(f"{where}: targets must be integer of shape ({n_rows},) on {device}, got "
                         f"{targets.dtype} {tuple(targets.shape)} on {targets.device}")
    return targets.long().contiguous()


def token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                vocab_start: int = 0, group=None, ignore_index: int = -100, impl: str = "auto",
                block_size: int | None = None, num_splits: int | None = None, debug: bool | None = None,
                vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, self_certainty), each (N,) fp32, of logits (N, V) at a temperature, each
    differentiable w.r.t. the logits. With group (vocab-parallel), logits is this rank's slice
    starting at vocab_start and the outputs are those of the full vocabulary on every rank; vocab_size, the
    full vocabulary's size, spares the backward a host read of it. Bad targets, NaN logits and debug: see the
    module doc. num_splits: programs per row (a power of two; None: enough to fill the GPU when N is small)."""
    if logits.ndim != 2 or not logits.dtype.is_floating_point or logits.shape[1] == 0:
        raise ValueError(f"token_stats: logits must be a float (N, V) tensor with V > 0, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"token_stats: temperature must be > 0, got {temperature}")
    if num_splits is not None and (num_splits < 1 or num_splits & (num_splits - 1)):
        raise ValueError(f"token_stats: num_splits must be a power of two, got {num_splits}")
    targets = check_targets_shape(targets, logits.shape[0], "token_stats", logits.device)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    cfg = SliceConfig(temperature, vocab_start, ignore_index, pick_impl(impl, logits), block_size, num_splits,
                      debug_mode(debug), vocab_size)
    with torch.no_grad():
        outs, lse_mu, vocab_size = finished_stats(logits, targets, cfg, group)
    grad_fn = lambda targets, lse, mu, vocab_size, grads, needs, logits: (
        token_stats_grad(logits, targets, lse, mu, grads, vocab_size, cfg, logits.dtype),)
    return TokenStatsFn.apply(grad_fn, targets, vocab_size, outs, lse_mu, logits)
