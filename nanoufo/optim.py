"""AdamW for training in bfloat16: fp32 master weights and fp32 moments behind bf16 compute parameters.

    opt = adamw(model.parameters(), lr=1e-6, weight_decay=0.0)   # plain AdamW when the params are fp32
    loss.backward(); clip_grad_norm_(...); opt.step(); opt.zero_grad(set_to_none=True)

Why: a bf16 weight of 0.02 has a spacing of about 1.2e-4, so an Adam update of lr x ~1 = 1e-6 rounds away:
AdamW stepping bf16 parameters leaves all but the near-zero weights where they were. So the forward and
backward run on the bf16 parameters, while the optimizer owns an fp32 copy of each (the master) and fp32
moments, steps the masters with the gradients read as fp32, and rounds them back into the parameters: small
updates accumulate in the master until they cross a bf16 spacing. fp32 parameters under autocast would instead
make the sampler and the frozen reference cast (or keep a bf16 copy of) every weight at every decode step; with
the masters in the optimizer, the sampler, the reference, the TP layers (a rank's masters are its own slices)
and the HF checkpoints see ordinary bf16 modules.

MasterWeightAdamW is a torch.optim.AdamW whose param_groups hold the masters, so lr schedulers, zero_grad and
state_dict work as for any torch optimizer; its state_dict adds the masters, so a resumed run continues from
the exact fp32 weights, not from their bf16 rounding. Gradients stay in the compute dtype on the model
(clipping and the non-finite check read them there); the step casts them to fp32 one bucket of parameters at
a time, so the transient fp32 copy is a bucket, not a whole model.

Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_optim.py
"""
from typing import Iterable

import torch

BUCKET_NUMEL = 1 << 26  # fp32 gradient elements cast per inner step: 256 MiB (a larger parameter goes alone)


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW on the parameters' device with its fast multi-tensor kernels (fused on CUDA, foreach on the CPU);
    with fp32 master weights and moments when the parameters are in a lower precision."""
    params = list(params)
    kernel = {"fused": True} if params[0].is_cuda else {"foreach": True}
    optimizer = torch.optim.AdamW if all(p.dtype == torch.float32 for p in params) else MasterWeightAdamW
    return optimizer(params, lr=lr, weight_decay=weight_decay, **kernel)


def consecutive_runs(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive runs of indices whose sizes add up to at most limit (an item larger than limit goes alone):
    the optimizer's gradient buckets, and the shards of a saved checkpoint (nanoufo/weights.py)."""
    runs, total = [[]], 0
    for i, size in enumerate(sizes):
        if runs[-1] and total + size > limit:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += size
    return runs


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of lower-precision (bf16) compute parameters; see the module docstring."""

    def __init__(self, params: Iterable[torch.nn.Parameter], bucket_numel: int = BUCKET_NUMEL, **adamw_options):
        self.compute_params = list(params)
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.compute_params]
        super().__init__(self.masters, **adamw_options)
        self.bucket_indices = consecutive_runs([m.numel() for m in self.masters], bucket_numel)

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of the masters from the compute parameters' gradients; parameters without a
        gradient are left alone, as AdamW does. Then each stepped master is rounded into its parameter."""
        for bucket in self.bucket_indices:
            stepped = [i for i in bucket if self.compute_params[i].grad is not None]
            for i in stepped:
                self.masters[i].grad = self.compute_params[i].grad.float()
            super().step()  # masters without a .grad (the other buckets) are skipped; elementwise, so equal to one step
            for i in stepped:
                self.compute_params[i].copy_(self.masters[i])
                self.masters[i].grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.compute_params:
            if p.grad is not None and set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return super().state_dict() | {"masters": list(self.masters)}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Moments, step counts and hyperparameters as AdamW loads them, and the saved fp32 masters, which are
        then rounded into the compute parameters."""
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        if masters is None or [m.shape for m in masters] != [m.shape for m in self.masters]:
            raise ValueError("optimizer state: no fp32 master weights matching this model's parameters (saved by "
                             "an fp32 run, another model, or before master weights existed)")
        super().load_state_dict(state_dict)
        for master, saved, param in zip(self.masters, masters, self.compute_params):
            master.copy_(saved)
            param.copy_(master)
