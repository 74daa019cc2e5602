"""silu_mul: the gated MLP's ``silu(gate) * up`` in one pass (two rounded results in the unfused code).

``silu(gate)`` is rounded to the model dtype before the product, as the unfused ``F.silu(g) * u`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.silu_mul``."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} != up {tuple(up.shape)} {up.dtype}")
    if gate.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {gate.dtype} is not supported (fp32, bf16, fp16)")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        BLOCK = 1024
        _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out
