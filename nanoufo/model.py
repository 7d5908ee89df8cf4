"""Qwen2.5 in one file: config, RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, LM head,
a scalar value head for the critic and the two-class step head of a process reward model (PRM, the
layout of Qwen2.5-Math-PRM). Reads top to bottom; weights load and save through
nanoufo/weights.py in Hugging Face's safetensors layout, so parameter names mirror Qwen2ForCausalLM.

    from nanoufo.weights import load_model
    model = load_model("path/to/Qwen2.5-0.5B-Instruct", device="cuda", dtype=torch.bfloat16)
    hidden = model(input_ids, position_ids)      # (B, T, H) after the final norm
    logits = model.logits(hidden)                # (B, T, V)

Sequences in a batch are right-padded or packed; position_ids say which: a token whose position is 0
starts a new sequence, and a token only attends to earlier tokens of its own sequence. With a KVCache,
a token's position is also its slot in the cache: new keys/values are written there and a token sees
every slot up to its own, so prefill, decode and appending a feedback turn are the same call.
Tests: python -m pytest -q tests/test_model.py (parity with transformers' Qwen2ForCausalLM)
"""
import json
from dataclasses import dataclass, field, fields
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanoufo.parallel import (SINGLE, ColumnParallelLinear, ParallelContext, RowParallelLinear, VocabParallelEmbedding,
                              check_tp_split, copy_to_tp, hf_tensors)

from nanoufo.kernels.decode_attention import decode_attention
from nanoufo.kernels.dispatch import pick_impl
from nanoufo.kernels.rms_norm import add_rms_norm
from nanoufo.kernels.rope_kv_append import apply_rotary, rope_kv_append, split_qkv
from nanoufo.kernels.silu_mul import silu_mul

try:  # optional fast path on GPUs; the SDPA path below is the reference
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_varlen_func = flash_attn_with_kvcache = None

PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"  # the same trunk with a step-scoring head and no LM head
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", PRM_ARCHITECTURE)


