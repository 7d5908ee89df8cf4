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

`sample_reference` is the kernel's definition in PyTorch: given the kernel's own uniforms it replays a kernel
draw exactly, as the test does. Without a GPU, `sample` draws from the same distribution another way
(`sample_inverse_cdf`): one uniform per row from a torch generator seeded by (seed, noise_id), and the token
where the row's cumulative probability passes it. Gumbel-max on the CPU would draw V uniforms and take two
logarithms of each per sampled token: at V = 151,936 that was most of the CPU generation's time
(bench/RESULTS.md, Peers).
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
INVERSE_CDF_BLOCK = 1024  # columns per block of the CPU path's two-level running sum (~sqrt(V) at V = 151,936)

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


def row_uniforms(seed: int, noise_ids: torch.Tensor, device) -> torch.Tensor:
    """(N,) uniforms in [0, 1), row i's from a torch generator seeded by (seed, noise_ids[i])."""
    draws = [torch.rand(1, generator=torch.Generator().manual_seed(hash((seed, i)) & (2**63 - 1)))
             for i in noise_ids.tolist()]
    return torch.cat(draws).to(device) if draws else torch.empty(0, device=device)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor, block: int = INVERSE_CDF_BLOCK) -> torch.Tensor:
    """(N,) int64: per row of weights (N, V) >= 0 (not all 0), the first column whose running sum exceeds
    uniforms (N,) x the row's total, so column j comes up with probability weights[j] / total; a zero weight
    never. The running sum is taken in two levels, over blocks of columns then within the one block that
    holds the target, so no (N, V) prefix sum is written (block sums in fp32, running sums in fp64)."""
    N, V = weights.shape
    full, n_blocks = V - V % block, -(-V // block)  # columns in whole blocks; blocks, the last one maybe partial
    block_sums = torch.cat([weights[:, :full].reshape(N, full // block, block).sum(-1),  # (N, n_blocks)
                            weights[:, full:].sum(-1, keepdim=True)], dim=1)[:, :n_blocks].double()  # no empty tail
    ends = block_sums.cumsum(-1)  # (N, n_blocks): the mass up to each block's end
    target = uniforms.double() * ends[:, -1]  # (N,) below the total for a uniform below 1
    chosen = torch.searchsorted(ends, target[:, None], right=True).clamp(max=ends.shape[1] - 1)  # (N, 1)
    before = ends.gather(1, chosen) - block_sums.gather(1, chosen)  # (N, 1) the mass before the chosen block
    cols = chosen * block + torch.arange(block, device=weights.device)  # (N, block)
    inside = weights.gather(1, cols.clamp(max=V - 1)).double() * (cols < V)  # (N, block), 0 past the row's end
    at = torch.searchsorted(inside.cumsum(-1) + before, target[:, None], right=True)  # (N, 1)
    # the two levels' sums round differently: a target in that sliver past the block's cumsum takes its last
    # column with weight (the block holds some: its sum exceeds the target's offset)
    last = block - 1 - (inside.flip(-1) > 0).to(torch.int8).argmax(-1, keepdim=True)  # (N, 1)
    return (chosen * block + torch.minimum(at, last))[:, 0]


def sample_inverse_cdf(logits: torch.Tensor, temperature: float, top_p: float,
                       uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N,) int64, logprobs (N,) fp32) from logits (N, V) and one uniform per row (N,): the same
    distribution as sample_reference, by the inverse of the cumulative distribution. Greedy at temperature 0."""
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    logits = logits.float()
    top = logits.amax(dim=-1, keepdim=True)  # (N, 1)
    weights = (logits - top).mul_(inv_temp).exp_()  # (N, V): the tempered probabilities x the row's sum, in place
    lse = top[:, 0] * inv_temp + weights.sum(-1).log()  # (N,)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        if top_p < 1:
            weights.mul_(top_p_keep(logits * inv_temp, top_p))
        tokens = inverse_cdf(weights, uniforms)
    return tokens, logits.gather(-1, tokens[:, None])[:, 0] * inv_temp - lse


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
    return sample_inverse_cdf(logits, temperature, top_p, row_uniforms(seed, noise_ids, logits.device))
