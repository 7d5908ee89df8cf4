"""Where the kernel tests (tests/test_kernels_*.py) run: on the CPU by default, the Triton kernels under
TRITON_INTERPRET=1 as CI runs them; with NANOUFO_TEST_DEVICE=cuda the same tests run the compiled kernels on
the GPU (bench/gpu_session.sh), including the bf16 decode attention, which the interpreter cannot check (its
bf16 tl.dot multiplies bit patterns: triton-lang/triton#11584).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels_*.py               # CPU, as CI
    NANOUFO_TEST_DEVICE=cuda python -m pytest -q tests/test_kernels_*.py         # GPU machine
"""
import os

import pytest
import torch

from nanoufo.kernels.dispatch import interpreting

DEVICE = os.environ.get("NANOUFO_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda") or (DEVICE == "cuda" and not torch.cuda.is_available()):
    raise RuntimeError(f"NANOUFO_TEST_DEVICE={DEVICE!r}: use 'cpu', or 'cuda' where torch.cuda.is_available()")
ON_GPU = DEVICE == "cuda"
needs_triton = pytest.mark.skipif(not (ON_GPU or interpreting()),
                                  reason="Triton needs NANOUFO_TEST_DEVICE=cuda (a GPU) or TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="GPU only (NANOUFO_TEST_DEVICE=cuda): the interpreter's bf16 "
                                                 "tl.dot is wrong (triton-lang/triton#11584)")
