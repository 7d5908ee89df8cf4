"""AdamW for training in bfloat16: fp32 master weights, fp32 moments and fp32 gradients behind bf16 compute
parameters.

    opt = adamw(model.parameters(), lr=1e-6, weight_decay=0.0)   # plain AdamW when the params are fp32
    loss.backward(); clip_grad_norm_(...); opt.step(); opt.zero_grad(set_to_none=True)
    grad_of(p)   # the gradient the optimizer steps p with (fp32 for a bf16 parameter), for clipping and DP

Why masters: a bf16 weight of 0.02 has a spacing of about 1.2e-4, so an Adam update of lr x ~1 = 1e-6 rounds
away: AdamW stepping bf16 parameters leaves all but the near-zero weights where they were. So the forward and
backward run on the bf16 parameters, while the optimizer owns an fp32 copy of each (the master) and fp32
moments, steps the masters and rounds them back into the parameters: small updates accumulate in the master
until they cross a bf16 spacing. fp32 parameters under autocast would instead make the sampler and the frozen
reference cast (or keep a bf16 copy of) every weight at every decode step; with the masters in the optimizer,
the sampler, the reference, the TP layers (a rank's masters are its own slices) and the HF checkpoints see
ordinary bf16 modules.

Why fp32 gradients (Megatron's main_grad): a minibatch's gradient is the sum of hundreds of micro-batches'.
Summed in the bf16 .grad, every addition rounds to 8 bits of mantissa: 1.2% off the exact sum after 160
micro-batches, 2.2% after 300 (tests/test_optim.py), and masters cannot undo that. So each bf16 parameter
carries a hook that, right after autograd has put a micro-batch's gradient in .grad, adds it into its
master's fp32 .grad and frees the bf16 one: every micro-batch's gradient is rounded to bf16 once (by the
backward that makes it) and the sum is fp32. The data-parallel all-reduce and the clipping read the fp32 sum
(grad_of). Memory: 4 bytes per trained parameter while gradients exist, where the bf16 .grad took 2
(nanoufo/plan.py counts it).

MasterWeightAdamW is a torch.optim.AdamW whose param_groups hold the masters, so lr schedulers, zero_grad and
state_dict work as for any torch optimizer; its state_dict adds the masters, so a resumed run continues from
the exact fp32 weights, not from their bf16 rounding.

Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_optim.py
"""
from typing import Iterable

import torch

MAIN_DTYPE = torch.float32  # masters, moments and gradients behind lower-precision parameters (nanoufo/plan.py)


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW on the parameters' device with its fast multi-tensor kernels (fused on CUDA, foreach on the CPU);
    with fp32 master weights, moments and gradients when the parameters are in a lower precision."""
    params = list(params)
    kernel = {"fused": True} if params[0].is_cuda else {"foreach": True}
    optimizer = torch.optim.AdamW if all(p.dtype == torch.float32 for p in params) else MasterWeightAdamW
    return optimizer(params, lr=lr, weight_decay=weight_decay, **kernel)


def grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer steps param with: its master's fp32 sum under MasterWeightAdamW, else .grad."""
    master = getattr(param, "master", None)
    return param.grad if master is None else master.grad


def _into_master(param: torch.nn.Parameter) -> None:
    """Post-accumulate hook of a bf16 parameter: its new gradient, added in fp32 to the master's, is freed."""
    master = param.master
    if master.grad is None:
        master.grad = param.grad.to(MAIN_DTYPE)
    else:
        master.grad.add_(param.grad)
    param.grad = None


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies (and fp32 gradients) of lower-precision compute parameters; see the
    module docstring."""

    def __init__(self, params: Iterable[torch.nn.Parameter], **adamw_options):
        self.compute_params = list(params)
        self.masters = [p.detach().to(MAIN_DTYPE, copy=True) for p in self.compute_params]
        super().__init__(self.masters, **adamw_options)
        for param, master in zip(self.compute_params, self.masters):
            if param.requires_grad and getattr(param, "master", None) is None:  # one hook, whichever optimizer
                param.register_post_accumulate_grad_hook(_into_master)
            param.master = master

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of the masters from their fp32 gradients; parameters without a gradient are left
        alone, as AdamW does. Then each stepped master is rounded into its parameter."""
        for param in self.compute_params:
            if param.grad is not None:  # assigned by hand, not accumulated by a backward
                _into_master(param)
        super().step()
        stepped = [(p, m) for p, m in zip(self.compute_params, self.masters) if m.grad is not None]
        if stepped:
            torch._foreach_copy_(*map(list, zip(*stepped)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param in self.compute_params:  # one assigned by hand
            param.grad = None

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
