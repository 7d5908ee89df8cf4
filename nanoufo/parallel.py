"""Tensor parallelism (Megatron-style) and data parallelism over torch.distributed, in one small module.

Ranks form a 2D grid: consecutive ranks make a tensor-parallel (TP) group (the GPUs of one node), and ranks
with the same TP rank across groups make a data-parallel (DP) group. torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK; init_parallel reads them and returns a ParallelContext that layers and trainers are handed
(there is no hidden global state).

    torchrun --standalone --nproc_per_node=2 train.py ...          # TP=2 (the default tp=2)
    torchrun --standalone --nproc_per_node=8 train.py ...          # DP=4 x TP=2
    torchrun --standalone --nproc_per_node=4 train.py --tp=1 ...   # DP=4
    par = init_parallel(tp=2)                         # NCCL on GPUs, gloo on CPU
    model = load_model(ckpt, device=par.device, par=par)

Column-parallel layers split their output features and take a replicated input; row-parallel layers split
their input features and all-reduce their output. The two autograd-aware collectives between them are
Megatron's f (identity forward, all-reduce backward) and g (all-reduce forward, identity backward). Each
parallel layer records, per parameter, which slice of the full Hugging Face tensor it holds (a Shard), so
the loader reads only that slice and the saver knows how to put the full tensor back together.

Tests (2 gloo processes on the CPU): TRITON_INTERPRET=1 python -m pytest -q tests/test_parallel.py
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanoufo.optim import grad_of


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the DP x TP grid; groups are None when their size is 1."""
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")

    @property
    def rank(self) -> int:  # consecutive global ranks share a TP group
        return self.dp_rank * self.tp_size + self.tp_rank

    @property
    def world(self) -> int:
        return self.dp_size * self.tp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __deepcopy__(self, memo) -> "ParallelContext":  # models get deep-copied (reference policy); groups must not
        return self


SINGLE = ParallelContext()


def init_parallel(tp: int = 1, device: str | torch.device | None = None, timeout_s: float = 600.0) -> ParallelContext:
    """Join the process group that torchrun describes in the environment and build the TP and DP groups.
    A single process (python train.py) runs without tensor parallelism whatever tp says.

    timeout_s bounds every collective: a rank whose peer died or hangs raises instead of waiting forever
    (gloo notices a dead peer at once; NCCL's watchdog aborts the process when the timeout passes)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    tp = 1 if world == 1 else tp
    if tp < 1 or world % tp:
        raise ValueError(f"tp={tp} does not divide the world size {world} (WORLD_SIZE): launch a multiple of tp "
                         f"processes, e.g. torchrun --nproc_per_node={max(tp, 1)} ...")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process
    if world == 1:
        return ParallelContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a second call only lays out new groups (tests try two layouts in one launch)
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), device_id=device if cuda else None)
    groups, timeout = world // tp, timedelta(seconds=timeout_s)
    tp_group = _subgroup([list(range(g * tp, (g + 1) * tp)) for g in range(groups)], timeout) if tp > 1 else None
    dp_group = _subgroup([list(range(t, world, tp)) for t in range(tp)], timeout) if groups > 1 else None
    return ParallelContext(rank % tp, tp, rank // tp, groups, tp_group, dp_group, device)


def _subgroup(ranks_per_group: list[list[int]], timeout: timedelta) -> dist.ProcessGroup:
    group, _ = dist.new_subgroups_by_enumeration(ranks_per_group, timeout=timeout)  # every rank makes every group
    return group


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only (works before and without init_parallel)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def barrier(par: ParallelContext) -> None:
    if par.world > 1:
        dist.barrier()


def check_tp_split(config, tp_size: int, source: str = "config") -> None:
    """Raise if the model cannot be cut into tp_size pieces; called before any weight is read."""
    for key in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, key) % tp_size:
            raise ValueError(f"{source}: {key}={getattr(config, key)} is not divisible by tp={tp_size} "
                             f"(attention heads are split whole across tensor-parallel ranks)")


def split_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's part of n items, balanced: the first n % size ranks take one more."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class Shard:
    """Slice [start, stop) along dim of a full tensor whose size along dim is full."""
    dim: int
    start: int
    stop: int
    full: int

    def take(self, full_tensor):
        """This rank's part of a torch tensor or of a safetensors slice (which reads only that part)."""
        return full_tensor[(slice(None),) * self.dim + (slice(self.start, self.stop),)]


