"""e4m3 rounding shared by the kernels that write e4m3 (row quantization, the norm's quantizing form, an e4m3
K/V cache's writes, the few-row product quantizing its rows as it loads them): one scale per row (its largest
magnitude at 448); each value times the row's reciprocal 448 / amax (one multiply per value, where a division
would cost the few-row product more than the launch it saves), then rounded to nearest, ties to even."""

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
def _row_inv(amax):
    """What a row's values are multiplied by before rounding: 448 / its largest magnitude (1 for all zeros)."""
    return tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax), 1.0)


@triton.jit
def _to_e4m3(x, inv, ROUND: tl.constexpr = 1):
    """x (fp32) * inv (``_row_inv``), clamped to +-448 and rounded to the nearest e4m3 value: ``quantize_rows``'
    bits. ``ROUND=0`` leaves the rounding to the GPU's conversion (round to nearest even, the same values; a
    negative value that rounds to zero may come out +0): fewer instructions where every value counts."""
    y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
    if ROUND:
        y = _round_e4m3(y)
    return y.to(tl.float8e4nv)


def check_amax(amax: torch.Tensor, rows: int, device: torch.device) -> None:
    """Raise unless ``amax`` can take the row maxima of ``rows`` rows on ``device``: contiguous fp32 [rows]."""
    if amax.dtype != torch.float32 or amax.shape != (rows,) or not amax.is_contiguous() or amax.device != device:
        raise ValueError(f"amax must be a contiguous fp32 [{rows}] tensor on {device} (one value a row); got "
                         f"{amax.dtype} {tuple(amax.shape)} on {amax.device}")
