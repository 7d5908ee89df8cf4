"""SwiGLU's activation in one pass: silu(gate) * up from the merged gate/up projection's output, for the
decode path. One Triton program per (token, block of features).

    from nanoufo.kernels.silu_mul import silu_mul
    act = silu_mul(gate_up)  # gate_up (..., 2 * I) = [gate | up] -> (..., I)

Rounding follows F.silu(gate) * up in the input dtype: silu in fp32 rounded to the dtype, then the product.
No backward: training forwards use the autograd path in nanoufo/model.py.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_decode.py
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanoufo.kernels.dispatch import pick_impl

BLOCK = 1024  # features per program: 8 per thread at 4 warps; a wider row takes several programs (a 2D grid)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    assert gate_up.is_contiguous() and gate_up.shape[-1] % 2 == 0
    I = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], I)
    if out.numel():
        block = min(block, triton.next_power_of_2(I))
        _silu_mul_kernel[(out.numel() // I, triton.cdiv(I, block))](gate_up, out, I, BLOCK=block)
    return out


def silu_mul(gate_up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2 * I) = [gate | up] -> (..., I)."""
    if pick_impl(impl, gate_up) == "triton":
        return silu_mul_triton(gate_up.contiguous())
    return silu_mul_reference(gate_up)
