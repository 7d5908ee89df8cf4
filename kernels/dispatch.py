"""What every kernel file shares: the one rule that picks a kernel's implementation (the Triton kernel for
CUDA tensors or when TRITON_INTERPRET=1, where the interpreter runs it on the CPU, which is how the tests
check it; else the plain PyTorch reference, so the CPU demo stays fast), the accumulation dtype and the
debug switch. Every public kernel function takes impl="auto"|"triton"|"torch"; tests name "triton" and
"torch" explicitly so a comparison can never pit the reference against itself.
Test: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_*.py
"""
import os

import torch
import triton.language as tl

IMPLS = ("auto", "triton", "torch")
TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}  # the kernels' ACC constexpr per torch dtype


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_impl(impl: str, tensor: torch.Tensor) -> str:
    """Resolve impl for a kernel whose main input is `tensor`: "triton" or "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    can_triton = tensor.is_cuda or interpreting()
    if impl == "triton" and not can_triton:
        raise ValueError("impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (set before importing triton)")
    return ("triton" if can_triton else "torch") if impl == "auto" else impl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math dtype: float32 for 16/32-bit inputs; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def debug_mode(debug: bool | None) -> bool:
    """debug=None follows NANOUFO_KERNEL_DEBUG=1: device-side checks that name the first bad row."""
    return os.environ.get("NANOUFO_KERNEL_DEBUG") == "1" if debug is None else debug
