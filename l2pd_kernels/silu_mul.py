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
def _silu_times(g, u):
    """silu(g) * u for g and u as loaded (the model dtype), rounded to that dtype twice as ``F.silu(g) * u``
    stores it; ``fp8.silu_mul_fp8`` computes the same bits."""
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(u.dtype)
    return (s.to(tl.float32) * u.to(tl.float32)).to(u.dtype)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, F, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < F
    g = tl.load(g_ptr + row * stride_g + offs, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row * F + offs, _silu_times(g, u), mask=ok)


def rows_of(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up [..., F] checked and flattened to rows with a contiguous last dimension (views where the
    rows are evenly strided, as column slices of one packed product are)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() == 0:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} != up {tuple(up.shape)} {up.dtype}")
    if gate.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {gate.dtype} is not supported (fp32, bf16, fp16)")
    F = gate.shape[-1]
    g2, u2 = gate.reshape(-1, F), up.reshape(-1, F)
    return (g2 if g2.stride(-1) == 1 else g2.contiguous()), (u2 if u2.stride(-1) == 1 else u2.contiguous())


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.silu_mul``."""
    g2, u2 = rows_of(gate, up)
    F = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        BLOCK = 1024
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(F, BLOCK))](g2, u2, out, F, g2.stride(0), u2.stride(0),
                                                              BLOCK=BLOCK, num_warps=4, **pdl(g2.device, "silu_mul"))
    return out
