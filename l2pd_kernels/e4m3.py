"""e4m3 rounding shared by the kernels that write e4m3 (row quantization, the norm's quantizing form, an e4m3
K/V cache's writes): one scale per row (its largest magnitude at 448), then round to nearest, ties to even."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@triton.jit
def _round_e4m3(y):
    """y (fp32, |y| <= 448) rounded to the nearest e4m3 value, ties to even, as fp32: the conversion that
    follows is then exact whatever its own rounding (Triton's CPU interpreter carries no mantissa overflow)."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF).to(tl.float32, bitcast=True)  # 3 mantissa bits
    sub = (y + 24576.0) - 24576.0  # below 2^-6: multiples of 2^-9 (24576 = 1.5 * 2^14 has an ulp of 2^-9)
    return tl.where(tl.abs(y) < 0.015625, sub, normal)


@triton.jit
def _row_scale(amax):
    """A row's e4m3 scale: its largest magnitude maps to 448; an all-zero row gets 1."""
    return tl.where(amax > 0, amax / 448.0, 1.0)


@triton.jit
def _to_e4m3(x, scale):
    """x (fp32) / scale, clamped to +-448 and rounded to the nearest e4m3 value: ``quantize_rows``' bits."""
    return _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)).to(tl.float8e4nv)
