"""``l2pd_kernels.prefetch``: the kernel compiles for Hopper and the A100, and (on a GPU) checks its input,
rounds to whole chunks and writes nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_prefetch_kernel_compiles_for_hopper_and_the_a100():
    """The interpreter cannot run inline PTX, so the kernel is compiled ahead of time (Triton's ptxas), as the
    other kernels are in test_kernels_compile.py: bulk 16 KB prefetches for sm_90, line prefetches for sm_80."""
    types = {"addr": "i64", "nbytes": "i64"}
    cases = [{"module": "l2pd_kernels.prefetch", "kernel": "_prefetch_kernel", "types": types,
              "constexprs": {"CHUNK": chunk, "BLOCK": 128, "BULK": chunk > 128}, "options": {"num_warps": 4},
              "targets": targets} for chunk, targets in ((16384, [90]), (128, [90, 80]))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "test_kernels_compile.py")],
                         input=json.dumps(cases), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["ok", "ok"]


@cuda
def test_prefetch_l2_checks_its_input_and_rounds_to_chunks():
    from l2pd_kernels.prefetch import chunk_bytes, prefetch_l2

    t = torch.zeros(1 << 16, dtype=torch.bfloat16, device="cuda")
    c = chunk_bytes(t.device)
    assert prefetch_l2(t) == (t.numel() * 2) // c * c
    assert prefetch_l2(t, c + 5) == c and prefetch_l2(t, c - 1) == 0
    with pytest.raises(ValueError, match="CUDA"):
        prefetch_l2(t.cpu())
    with pytest.raises(ValueError, match="contiguous"):
        prefetch_l2(t.view(256, 256).t())
    with pytest.raises(ValueError, match="outside"):
        prefetch_l2(t, t.numel() * 2 + 1)
    torch.cuda.synchronize()
    assert (t == 0).all()  # a hint: nothing written
