"""The equal-work check of bench/peers.py: TRL's GRPO loss and nanoufo's on one fixed batch, from the same
weights, must agree (loss and every gradient) before their timings are compared.

    python bench/peers.py --preset tiny      # runs check_loss in its own process first

The batch: the workload's first CHECK_PROMPTS prompts, each repeated for its group, with seeded random
completions of random lengths (so padding and masking are exercised), seeded random advantages, and old
log-probs that are the current ones plus uniform noise in [-NOISE, NOISE], so the ratios leave the clip range
and both clipped branches are taken. Both models are loaded in fp32, whatever the workload's dtype: the check
is of the loss, not of rounding. TRL sees the prompts left-padded and the completions right-padded, as its
trainer lays them out; nanoufo sees each row as prompt + completion, right-padded, as its sampler does.
"""
from tempfile import TemporaryDirectory

import torch

from peers_nanoufo import load_actor, nanoufo_loss, nanoufo_prompt_ids
from peers_trl import make_trainer
from peers_work import Workload

NOISE = 0.5  # about half the ratios leave [1 - 0.2, 1 + 0.28]
CHECK_TOKENS = 16  # the longest completion
CHECK_PROMPTS = 2  # the batch's prompts: enough for two groups, small enough to cost seconds at every preset
TOLERANCE = 1e-4  # relative, fp32: the two sum in different orders (chunks, packing), nothing more


def fixed_batch(prompt_ids: list[list[int]], work: Workload, pad_id: int, vocab: int) -> dict:
    """Prompts (left-padded) and completions (right-padded) with their masks, and advantages (B,)."""
    g = torch.Generator().manual_seed(work.seed)
    rows = [ids for ids in prompt_ids for _ in range(work.samples)]
    C = CHECK_TOKENS
    lengths = torch.randint(max(1, C // 2), C + 1, (len(rows),), generator=g)
    width = max(map(len, rows))
    prompt = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])  # (B, P)
    prompt_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, P)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()  # (B, C)
    completion = torch.randint(0, vocab, (len(rows), C), generator=g).masked_fill(completion_mask == 0, pad_id)
    return dict(prompt_ids=prompt, prompt_mask=prompt_mask, completion_ids=completion, completion_mask=completion_mask,
                advantages=torch.randn(len(rows), generator=g), noise=torch.rand(len(rows), C, generator=g))


def nanoufo_layout(batch: dict, old: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same rows as prompt + completion right-padded (B, T): tokens, mask on the completion, old log-probs."""
    rows, masks, olds = [], [], []
    for p, pm, c, cm, o in zip(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                               batch["completion_mask"], old):
        n = int(cm.sum())
        prompt = p[pm.bool()]
        rows.append(torch.cat([prompt, c[:n]]))
        masks.append(torch.cat([torch.zeros(len(prompt)), torch.ones(n)]))
        olds.append(torch.cat([torch.zeros(len(prompt)), o[:n]]))
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    return pad(rows), pad(masks), pad(olds)  # (B, T) each


def trl_loss(trainer, batch: dict) -> tuple[float, dict[str, torch.Tensor], torch.Tensor, float]:
    """TRL's loss and gradients on the batch; also the old log-probs it was given (B, C) and the clipped share."""
    model = trainer.model.train()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1).to(model.device)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1).to(model.device)
    mask = batch["completion_mask"].to(model.device)
    C = mask.shape[1]
    with torch.no_grad():
        current = trainer._get_per_token_logps_and_entropies(model, ids, attention, C)[0]  # (B, C)
    old = current + (2 * batch["noise"].to(current.device) - 1) * NOISE * mask
    ratio = (current - old).exp()
    args = trainer.args
    clipped = ((ratio < 1 - args.epsilon) | (ratio > 1 + args.epsilon_high)).float()
    inputs = {k: v.to(model.device) for k, v in batch.items() if k != "noise"} | dict(
        old_per_token_logps=old, num_items_in_batch=mask.sum())
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which this call bypasses
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return float(loss.detach()), grads, old.cpu(), float((clipped * mask).sum() / mask.sum())


def relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """|ours - theirs| / |theirs| over all gradients together (Frobenius); a missing name is an error."""
    missing = [n for n in ours if n not in theirs]
    if missing:
        raise KeyError(f"gradients named by nanoufo but not by TRL's model: {missing}")
    diff = sum(float((ours[n].float().cpu() - theirs[n].float().cpu()).pow(2).sum()) for n in ours)
    norm = sum(float(theirs[n].float().cpu().pow(2).sum()) for n in ours)
    return (diff / norm) ** 0.5


def check_loss(work: Workload) -> dict:
    """Both losses and gradients on the fixed batch, and whether they agree within TOLERANCE."""
    work.dtype = "float32"
    contents = [p["content"] for p in work.step_prompts(0)[:CHECK_PROMPTS]]
    with TemporaryDirectory() as tmp:
        trainer = make_trainer(work, tmp)
        trl_prompts = trainer._tokenize_prompts([[{"role": "user", "content": c}] for c in contents])[0]
        if trl_prompts != nanoufo_prompt_ids(work, contents):
            raise RuntimeError("TRL and nanoufo render different prompt tokens for the same user turns")
        tokenizer = trainer.processing_class
        batch = fixed_batch(trl_prompts, work, tokenizer.pad_token_id, len(tokenizer))
        trl_value, trl_grads, old, clipped = trl_loss(trainer, batch)
    tokens, mask, old_logp = nanoufo_layout(batch, old)
    actor = load_actor(work)
    ours, our_grads = nanoufo_loss(work, actor, tokens.to(work.device), mask.to(work.device),
                                   old_logp.to(work.device), batch["advantages"].to(work.device))
    loss_rel = abs(ours - trl_value) / max(abs(trl_value), 1e-12)
    grad_rel = relative_difference(our_grads, trl_grads)
    return dict(trl_loss=trl_value, nanoufo_loss=ours, loss_rel_diff=loss_rel, grad_rel_diff=grad_rel,
                clipped_share=clipped, rows=len(tokens), completion_tokens=int(mask.sum()), tolerance=TOLERANCE,
                equal=loss_rel <= TOLERANCE and grad_rel <= TOLERANCE)
