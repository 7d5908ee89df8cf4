"""The one rule that picks a kernel's implementation: the Triton kernel for CUDA tensors or when
TRITON_INTERPRET=1 (the interpreter runs it on the CPU, which is how the tests check it), else the
plain PyTorch reference, so the CPU demo stays fast. Every launcher takes impl="auto"|"triton"|"torch";
tests name "triton" and "torch" explicitly so a comparison can never pit the reference against itself.
"""
import os

import torch

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_impl(impl: str, tensor: torch.Tensor) -> str:
    """Resolve impl for a kernel whose main input is `tensor`: "triton" or "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if tensor.is_cuda or interpreting() else "torch"
    if impl == "triton" and not (tensor.is_cuda or interpreting()):
        raise ValueError("impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 (set before importing triton)")
    return impl
