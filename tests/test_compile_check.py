"""The compile check (bench/compile_check.py): every Triton kernel of kernels/ compiles for sm_90 and sm_80 with
Triton's own compiler and bundled ptxas, at the geometry its launcher picks at Qwen2.5-1.5B/3B/7B shapes, with
no register spills and shared memory within each target's limit; and the check itself flags a kernel that
spills and one over the shared-memory limit. No GPU needed; it runs in a subprocess without TRITON_INTERPRET
(the interpreter would replace the compiler), about 2 minutes on 2 cores with an empty Triton cache.

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_compile_check.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BUNDLED / "cuobjdump").exists(), reason="this triton bundles no cuobjdump")

# A kernel that must spill (256 live fp32 values per thread) and a normal one checked against a 1 KiB shared-memory
# limit: compile_row, the function that judges every real kernel, has to reject both.
SELF_TEST = '''
import sys
sys.path[:0] = [{root!r}, {bench!r}]
import torch, triton, triton.language as tl
import compile_check as cc

@triton.jit
def _spill_kernel(x_ptr, out_ptr, n):
    offs = tl.arange(0, 16)[:, None] * 512 + tl.arange(0, 512)[None, :]
    acc = tl.zeros([16, 512], tl.float32)  # carried through the loop: 256 live values per thread at one warp
    for i in range(n):
        acc = acc * acc + tl.load(x_ptr + i * 8192 + offs)
    tl.store(out_ptr + offs, acc)

launches = []
with cc.recording("self-test", launches):
    _spill_kernel[(1,)](cc.meta(3, 16, 512), cc.meta(16, 512), 3, num_warps=1)
source, options = cc.specialise(launches[0], 90)
print(cc.compile_row(("_spill_kernel", "sm_90", source, options, "self-test")))
cc.TARGETS["sm_90"] = (90, 1024)
from nanoufo.kernels.decode_attention import decode_attention_triton
cache = cc.meta(4, 256, 2, 128, dtype=torch.bfloat16)
launches = []
with cc.recording("self-test", launches):
    decode_attention_triton(cc.meta(2, 1, 8, 128, dtype=torch.bfloat16), cache, cache,
                            cc.meta(2, 1, dtype=torch.long), cc.meta(2, dtype=torch.long))
source, options = cc.specialise(launches[0], 90)
print(cc.compile_row(("decode", "sm_90", source, options, "self-test")))
'''


def compiler_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT)}


def test_every_kernel_compiles_for_sm90_and_sm80_without_spills():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py")], env=compiler_env(),
                         capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    failed = [row for row in rows if not row["ok"]]
    assert out.returncode == 0 and not failed, failed or out.stderr[-3000:]
    assert {row["target"] for row in rows} == {"sm_90", "sm_80"}
    assert all(row["spill_bytes"] == 0 for row in rows)


def test_the_check_flags_spills_and_shared_memory_over_the_limit(tmp_path):
    script = tmp_path / "self_test.py"
    script.write_text(SELF_TEST.format(root=str(ROOT), bench=str(ROOT / "bench")))
    out = subprocess.run([sys.executable, str(script)], env=compiler_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    spill, shared = (eval(line) for line in out.stdout.splitlines()[-2:])  # noqa: S307 - our own dict reprs
    assert not spill["ok"] and spill["spill_bytes"] > 0 and "local memory" in spill["error"], spill
    assert not shared["ok"] and shared["shared_bytes"] > 1024 and "> 1024" in shared["error"], shared
