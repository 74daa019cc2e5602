"""FP8 linear layers: e4m3 weights with one fp32 scale per output channel (``l2pd.quantize``).

Two forms, each with its reference in ``l2pd_kernels.reference``:

- ``linear_fp8`` (weights only): up to ``MAX_ROWS`` rows the skinny kernel reads the FP8 bytes and widens
  them to the activations' dtype in registers; more rows dequantize the weight and call cuBLAS.
- ``linear_w8a8`` (weights and activations): each row of x is scaled to e4m3 (``quantize_rows``: one scale
  per token, its largest magnitude at 448) and the product runs on FP8 tensor cores, nothing widened: the
  skinny kernel up to ``MAX_ROWS`` rows, cuBLAS FP8 (``torch._scaled_mm`` with row-wise scales) above.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .device import pdl, pdl_wait
from .e4m3 import FP8, _row_scale, _to_e4m3
from .skinny import _INTERPRET, MAX_ROWS, _launch, check_bias


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * stride_q
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        x = tl.load(x_row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = _row_scale(tl.max(amax, 0))
    tl.store(s_ptr + row, scale)
    for k in range(0, K, BLOCK):
        x = tl.load(x_row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
        tl.store(q_row + k + cols, _to_e4m3(x, scale), mask=k + cols < K)


_FP8_DEVICES: set = set()  # CUDA devices found to have e4m3: each FP8 call then costs one set lookup


def check_fp8_device(device: torch.device, what: str = "weights") -> None:
    """Raise a clear error on a GPU without e4m3 (compute capability below 8.9: an A100, say), where the
    kernels would fail inside Triton's compiler; ``what``: ``weights`` or ``kv_cache``, for the message."""
    if device.type != "cuda" or device in _FP8_DEVICES:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        what, flag = ("weights", "--weights") if what == "weights" else ("K/V cache", "--kv-cache")
        raise ValueError(f"an FP8 (e4m3) {what} needs a GPU of compute capability 8.9 or later (Ada, Hopper, "
                         f"Blackwell); {device} is {major}.{minor}: decode in bf16 ({flag} native)")
    if device.index is not None:  # "cuda" alone follows the current device: not kept
        _FP8_DEVICES.add(device)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 x [M, K], fp32 scales [M]) for x [..., K] flattened to rows (``reference.quantize_rows_fp8``)."""
    check_fp8_device(x.device)
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M, K = x2.shape
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M and K:
        block = min(2048, triton.next_power_of_2(K))
        _quantize_rows_kernel[(M,)](x2, q, s, K, x2.stride(0), q.stride(0), BLOCK=block,
                                    num_warps=4 if block <= 1024 else 8, **pdl(x2.device, "quantize_rows"))
    return q, s


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if w.dtype != FP8 or scale.dtype != torch.float32 or scale.shape != (w.shape[0],):
        raise ValueError(f"an FP8 weight is float8_e4m3fn [N, K] with fp32 scales [N]; got {w.dtype} "
                         f"{tuple(w.shape)} and {scale.dtype} {tuple(scale.shape)}")
    check_bias(bias, w.shape[0])
    if w.dim() != 2 or x.shape[-1] != w.shape[1] or w.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} do not multiply as x @ w.T")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x {x.dtype}: expected fp32, bf16 or fp16")
    check_fp8_device(x.device)
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _few_rows(x: torch.Tensor, rows: int) -> bool:
    return (x.is_cuda or _INTERPRET) and 0 < rows <= MAX_ROWS


def linear_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (w * scale[:, None]).T + bias`` for an e4m3 weight ``w`` [N, K] with per-output-channel fp32
    ``scale`` [N] (``reference.linear_fp8``); the activations stay in their dtype."""
    x2 = _check(x, w, scale, bias)
    rows = x2.shape[0]
    if _few_rows(x, rows):
        out = torch.empty(rows, w.shape[0], dtype=x.dtype, device=x.device)
        _launch(x2, w, out, w.shape[0], False, scale=scale, bias=bias)
        return out.view(*x.shape[:-1], w.shape[0])
    if x.is_cuda and x.dtype != torch.float32:  # compute-bound: cuBLAS on the widened weight (one more rounding)
        y = torch.nn.functional.linear(x, w.to(x.dtype)).float() * scale
        return (y if bias is None else y + bias.float()).to(x.dtype)
    from .reference import linear_fp8 as plain

    return plain(x, w, scale, bias)


# cuBLAS FP8 products accumulate in the tensor cores' own accumulator, as the few-row kernel's FP8 products do,
# not promoted to fp32 every few K steps: on an H200 1% to 16% faster by shape, batch 64 `generate` 8% faster,
# the bundled models within 0.1 points of bf16 on 5,000 problems (benchmarks/RESULTS.md, "FP8 products with fast
# accumulation"); L2PD_FP8_FAST_ACCUM=0 promotes
FAST_ACCUM = os.environ.get("L2PD_FP8_FAST_ACCUM", "1") != "0"


def _scaled_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """cuBLAS FP8 needs a GPU of compute capability 8.9 or later and K, N multiples of 16."""
    if not x.is_cuda or w.shape[0] % 16 or w.shape[1] % 16:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 9)


def linear_w8a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                xq: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (w * scale[:, None]).T + bias`` with x quantized per row to e4m3 first (``reference.linear_w8a8``;
    ``xq``: that quantization, already made, as ``rms_norm_fp8`` leaves it), in x's dtype (fp32 activations are
    refused by cuBLAS FP8 only on its path: they go through the kernel or the reference). The bias joins the
    fp32 sums before they round, but on cuBLAS's many-row path, where it is added to the rounded product."""
    x2 = _check(x, w, scale, bias)
    rows, n = x2.shape[0], w.shape[0]
    few = _few_rows(x, rows)
    if few or (rows and _scaled_mm_ok(x, w) and x.dtype != torch.float32):
        q, qs = quantize_rows(x2) if xq is None else xq
        if few:
            out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
            _launch(q, w, out, n, False, scale=scale, x_scale=qs, bias=bias)
        else:
            out = torch._scaled_mm(q, w.t(), qs[:, None], scale[None, :], out_dtype=x.dtype,
                                   use_fast_accum=FAST_ACCUM)
            if bias is not None:
                out = out + bias
        return out.view(*x.shape[:-1], n)
    from .reference import linear_w8a8 as plain

    return plain(x, w, scale, xq, bias)


def linear_gate_up_silu_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, a8: bool = False,
                            xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` for a packed e4m3 ``w = cat([gate, up])`` [2F, K] and its scales [2F]
    (``reference.linear_gate_up_silu_fp8``): up to ``MAX_ROWS`` rows one skinny launch computes both halves
    and the gate (``a8``: against e4m3 activations, ``xq`` if already quantized); above, the FP8 product, then
    ``silu_mul``."""
    x2 = _check(x, w, scale)
    if w.shape[0] % 2:
        raise ValueError(f"a packed [gate; up] weight has an even number of rows, got {w.shape[0]}")
    rows, f = x2.shape[0], w.shape[0] // 2
    if not _few_rows(x, rows):
        from .silu_mul import silu_mul

        both = linear_w8a8(x, w, scale, xq) if a8 else linear_fp8(x, w, scale)
        gate, up = both.chunk(2, -1)
        return silu_mul(gate, up)
    out = torch.empty(rows, f, dtype=x.dtype, device=x.device)
    if a8:
        q, qs = quantize_rows(x2) if xq is None else xq
        _launch(q, w, out, f, True, scale=scale, x_scale=qs)
    else:
        _launch(x2, w, out, f, True, scale=scale)
    return out.view(*x.shape[:-1], f)