@dataclass(frozen=True)
class HFTensor:
    """Where one Hugging Face tensor sits in this rank's model: rows [row, row + rows) of parameter `param`
    (the whole parameter when rows is None) hold `shard` of the full tensor (all of it when shard is None)."""
    param: str
    shard: Shard | None = None
    row: int = 0
    rows: int | None = None

    def local(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's part of the tensor: a view into the parameter (or into any tensor named like it)."""
        p = params[self.param]
        return p if self.rows is None else p.narrow(0, self.row, self.rows)


def hf_tensors(model: nn.Module) -> dict[str, HFTensor]:
    """{Hugging Face tensor name: HFTensor} for every tensor of the model's checkpoint, in module order.

    A module's split parameters are named in its `shards` dict ({attr: Shard}); a merged projection
    (ColumnParallelLinear) holds several HF tensors in one parameter and lists them in `parts`. The
    specs live on the modules, not on the Parameters, because moving a model off the meta device builds new
    Parameter objects and would drop any attribute set on the old ones."""
    layout = {}
    for prefix, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{attr}" if prefix else attr
            parts = getattr(module, "parts", None)
            if parts is None:
                layout[name] = HFTensor(name, getattr(module, "shards", {}).get(attr))
                continue
            parent = prefix.rpartition(".")[0]
            for part, row, rows, shard in parts:
                layout[f"{parent}.{part}.{attr}" if parent else f"{part}.{attr}"] = HFTensor(name, shard, row, rows)
    return layout


def split_params(model: nn.Module) -> set[str]:
    """Names of the parameters that hold only this rank's slice (the others are replicated)."""
    return {t.param for t in hf_tensors(model).values() if t.shard is not None}


# Megatron's f and g: the only communication inside the model, and autograd knows about both.
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # each rank's shard contributes part of d(loss)/d(input)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # the output is replicated, so is its gradient


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """f: identity forward, all-reduce backward; at the input of column-parallel layers."""
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """g: all-reduce forward, identity backward; at the output of row-parallel layers."""
    return x if group is None else _ReduceFromTP.apply(x, group)


class ColumnParallelLinear(nn.Linear):
    """y = x W.T + b with W's rows (output features) split across TP ranks; the output stays split. W may
    stack several projections of one input, run as one GEMM (q/k/v, gate/up): the output is this rank's
    slice of each part, concatenated in order. Checkpoints keep the parts as separate tensors: `parts`
    lists (HF module name, first output row, rows, Shard of the HF tensor) for hf_tensors."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool, par: ParallelContext = SINGLE):
        self.parts, row = [], 0
        for part, out_features in parts.items():
            start, stop = split_range(out_features, par.tp_rank, par.tp_size)
            self.parts.append((part, row, stop - start, Shard(0, start, stop, out_features)))
            row += stop - start
        super().__init__(in_features, row, bias=bias)
        self.par = par

    @property
    def part_sizes(self) -> list[int]:  # this rank's output width of each part, for splitting the output
        return [rows for _, _, rows, _ in self.parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.par.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """y = x W.T + b with W's columns (input features) split; takes a split input, returns the full sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, par: ParallelContext = SINGLE):
        start, stop = split_range(in_features, par.tp_rank, par.tp_size)
        super().__init__(stop - start, out_features, bias=bias)
        self.par = par
        self.shards = {"weight": Shard(1, start, stop, in_features)}  # the bias is replicated, added once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.par.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Embedding whose rows (the vocabulary) are split; a rank answers for its ids, zeros elsewhere, then sum."""

    def __init__(self, num_embeddings: int, embedding_dim: int, par: ParallelContext = SINGLE):
        self.vocab_start, self.vocab_stop = split_range(num_embeddings, par.tp_rank, par.tp_size)
        super().__init__(self.vocab_stop - self.vocab_start, embedding_dim)
        self.par = par
        self.shards = {"weight": Shard(0, self.vocab_start, self.vocab_stop, num_embeddings)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.par.tp_group is None:
            return super().forward(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)  # ids another rank owns
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(x, self.par.tp_group)  # (..., H)


def all_gather_shards(t: torch.Tensor, shard: Shard, par: ParallelContext) -> torch.Tensor:
    """The full tensor from every TP rank's part (parts may differ by one row: pad, gather, trim)."""
    if par.tp_group is None:
        return t
    sizes = [stop - start for start, stop in (split_range(shard.full, r, par.tp_size) for r in range(par.tp_size))]
    pad = list(t.shape)
    pad[shard.dim] = max(sizes) - t.shape[shard.dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim=shard.dim).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=par.tp_group)
    return torch.cat([p.narrow(shard.dim, 0, n) for p, n in zip(parts, sizes)], dim=shard.dim)


def full_state_dict(model: nn.Module, par: ParallelContext) -> dict[str, torch.Tensor] | None:
    """Every tensor under its Hugging Face name, whole, on global rank 0 (on the CPU when gathered); None
    elsewhere. Merged projections come out as their separate HF tensors.

    Only the first DP group gathers (the others hold the same weights); all its TP ranks must call this."""
    if par.dp_rank != 0:
        return None
    params, state = {name: p.detach() for name, p in model.named_parameters()}, {}
    for name, where in hf_tensors(model).items():
        t = where.local(params)
        if where.shard is not None and par.tp_size > 1:
            t = all_gather_shards(t, where.shard, par).cpu()  # one full tensor at a time on the device
        if par.is_main:
            state[name] = t.contiguous()
    return state if par.is_main else None


def all_reduce_(t: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (token counts, statistics); a no-op without a group."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_vocab(logits: torch.Tensor, vocab_start: int, vocab_size: int, par: ParallelContext) -> torch.Tensor:
    """Full-vocabulary logits (..., V) from every TP rank's columns (..., V_local), identical on every rank,
    so a sampler run with the same seed on each rank draws the same token column (no rank-0 side channel)."""
    shard = Shard(logits.ndim - 1, vocab_start, vocab_start + logits.shape[-1], vocab_size)
    return all_gather_shards(logits, shard, par)


def dp_mean_scale(count: torch.Tensor, par: ParallelContext) -> float:
    """Factor for a rank's mean over its `count` items (tokens or rows) such that averaging gradients over
    the DP group gives the mean over every rank's items, as one process with the whole batch would:
    count * dp_size / (count summed over the DP group). 1.0 without data parallelism."""
    if par.dp_group is None:
        return 1.0
    total = all_reduce_(torch.as_tensor(count, dtype=torch.float64).detach().clone(), par.dp_group)
    return float(count) * par.dp_size / max(float(total), 1.0)


def all_ranks_true(flag: bool, par: ParallelContext) -> bool:
    """True when flag holds on every rank: decisions that skip a collective (a non-finite loss) must agree."""
    if par.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=par.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def average_gradients(params, par: ParallelContext) -> None:
    """Mean of every gradient over the DP group (async all-reduces, then wait), on the gradients the optimizer
    steps with (grad_of: fp32 sums behind bf16 parameters, so the reduction adds in fp32). Parameters without
    a gradient (a critic's unused LM head) are skipped: which ones have none depends on the graph, not on the
    data, so every rank skips the same ones."""
    if par.dp_group is None:
        return
    grads = [g for g in map(grad_of, params) if g is not None]
    works = [dist.all_reduce(g, group=par.dp_group, async_op=True) for g in grads]
    for g, work in zip(grads, works):
        work.wait()
        g.div_(par.dp_size)


def clip_grad_norm_(model: nn.Module, max_norm: float, par: ParallelContext) -> torch.Tensor:
    """Clip by the norm of the full model's gradient (the gradients the optimizer steps with, grad_of): split
    parameters' squares summed over the TP group, replicated ones (identical on every TP rank) counted once.
    Returns the norm before clipping.

    Foreach kernels (one multi-tensor launch per group instead of a few per parameter): per-tensor norms
    in fp32, then one in-place scaling of every gradient."""
    split_names = split_params(model) if par.tp_size > 1 else set()
    split, replicated = [], []
    for name, p in model.named_parameters():
        if (grad := grad_of(p)) is not None:
            (split if name in split_names else replicated).append(grad)
    device = next(model.parameters()).device
    split_sq = all_reduce_(_sum_of_squares(split, device), par.tp_group)
    norm = (split_sq + _sum_of_squares(replicated, device)).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    grads = split + replicated
    for dtype in {g.dtype for g in grads}:
        torch._foreach_mul_([g for g in grads if g.dtype == dtype], scale.to(dtype))
    return norm


def _sum_of_squares(grads: list[torch.Tensor], device) -> torch.Tensor:
    """sum of squares of every element of grads, fp32 (0 for none)."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # per tensor, accumulated in fp32
    return torch.stack(norms).pow(2).sum()
