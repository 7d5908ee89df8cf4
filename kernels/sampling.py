"""Next-token sampling from logits (N, V): temperature, top-p (nucleus) and Gumbel-max with a seed, returning
the token and its log-prob. One Triton program per row streams the vocabulary in blocks, so the
probabilities are never written out:
  1. lane-wise online max and sum of exp over z = logits / temperature -> lse;
  2. top-p < 1 only: a 16-way search (SEARCH_WAYS) for the logit threshold theta, the largest one whose
     tokens (z >= theta) hold at least top_p of the mass; that set is the nucleus of the sorted definition
     (tokens more than 80 nats below the best one, mass < V * e^-80, are never in it);
  3. argmax of z + Gumbel noise over the nucleus (ties: the lowest token id, as torch.argmax). The noise
     comes from uniforms Philox(seed, noise_id * V + token), so a row draws the same token wherever it
     sits in the batch and on every tensor-parallel rank.
The log-prob is z_token - lse under the temperature-scaled distribution, NOT the top-p-truncated one
(what the trainer's own forward computes). Temperature 0 is greedy: the argmax, with its log-prob under
the untempered (temperature 1) distribution.

    from nanoufo.kernels.sampling import sample
    tokens, logprobs = sample(logits, temperature=1.0, top_p=0.9, seed=step_seed, noise_ids=rows)  # (N,), (N,)

`sample_reference` draws its uniforms from torch generators (the same distribution, other draws); given
the kernel's own uniforms it replays a kernel draw exactly, as the test does.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py
"""
import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import pick_impl

SEARCH_WAYS = 16  # thresholds tested per pass over the row: each pass cuts the interval 17-fold for one read
SEARCH_ROUNDS = 8  # passes: the interval shrinks from 81 nats to 81 / 17^8 ~ 1e-8, below fp32 spacing
SEARCH_SPAN = 80.0  # the search starts 80 nats below the max: tokens further down hold < V e^-80 ~ 1e-30 of the mass
BLOCK_V = 1024  # vocab columns per loop step: 8 per thread at 4 warps; the search's (16, BLOCK_V) tile stays small

