"""Triton kernels, each next to a plain PyTorch reference; kernels/dispatch.py picks which runs (Triton on
CUDA or under TRITON_INTERPRET=1, the reference otherwise). Every kernel file reads in one order, with one
naming scheme: a docstring (what it computes, the maths, its test), named constants with their reason,
`<name>_reference` (plain PyTorch), the `@triton.jit` kernels `_<name>_kernel` (and `_<name>_<part>_kernel`),
the launcher `<name>_triton` (asserts what the kernel assumes: shapes, strides, dtypes), then the public
`<name>(...)`, which checks its input and dispatches. A backward follows the same scheme as `<name>_grad`.
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_*.py
"""
from kernels.linear_ppo_loss import linear_ppo_loss
from kernels.linear_token_stats import linear_token_stats
from kernels.ppo_loss import ppo_loss
from kernels.token_stats import token_stats
