"""Triton kernels, each next to its launcher and a plain PyTorch reference; kernels/dispatch.py picks
which runs (Triton on CUDA or under TRITON_INTERPRET=1, the reference otherwise).
Tests: TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_*.py
"""
from kernels.linear_ppo_loss import linear_ppo_loss
from kernels.linear_token_stats import linear_partial_stats, linear_token_stats
from kernels.ppo_loss import ppo_loss
from kernels.token_stats import PartialStats, combine_partial_stats, logits_partial_stats, token_stats