def top_p_keep(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean (N, V): the smallest set of most likely tokens whose probability reaches top_p."""
    probs = torch.softmax(z, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (N, V) mass of the more likely tokens
    return torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, mass_before < top_p)


def sample_reference(logits: torch.Tensor, temperature: float, top_p: float,
                     uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N,) int64, logprobs (N,) fp32) from logits (N, V) and uniforms (N, V) in [0, 1)."""
    z = logits.float() / (temperature if temperature > 0 else 1.0)  # (N, V)
    if temperature == 0:
        tokens = z.argmax(dim=-1)
    else:
        score = z - torch.log(-torch.log(uniforms))  # + Gumbel noise
        if top_p < 1:
            score = torch.where(top_p_keep(z, top_p), score, float("-inf"))
        tokens = score.argmax(dim=-1)
    return tokens, torch.log_softmax(z, dim=-1).gather(-1, tokens[:, None])[:, 0]


def torch_uniforms(seed: int, noise_ids: torch.Tensor, V: int, device) -> torch.Tensor:
    """(N, V) uniforms, row i from a torch generator seeded by (seed, noise_ids[i])."""
    rows = [torch.rand(V, device=device, generator=torch.Generator(device).manual_seed(hash((seed, i)) & (2**63 - 1)))
            for i in noise_ids.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, V, device=device)


@triton.jit
def _sample_kernel(logits_ptr, noise_ids_ptr, tokens_ptr, logprobs_ptr, V, stride_n, inv_temp, top_p, seed,
                   GREEDY: tl.constexpr, TOP_P: tl.constexpr, SEARCH_WAYS: tl.constexpr, SEARCH_ROUNDS: tl.constexpr,
                   SEARCH_SPAN: tl.constexpr, BLOCK_V: tl.constexpr):
    row_ptr = logits_ptr + tl.program_id(0).to(tl.int64) * stride_n
    lanes = tl.arange(0, BLOCK_V)
    # 1. per-lane running max and sum; a finite floor keeps exp(m - m_new) off -inf - -inf
    m_lane = tl.full([BLOCK_V], -1e30, tl.float32)
    s_lane = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + v0 + lanes, mask=v0 + lanes < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m_lane, z)
        s_lane = s_lane * tl.exp(m_lane - m_new) + tl.exp(z - m_new)
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    lse = m + tl.log(tl.sum(s_lane * tl.exp(m_lane - m), axis=0))

    # 2. nucleus threshold: mass(z >= lo) >= top_p > mass(z >= hi) holds throughout
    theta = float("-inf")
    if TOP_P:
        lo, hi = m - SEARCH_SPAN, m + 1.0
        frac = (tl.arange(0, SEARCH_WAYS) + 1).to(tl.float32) / (SEARCH_WAYS + 1.0)
        for _ in range(SEARCH_ROUNDS):
            thresholds = lo + (hi - lo) * frac  # (SEARCH_WAYS,) increasing
            mass = tl.zeros([SEARCH_WAYS], tl.float32)
            for v0 in range(0, V, BLOCK_V):
                z = tl.load(row_ptr + v0 + lanes, mask=v0 + lanes < V, other=float("-inf")).to(tl.float32) * inv_temp
                p = tl.exp(z - lse)
                mass += tl.sum(tl.where(z[None, :] >= thresholds[:, None], p[None, :], 0.0), axis=1)
            enough = mass >= top_p  # a prefix of the thresholds: mass falls as the threshold rises
            lo, hi = tl.max(tl.where(enough, thresholds, lo), axis=0), tl.min(tl.where(enough, hi, thresholds), axis=0)
        theta = lo

    # 3. per-lane best score, then the best lane (lowest token id among ties)
    noise_base = tl.load(noise_ids_ptr + tl.program_id(0)).to(tl.int64) * V
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_token = tl.zeros([BLOCK_V], tl.int32)
    best_z = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lanes
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        if GREEDY:
            score = z
        else:
            u = tl.rand(seed, noise_base + cols)
            score = tl.where(z >= theta, z - tl.log(-tl.log(u)), float("-inf"))
        better = score > best  # strict: an earlier block keeps its lane on ties
        best = tl.where(better, score, best)
        best_token = tl.where(better, cols, best_token)
        best_z = tl.where(better, z, best_z)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_token, V), axis=0)
    z_token = tl.sum(tl.where((best == top) & (best_token == token), best_z, 0.0), axis=0)
    tl.store(tokens_ptr + tl.program_id(0), token.to(tl.int64))
    tl.store(logprobs_ptr + tl.program_id(0), z_token - lse)


def sample_triton(logits: torch.Tensor, temperature: float, top_p: float, seed: int, noise_ids: torch.Tensor,
                  block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor]:
    N, V = logits.shape
    assert logits.stride(-1) == 1, "logits need a contiguous vocabulary dim"
    assert noise_ids.shape == (N,), f"noise_ids {tuple(noise_ids.shape)} != ({N},)"
    tokens = torch.empty(N, device=logits.device, dtype=torch.int64)
    logprobs = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return tokens, logprobs
    greedy = temperature == 0
    _sample_kernel[(N,)](
        logits, noise_ids.to(torch.int64), tokens, logprobs, V, logits.stride(0), 1.0 if greedy else 1.0 / temperature,
        top_p, seed & (2**63 - 1), GREEDY=greedy, TOP_P=not greedy and top_p < 1, SEARCH_WAYS=SEARCH_WAYS,
        SEARCH_ROUNDS=SEARCH_ROUNDS, SEARCH_SPAN=SEARCH_SPAN, BLOCK_V=min(block_v, triton.next_power_of_2(V)))
    return tokens, logprobs


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
           noise_ids: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits (N, V) -> (tokens (N,) int64, logprobs (N,) fp32).

    noise_ids (N,) name each row's noise stream (default 0..N-1): same seed and id, same draw."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if noise_ids is None:
        noise_ids = torch.arange(logits.shape[0], device=logits.device)
    if pick_impl(impl, logits) == "triton":
        return sample_triton(logits.contiguous(), temperature, top_p, seed, noise_ids)
    uniforms = None if temperature == 0 else torch_uniforms(seed, noise_ids, logits.shape[1], logits.device)
    return sample_reference(logits, temperature, top_p, uniforms)