@dataclass
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    architecture: str = "Qwen2ForCausalLM"  # or PRM_ARCHITECTURE
    hf: dict = field(default_factory=dict, repr=False)  # the raw config.json, written back on save

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_prm(self) -> bool:
        return self.architecture == PRM_ARCHITECTURE

    @classmethod
    def from_json(cls, path: str | Path) -> "QwenConfig":
        """A Hugging Face config.json, checked to describe a model nanoufo runs."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a Hugging Face checkpoint directory needs config.json)")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        archs = hf.get("architectures") or [hf.get("model_type", "?")]
        if hf.get("model_type") != "qwen2" or not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ValueError(f"{path}: unsupported architecture {archs} (model_type "
                             f"{hf.get('model_type')!r}); nanoufo loads {', '.join(SUPPORTED_ARCHITECTURES)}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{path}: rope scaling {rope} is not supported (only the default RoPE)")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{path}: use_sliding_window=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (Qwen2 uses silu)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if missing := [key for key in required if key not in hf]:
            raise ValueError(f"{path}: missing key {missing[0]!r}")
        same_name = {f.name: hf[f.name] for f in fields(cls) if f.name in hf}  # the keys HF spells as nanoufo does
        return cls(**same_name | dict(
            num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            architecture=next(a for a in archs if a in SUPPORTED_ARCHITECTURES), hf=hf))


@dataclass
class KVCache:
    """Preallocated keys and values for every layer; slot s of a row holds the token at position s."""
    k: torch.Tensor  # (L, B, S, Hkv, D)
    v: torch.Tensor  # (L, B, S, Hkv, D)

    @classmethod
    def allocate(cls, config: QwenConfig, batch: int, max_len: int, device=None, dtype=None,
                 tp_size: int = 1) -> "KVCache":
        """Under tensor parallelism each rank caches only its own KV heads (num_key_value_heads / tp_size)."""
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads // tp_size, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the variance in fp32, as Qwen2 was trained
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def fused(self, x: torch.Tensor, add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed x + add, x + add) in one kernel (kernels/rms_norm.py; no autograd): the cached path's norm."""
        return add_rms_norm(x, self.weight, self.eps, add)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, 1, D) for rotating q and k at the given positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def uses_flash_attn(x: torch.Tensor) -> bool:
    """Whether attention over tensors like x runs flash-attn's kernels: installed, CUDA, 16-bit."""
    return flash_attn_varlen_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor copied to device without a host sync: PyTorch synchronises the stream after a copy from
    pageable memory (the host waits for all queued GPU work), not after one from pinned memory."""
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


@dataclass(frozen=True)
class SequenceLayout:
    """Which tokens see which, worked out once per forward for every layer: finding packed rows from position
    ids, or the cache slots a prefill reads, costs host syncs, and flash-attn's offsets a copy to the device.
    kind: "decode" (the Triton decode kernel, one query per cached row: it reads the positions itself),
    "flash" (flash-attn) or "sdpa" (PyTorch's scaled_dot_product_attention). For "sdpa", no field set: every
    row is one causal sequence over its own tokens (cached: from slot 0)."""
    kind: str = "sdpa"
    seq_lens: tuple[int, ...] | None = None  # sdpa: sequences packed end to end in a single row (B = 1)
    mask: torch.Tensor | None = None  # sdpa: (B, 1, G * T, S) bool, query rows folded by KV head (_sdpa)
    slots: int | None = None  # sdpa with a cache: the slots any query sees (the furthest position + 1)
    cu_seqlens: torch.Tensor | None = None  # flash: (n + 1,) int32 offsets of the sequences in the flat batch
    max_len: int = 0  # flash: the longest of them
    cache_seqlens: torch.Tensor | None = None  # flash with a cache: (B,) int32 slots filled after this call
    cache_rows: torch.Tensor | None = None  # flash with a cache: (B,) int32


def attention_kind(x: torch.Tensor, T: int, cached: bool) -> str:
    """The attention kernels a forward of T tokens per row over tensors like x runs (SequenceLayout.kind)."""
    if cached and T == 1 and pick_impl("auto", x) == "triton":
        return "decode"
    return "flash" if uses_flash_attn(x) else "sdpa"


def sequence_layout(position_ids: torch.Tensor, seq_lens: list[int] | None = None, *, kind: str = "sdpa",
                    groups: int = 1, unpacked: bool = False) -> SequenceLayout:
    """The layout of an uncached forward over position_ids (B, T): the sequences seq_lens (host ints) packed in
    one row; else one sequence per row when `unpacked` says so (no host sync) or when no row holds a position
    0 after its start (one host sync); else sequences starting at each position 0 (packed by position ids;
    flash-attn's offsets cost two more syncs). groups: query heads per KV head (the mask's folding). Every
    forward of the project's own passes seq_lens or unpacked (the trainer's micro-batches, the PRM's calls),
    so the syncs are left to callers who pass bare position ids."""
    B, T = position_ids.shape
    device = position_ids.device
    if seq_lens is not None:
        if B != 1 or sum(seq_lens) != T:
            raise ValueError(f"seq_lens {list(seq_lens)} must sum to the length of a single row, got position_ids "
                             f"{tuple(position_ids.shape)}")
        lens = tuple(int(n) for n in seq_lens)
        if kind == "flash":
            offsets = to_device(torch.tensor([0, *accumulate(lens)], dtype=torch.int32), device)
            return SequenceLayout("flash", cu_seqlens=offsets, max_len=max(lens))
        return SequenceLayout(seq_lens=lens)
    starts = position_ids == 0
    starts[:, 0] = True  # every row starts a sequence, whatever its positions
    if unpacked or not starts[:, 1:].any():
        if kind == "flash":
            offsets = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
            return SequenceLayout("flash", cu_seqlens=offsets, max_len=T)
        return SequenceLayout()
    if kind == "flash":  # one nonzero and one read of the longest sequence per forward
        offsets = torch.nonzero(torch.cat([starts.flatten(), starts.new_ones(1)])).flatten().to(torch.int32)
        return SequenceLayout("flash", cu_seqlens=offsets, max_len=int((offsets[1:] - offsets[:-1]).max()))
    seq = starts.cumsum(dim=1)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return SequenceLayout(mask=_fold_mask(causal & (seq[:, :, None] == seq[:, None, :]), groups))  # of (B, T, T)


def cache_layout(position_ids: torch.Tensor, cache_rows: torch.Tensor, *, kind: str = "sdpa", groups: int = 1,
                 cache_len: int | None = None) -> SequenceLayout:
    """The layout of a cached forward: each row of position_ids (B, T) holds consecutive positions (the slots
    its tokens fill) and sees every slot up to its own. cache_len, the furthest position + 1 when the caller
    knows it on the host, spares sdpa a host sync: the sampler's prefills pass it, and its decode step needs
    none (on a GPU the Triton decode kernel reads the positions itself; the CPU's reference reads them back,
    which costs a CPU nothing). A call whose rows all start at slot 0 (a prompt's prefill) is plain causal
    attention over its own tokens, with no mask."""
    B, T = position_ids.shape
    if kind != "sdpa":
        return SequenceLayout(kind) if kind == "decode" else SequenceLayout(
            kind, cache_seqlens=(position_ids[:, 0] + T).to(torch.int32), cache_rows=cache_rows.to(torch.int32))
    slots = cache_len if cache_len is not None else int(position_ids.max()) + 1  # slots past it are never seen
    if slots == T:
        return SequenceLayout(slots=slots)
    visible = torch.arange(slots, device=position_ids.device) <= position_ids[:, :, None]  # (B, T, S)
    return SequenceLayout(slots=slots, mask=_fold_mask(visible, groups))


def _fold_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, T, S) -> (B, 1, G * T, S): the same rows for each of the G query heads folded into a KV head."""
    B, T, S = mask.shape
    return mask[:, None].expand(B, groups, T, S).reshape(B, 1, groups * T, S)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
              cache_rows: torch.Tensor | None = None, layout: SequenceLayout | None = None) -> torch.Tensor:
    """Causal attention for q (B, T, Hq, D); returns (B, T, Hq, D).

    Without cache_rows, k and v (B, T, Hkv, D) are the same tokens as q, and a position-0 token starts a
    new sequence (packing); `layout` (sequence_layout, default: worked out here) says where. With
    cache_rows (B,), k and v are whole caches (B_cache, S, Hkv, D): query i of item b reads row
    cache_rows[b] and sees its slots <= position_ids[b, i] (layout: cache_layout).

    Packed sequences given by length run one causal SDPA call each, on PyTorch's own kernels (flash or
    memory-efficient on GPUs, no flash-attn package): exact causal FLOPs (sum of L^2, not N^2 over the
    packed row), no (N, N) mask in memory, no host sync; a call per sequence is a few launches per layer
    for sequences of hundreds to thousands of tokens. FlexAttention's document mask would do the same in
    one launch but needs torch.compile to be fast, which the CPU tests and the eager trainer do not use.
    """
    if layout is None:
        kind, groups = attention_kind(q, q.shape[1], cache_rows is not None), q.shape[2] // k.shape[2]
        layout = sequence_layout(position_ids, kind=kind, groups=groups) if cache_rows is None else cache_layout(
            position_ids, cache_rows, kind=kind, groups=groups)
    if layout.kind == "decode":  # flash-decoding
        return decode_attention(q, k, v, position_ids, cache_rows, impl="triton")
    if layout.kind == "flash":
        return _flash_attention(q, k, v, cache_rows, layout)
    if cache_rows is not None:  # SDPA needs the rows side by side: (B, S, Hkv, D)
        k, v = k[cache_rows, :layout.slots], v[cache_rows, :layout.slots]
    if layout.seq_lens is not None:
        parts = (x.split(layout.seq_lens, dim=1) for x in (q, k, v))  # split: one op back in the backward
        return torch.cat([_sdpa(*qkv, None) for qkv in zip(*parts)], dim=1)
    return _sdpa(q, k, v, layout.mask)


def _sdpa(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA on (B, T, H, D) tensors; causal when mask is None. With a mask, the G query heads of each KV head
    are folded into its query rows, (B, Hkv, G * T, D), so query, key and value have one head count: PyTorch's
    memory-efficient kernel takes a mask but not grouped heads, its flash kernel grouped heads but no mask,
    so enable_gqa with a mask would run the math backend, (B, Hq, T, S) fp32 scores (bench/RESULTS.md)."""
    B, T, Hq, D = q.shape
    if mask is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)  # (B, Hq, T, D)
        return out.transpose(1, 2)
    Hkv = k.shape[2]
    folded = q.transpose(1, 2).reshape(B, Hkv, Hq // Hkv * T, D)
    out = F.scaled_dot_product_attention(folded, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.view(B, Hq, T, D).transpose(1, 2)


def _flash_attention(q, k, v, cache_rows, layout: SequenceLayout):
    B, T, Hq, D = q.shape
    if cache_rows is not None:  # the new keys are already in the cache; bottom-right causal alignment does the rest
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=layout.cache_seqlens, cache_batch_idx=layout.cache_rows,
                                       causal=True)
    out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), layout.cu_seqlens,
                                 layout.cu_seqlens, layout.max_len, layout.max_len, causal=True)  # (B * T, Hq, D)
    return out.view(B, T, Hq, D)


class Attention(nn.Module):
    """Under TP a rank holds whole query heads and the KV heads they read (q/k/v column-, o row-parallel).
    q, k and v are one merged projection (one GEMM); checkpoints keep q_proj, k_proj, v_proj apart."""

    def __init__(self, config: QwenConfig, par: ParallelContext = SINGLE):
        super().__init__()
        Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        parts = {"q_proj": Hq * D, "k_proj": Hkv * D, "v_proj": Hkv * D}
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, parts, bias=True, par=par)
        self.o_proj = RowParallelLinear(Hq * D, config.hidden_size, bias=False, par=par)
        self.head_dim, self.n_local_heads = D, self.qkv_proj.part_sizes[0] // D  # this rank's query heads

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, cache_rows: torch.Tensor | None = None,
                layout: SequenceLayout | None = None) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (B, T, (Hq + 2 Hkv) D) for this rank's heads
        if cache is not None:  # RoPE on q and k, k and v into their cache slots: one kernel
            q = rope_kv_append(qkv, cos, sin, *cache, cache_rows, position_ids, self.n_local_heads)  # (B, T, Hq, D)
            k, v = cache  # (B_cache, S, Hkv, D) each
        else:
            q, k, v = split_qkv(qkv, self.n_local_heads, self.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, T, Hq | Hkv, D)
        y = attention(q, k, v, position_ids, cache_rows, layout)  # (B, T, Hq, D)
        return self.o_proj(y.flatten(2))  # (B, T, Hq D) in


class MLP(nn.Module):
    """SwiGLU; gate and up are one merged projection (one GEMM); checkpoints keep gate_proj and up_proj."""

    def __init__(self, config: QwenConfig, par: ParallelContext = SINGLE):
        super().__init__()
        I = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate_proj": I, "up_proj": I}, bias=False,
                                                 par=par)
        self.down_proj = RowParallelLinear(I, config.hidden_size, bias=False, par=par)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """fused: silu(gate) * up in one kernel (kernels/silu_mul.py, no autograd), for the cached path."""
        gate_up = self.gate_up_proj(x)  # (..., 2 I_local) = [gate | up]
        if fused:
            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: QwenConfig, par: ParallelContext = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, par)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, par)

    def forward(self, x, cos, sin, position_ids, layout=None, cache=None, cache_rows=None) -> torch.Tensor:
        if cache is not None:  # this layer's (keys, values): the sampler's path
            return self.cached_forward(x, cos, sin, position_ids, cache, cache_rows, layout)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, position_ids, layout=layout)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached_forward(self, x, cos, sin, position_ids, cache, cache_rows, layout=None) -> torch.Tensor:
        """The sampler's path (no autograd): the residual add fused into the second norm and fused kernels,
        about 10 launches per layer in a decode step (bench/launches.py)."""
        h, _ = self.input_layernorm.fused(x)
        h, x = self.post_attention_layernorm.fused(x, self.self_attn(h, cos, sin, position_ids, cache, cache_rows,
                                                                     layout))
        return x + self.mlp(h, fused=True)


class Qwen2(nn.Module):
    """The causal LM (actor, reference) or, with value_head=True, the critic: same trunk, scalar head.
    A config whose architecture is PRM_ARCHITECTURE makes a process reward model: the same trunk with the
    `score` head (Linear(H, H), ReLU, Linear(H, 2): HF's score.0.* and score.2.*) and no LM head.

    With par.tp_size > 1 (nanoufo/parallel.py) every rank holds its slice of each weight and of the vocabulary:
    logits() returns the columns [vocab_start, vocab_start + V_local); the value and score heads are
    replicated (the final hidden states are whole on every rank)."""

    def __init__(self, config: QwenConfig, value_head: bool = False, par: ParallelContext = SINGLE):
        super().__init__()
        check_tp_split(config, par.tp_size)
        if value_head and config.is_prm:
            raise ValueError(f"a {PRM_ARCHITECTURE} checkpoint cannot be loaded as a critic (value_head=True)")
        self.config, self.par = config, par
        self.model = nn.ModuleDict(dict(  # named as in HF checkpoints: model.layers.0.self_attn.q_proj.weight, ...
            embed_tokens=VocabParallelEmbedding(config.vocab_size, config.hidden_size, par),
            layers=nn.ModuleList(Block(config, par) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = None if config.tie_word_embeddings or config.is_prm else ColumnParallelLinear(
            config.hidden_size, {"lm_head": config.vocab_size}, bias=False, par=par)  # the embedding's vocabulary split
        self.value_head = nn.Linear(config.hidden_size, 1) if value_head else None
        H = config.hidden_size
        self.score = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 2)) if config.is_prm else None
        self.checkpoint_activations = False  # recompute each block in the backward (trainer sets it from the config)

    @property
    def lm_head_weight(self) -> torch.Tensor:  # (V_local, H); V_local = V without TP
        if self.score is not None:
            raise ValueError("a process reward model has no LM head: it scores steps (step_probs), it cannot sample")
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def vocab_start(self) -> int:  # the first vocabulary id of this rank's logits columns
        return self.model.embed_tokens.vocab_start

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                cache_rows: torch.Tensor | None = None, seq_lens: list[int] | None = None,
                cache_len: int | None = None) -> torch.Tensor:
        """Final hidden states (B, T, H) for input_ids (B, T) at position_ids (B, T); position_ids None: each
        row is one sequence from position 0 (right-padded rows), known without reading the device.

        With a cache, batch item b uses cache row cache_rows[b] (default: row b), so a sampler can drop
        finished rows from the batch without moving the cache; each row's positions are consecutive (the slots
        its tokens fill), and cache_len (host int, optional), the furthest position + 1, spares the SDPA path
        a host sync. Without a cache, seq_lens (host ints) says that the single row (B = 1) packs sequences of
        these lengths end to end; otherwise the packing is read from the position ids, once per forward."""
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        B, T = input_ids.shape
        unpacked = position_ids is None
        if unpacked:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        if cache is not None and cache_rows is None:
            cache_rows = torch.arange(B, device=input_ids.device)
        kind = attention_kind(x, T, cached=cache is not None)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        layout = sequence_layout(position_ids, seq_lens, kind=kind, groups=groups, unpacked=unpacked) \
            if cache is None else cache_layout(position_ids, cache_rows, kind=kind, groups=groups, cache_len=cache_len)
        for i, layer in enumerate(self.model.layers):
            if cache is not None:  # through the module call, so hooks on a layer see the sampler's path too
                x = layer(x, cos, sin, position_ids, layout, cache=(cache.k[i], cache.v[i]), cache_rows=cache_rows)
            elif self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, position_ids, layout, use_reentrant=False)
            else:
                x = layer(x, cos, sin, position_ids, layout)
        return self.model.norm(x) if cache is None else self.model.norm.fused(x)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head_input(hidden) @ self.lm_head_weight.T  # (..., V_local)

    def lm_head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden as the vocab-parallel head must see it (Megatron's f), for fused head kernels too."""
        return copy_to_tp(hidden, self.par.tp_group)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden).squeeze(-1).float()  # (...,)

    def step_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """PRM: P(label 1), the probability that the step is correct, read from hidden states (..., H) taken
        at step separators; (...,) fp32. Only those positions reach the head, never the whole sequence."""
        return torch.softmax(self.score(hidden).float(), dim=-1)[..., 1]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init as in transformers (normal(0, initializer_range), zero biases, unit norms); a merged
        projection draws its parts one after the other, as the separate HF modules would."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                parts = getattr(module, "parts", [(None, 0, module.weight.shape[0], None)])
                for _, row, rows, _ in parts:
                    module.weight[row:row + rows].normal_(0.0, self.config.initializer_range, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        if self.value_head is not None:
            self.value_head.weight.zero_()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_shapes(config: QwenConfig, value_head: bool = False) -> dict[str, torch.Size]:
    """Every tensor name a checkpoint must hold for this config, with its shape (no memory allocated)."""
    with torch.device("meta"):
        model = Qwen2(config, value_head=value_head)
    params = dict(model.named_parameters())
    return {name: where.local(params).shape for name, where in hf_tensors(model).items()}
