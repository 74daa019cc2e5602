"""silu_mul: the gated MLP's ``silu(gate) * up`` in one pass (two rounded results in the unfused code).

``silu(gate)`` is rounded to the model dtype before the product, as the unfused ``F.silu(g) * u`` does.
``gate`` and ``up`` may be column slices of one packed projection output (any row stride).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import pdl, pdl_wait


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, F, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F
    g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * F + offs, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.silu_mul``."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() == 0:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} != up {tuple(up.shape)} {up.dtype}")
    if gate.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {gate.dtype} is not supported (fp32, bf16, fp16)")
    F = gate.shape[-1]
    g2, u2 = gate.reshape(-1, F), up.reshape(-1, F)  # views where the rows are evenly strided
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        BLOCK = 1024
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(F, BLOCK))](g2, u2, out, F, g2.stride(0), u2.stride(0),
                                                              BLOCK=BLOCK, num_warps=4, **pdl(g2.device, "silu_mul"))
    return out
