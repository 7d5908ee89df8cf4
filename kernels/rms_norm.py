"""RMSNorm with the residual add fused in, for the decode path: one Triton program per token reads the
hidden state x and the branch output to add, writes the new residual stream and its normalised copy.

    from nanoufo.kernels.rms_norm import add_rms_norm
    normed, residual = add_rms_norm(x, weight, eps, add=branch)  # residual = x + branch; normed = RMSNorm(it)
    normed, _ = add_rms_norm(x, weight, eps)                      # a plain RMSNorm (residual is x)

Rounding follows nanoufo.model.RMSNorm exactly: the sum is rounded to x's dtype, the variance is taken in
fp32, the normalised value is rounded to x's dtype before the weight multiplies it. No backward: training
forwards use the autograd path in nanoufo/model.py.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py
"""
import torch
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import pick_impl


def add_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, add (..., H); weight (H,) -> (normed, residual), both (..., H) in x's dtype."""
    residual = x if add is None else x + add
    r32 = residual.float()
    normed = (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, residual


@triton.jit
def _add_rms_norm_kernel(x_ptr, add_ptr, w_ptr, normed_ptr, residual_ptr, H, eps,
                         HAS_ADD: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * H
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
    if HAS_ADD:
        x = (x.to(tl.float32) + tl.load(add_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + row + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row + cols, (w * normed).to(normed_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    H = x.shape[-1]
    assert x.is_contiguous() and (add is None or (add.shape == x.shape and add.is_contiguous()))
    assert weight.shape == (H,) and weight.dtype == x.dtype, "weight (H,) in x's dtype, as the model holds it"
    normed = torch.empty_like(x)
    residual = x if add is None else torch.empty_like(x)
    if x.numel():
        _add_rms_norm_kernel[(x.numel() // H,)](x, x if add is None else add, weight, normed, residual, H, eps,
                                                HAS_ADD=add is not None, BLOCK_H=triton.next_power_of_2(H))
    return normed, residual


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None,
                 impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + add), x + add); see the module docstring."""
    if pick_impl(impl, x) == "triton":
        return add_rms_norm_triton(x.contiguous(), weight, eps, None if add is None else add.contiguous())
    return add_rms_norm_reference(x, weight, eps, add)
