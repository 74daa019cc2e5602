"""rms_norm: the residual add and RMSNorm of a transformer block in one pass over the hidden state.

``x + delta`` is rounded to the model dtype (what the unfused ``x = x + delta`` stores), normalised in fp32,
rounded to the model dtype, then scaled by the weight: the order of operations of the official LLaDA
RMSLayerNorm, so only the fp32 sum of squares can differ from ``l2pd_kernels.reference.rms_norm`` by
rounding. One program per row (a hidden state of up to 16384 values fits in registers).

``delta`` may also be a mixture of experts' rows before their combine (``ExpertRows``, from
``fused_moe(..., combine=False)``): the program then weights and sums its token's k rows (and adds the shared
expert's) as ``moe_combine`` does, in the same pass, so a layer has one launch fewer. That form runs without fp
fusion, as the combine kernel does (each weighted row rounded to fp32 before the add), so its sum of squares may
differ from the other form's in the last bits.

``rms_norm_fp8`` also writes the normed row as e4m3 with its scale, the bits ``quantize_rows`` would give: the
input of a layer with e4m3 activations (``l2pd.quantize(model, "w8a8")``) without a second launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import pdl, pdl_wait
from .e4m3 import FP8, _row_scale, _to_e4m3
from .fp8 import check_fp8_device
from .moe import _combined, check_rows
from .reference import ExpertRows


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, sum_ptr, q_ptr, qs_ptr, rw_ptr, sh_ptr, D, eps,
                     stride_x, stride_d, stride_o, stride_s,
                     BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_WEIGHT: tl.constexpr, QUANT: tl.constexpr,
                     MOE_K: tl.constexpr = 0, MOE_SHARED: tl.constexpr = 0, PDL: tl.constexpr = 0):
    """``MOE_K`` > 0: delta is the experts' rows [N * MOE_K, D] (``delta_ptr``, unweighted), combined with their
    weights (``rw_ptr``, [N, MOE_K] fp32) and the shared expert's output (``sh_ptr``) as ``_combine_kernel``
    does."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if MOE_K > 0:
        dlt = _combined(delta_ptr, rw_ptr, sh_ptr, row, offs, ok, D, MOE_K, MOE_SHARED, x_ptr.dtype.element_ty)
        x = (x.to(tl.float32) + dlt.to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=ok)
    elif HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_d + offs, mask=ok, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / D + eps)
    h = (xf * inv).to(out_ptr.dtype.element_ty)
    if HAS_WEIGHT:
        h = (h.to(tl.float32) * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, h, mask=ok)
    if QUANT:  # the stored row as e4m3: the largest magnitude at 448 (quantize_rows' rule and rounding)
        hf = h.to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(hf), 0))
        tl.store(qs_ptr + row, scale)
        tl.store(q_ptr + row * D + offs, _to_e4m3(hf, scale), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             delta: torch.Tensor | ExpertRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``l2pd_kernels.reference.rms_norm``: returns (normed, x + delta)."""
    h, total, _ = _run(x, weight, eps, delta, False)
    return h, total


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 delta: torch.Tensor | ExpertRows | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``rms_norm`` and the normed rows as e4m3 with one fp32 scale each (``reference.rms_norm_fp8``):
    (normed, x + delta, (e4m3 [M, D], scales [M]))."""
    check_fp8_device(x.device)
    return _run(x, weight, eps, delta, True)


def _run(x, weight, eps, delta, quant):
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D > 0, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if D > 16384:
        raise ValueError(f"hidden size {D} exceeds the kernel's limit of 16384")
    if weight is not None and (weight.shape != (D,) or weight.dtype != x.dtype):
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not match x [..., {D}] {x.dtype}")
    moe = isinstance(delta, ExpertRows)
    if moe:
        n, k, d = check_rows(delta)
        if d != D or n * D != x.numel() or delta.rows.dtype != x.dtype:
            raise ValueError(f"the experts' rows ({n} tokens of {d}, {delta.rows.dtype}) do not match x "
                             f"{tuple(x.shape)} {x.dtype}")
    elif delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} != x {tuple(x.shape)} {x.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {x.dtype} is not supported (fp32, bf16, fp16)")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    d2 = delta.rows if moe else None if delta is None else delta.reshape(-1, D).contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, D, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if delta is not None else x2
    q = torch.empty(rows, D, dtype=FP8, device=x.device) if quant else out
    qs = torch.empty(rows, dtype=torch.float32, device=x.device) if quant else out
    if rows:
        moe_args = {}
        if moe:  # the combine's rounding: no fused multiply-adds (on the GPU)
            moe_args = dict(MOE_K=k, MOE_SHARED=delta.shared is not None,
                            **({} if x.device.type != "cuda" else {"enable_fp_fusion": False}))
        _rms_norm_kernel[(rows,)](
            x2, out if d2 is None else d2, out if weight is None else weight, out, total, q, qs,
            delta.weights if moe else out, delta.shared if moe and delta.shared is not None else out, D,
            float(eps), x2.stride(0), 0 if d2 is None else d2.stride(0), out.stride(0), total.stride(0),
            BLOCK=triton.next_power_of_2(D), HAS_DELTA=delta is not None, HAS_WEIGHT=weight is not None,
            QUANT=quant, num_warps=8 if D >= 4096 else 4, **moe_args, **pdl(x2.device, "rms_norm"),
        )
    return out.view(x.shape), total.view(x.shape), ((q, qs) if quant else None)
