"""Device functions that scale and round fp32 values to e4m3: the bits every kernel that quantizes
activations writes (``quantize_rows``, ``rms_norm_fp8``, the few-row products' e4m3 outputs), the same as
``l2pd_kernels.reference.quantize_rows_fp8`` and ``quantize_groups_fp8``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the dtype a kernel rounds a value to before it writes it as e4m3 (their QOUT / QUANT): what the unfused op
# would have written
ROUND_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


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


@triton.jit
def _round_to(x, out_ptr, CODE: tl.constexpr):
    """x (fp32) rounded to the dtype CODE names (``ROUND_CODES``: 1 bf16, 2 fp16, 3 fp32; 0: out_ptr's own),
    back in fp32."""
    if CODE == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif CODE == 2:
        x = x.to(tl.float16).to(tl.float32)
    elif CODE == 0:
        x = x.to(out_ptr.dtype.element_ty).to(tl.float32)
    return x
