"""rope_qkv: rotary embedding of q and k, fused with the write of k and v into their (cache) slots.

Unfused, each layer spends about twenty small kernels here (upcast, split, negate, concatenate, two
products and a sum for q and for k, a transpose copy each, then two cache writes). This kernel reads q, k and
v once per token and writes q as [B, H, S, D] (over [B, S, H, D] memory) for attention, and k (rotated) and v into
``k_out`` / ``v_out`` [B, Hkv, T, D] at the slots ``slots[s]`` (a KV cache, or a fresh buffer with
``slots = arange(S)``). cos/sin come precomputed per forward (they are shared by every layer). Slots are a
device tensor, so a captured CUDA graph can write a different block at every replay. With ``rows`` (one
packed sequence, B = 1) token s writes into cache row ``rows[s]``: the engine packs the fed tokens of many
requests, each at its own positions, into one forward. cos/sin of R/2 < D/2 angles rotate the first R dims
of each head and copy the rest (partial RoPE). With ``q_norm``/``k_norm`` each head of q and k is first
RMS-normalised over its dims (LLaDA 2.x's and LLaDA-MoE's per-head q/k norms), in the same pass: no copy of the
strided q/k and no norm launch per layer. Semantics: ``l2pd_kernels.reference.rope_qkv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import pdl, pdl_wait
from .e4m3 import FP8, _row_scale, _to_e4m3


@triton.jit
def _head_inv(head, mask, eps, D: tl.constexpr):
    """1 / RMS of each head's D values at ``head`` [heads, 1] (fp32)."""
    x = tl.load(head + tl.arange(0, D)[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]


@triton.jit
def _load(src, mask, inv, w_ptr, offs, NORM: tl.constexpr):
    """The values at ``src`` in fp32; with the norm, x * inv rounded to the input dtype, times the weight at
    ``offs`` rounded again (``reference.rms_norm``'s order)."""
    x = tl.load(src, mask=mask, other=0.0)
    if NORM:
        dt = src.dtype.element_ty
        h = (x.to(tl.float32) * inv).to(dt).to(tl.float32)
        x = (h * tl.load(w_ptr + offs).to(tl.float32)).to(dt)
    return x.to(tl.float32)


@triton.jit
def _rotated(src, mask, c, sn, inv, w_ptr, j, HALF: tl.constexpr, NORM: tl.constexpr):
    """Rotate-half RoPE of the [heads, HALF] pairs at ``src`` (normed first with NORM): the two halves, fp32."""
    x1 = _load(src, mask, inv, w_ptr, j, NORM)
    x2 = _load(src + HALF, mask, inv, w_ptr, j + HALF, NORM)
    return x1 * c - x2 * sn, x2 * c + x1 * sn


@triton.jit
def _rotate(src, dst, mask, c, sn, inv, w_ptr, j, HALF: tl.constexpr, NORM: tl.constexpr):
    """``_rotated``'s halves stored at ``dst`` in its dtype."""
    y1, y2 = _rotated(src, mask, c, sn, inv, w_ptr, j, HALF, NORM)
    tl.store(dst, y1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_store(src, dst, mask, c, sn, inv, w_ptr, rest, HALF: tl.constexpr, REST: tl.constexpr,
                  NORM: tl.constexpr):
    """A head's rotated dims, then (partial RoPE) its ``rest`` passed through, stored at ``dst`` [heads, 1]."""
    j = tl.arange(0, HALF)[None, :]
    _rotate(src + j, dst + j, mask, c, sn, inv, w_ptr, j, HALF, NORM)
    if REST > 0:
        tl.store(dst + 2 * HALF + tl.arange(0, REST)[None, :], rest.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _store_e4m3(dst, s_dst, mask, a, b, rest, HALF: tl.constexpr, REST: tl.constexpr):
    """An e4m3 cache's write of [heads, D] fp32 values at ``dst`` (each head's first dim, [heads, 1]) given as
    parts ``a`` (dims [0, HALF)), ``b`` ([HALF, 2 HALF)) and, with REST, ``rest`` (the dims after): each head
    scaled so its largest magnitude is 448 (``quantize_rows``' scale and rounding), its scale stored at
    ``s_dst`` [heads, 1]."""
    amax = tl.maximum(tl.max(tl.abs(a), 1), tl.max(tl.abs(b), 1))
    if REST > 0:
        amax = tl.maximum(amax, tl.max(tl.abs(rest), 1))
    scale = _row_scale(amax)[:, None]
    j = tl.arange(0, HALF)[None, :]
    tl.store(dst + j, _to_e4m3(a, scale), mask=mask)
    tl.store(dst + HALF + j, _to_e4m3(b, scale), mask=mask)
    if REST > 0:
        tl.store(dst + 2 * HALF + tl.arange(0, REST)[None, :], _to_e4m3(rest, scale), mask=mask)
    tl.store(s_dst, scale, mask=mask)


@triton.jit
def _rope_qkv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr, vo_ptr, qw_ptr, kw_ptr, ks_ptr,
    vs_ptr, eps, S, H, HKV,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, scb, scs,
    sqob, sqoh, sqos, skob, skoh, skos, svob, svoh, svos, ssr, ssh,
    HALF: tl.constexpr, VHALF: tl.constexpr, REST: tl.constexpr, HB: tl.constexpr, HKVB: tl.constexpr,
    ROWS: tl.constexpr, NORM: tl.constexpr, KV8: tl.constexpr = 0, PDL: tl.constexpr = 0):
    # KV8: an e4m3 cache, one fp32 scale per (row, K/V head, slot) at ks_ptr / vs_ptr (strides ssr, ssh, 1)
    pdl_wait(PDL)
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    j = tl.arange(0, HALF)
    c = tl.load(cos_ptr + b * scb + s * scs + j)[None, :]
    sn = tl.load(sin_ptr + b * scb + s * scs + j)[None, :]
    slot = tl.load(slots_ptr + s).to(tl.int64)
    kb = tl.load(rows_ptr + s).to(tl.int64) if ROWS else b  # the cache row this token's K/V go to

    h = tl.arange(0, HB)[:, None]
    hm = h < H
    qi = _head_inv(q_ptr + b * sqb + s * sqs + h * sqh, hm, eps, 2 * VHALF) if NORM else None
    _rotate(q_ptr + b * sqb + s * sqs + h * sqh + j[None, :], qo_ptr + b * sqob + h * sqoh + s * sqos + j[None, :],
            hm, c, sn, qi, qw_ptr, j[None, :], HALF, NORM)

    g = tl.arange(0, HKVB)[:, None]
    gm = g < HKV
    ki = _head_inv(k_ptr + b * skb + s * sks + g * skh, gm, eps, 2 * VHALF) if NORM else None
    k_src = k_ptr + b * skb + s * sks + g * skh
    k_dst = ko_ptr + kb * skob + g * skoh + slot * skos
    if REST > 0:  # partial RoPE: the dims past the rotated ones pass through (normed, with the norm)
        r = 2 * HALF + tl.arange(0, REST)[None, :]
        x = _load(q_ptr + b * sqb + s * sqs + h * sqh + r, hm, qi, qw_ptr, r, NORM)
        tl.store(qo_ptr + b * sqob + h * sqoh + s * sqos + r, x.to(qo_ptr.dtype.element_ty), mask=hm)
        k_rest = _load(k_src + r, gm, ki, kw_ptr, r, NORM)
        if not KV8:
            tl.store(k_dst + r, k_rest.to(ko_ptr.dtype.element_ty), mask=gm)
    else:
        k_rest = None
    jv = tl.arange(0, VHALF)[None, :]
    base = v_ptr + b * svb + s * svs + g * svh + jv
    v_dst = vo_ptr + kb * svob + g * svoh + slot * svos
    if KV8:  # each head quantized whole: its scale needs all its dims
        k1, k2 = _rotated(k_src + j[None, :], gm, c, sn, ki, kw_ptr, j[None, :], HALF, NORM)
        s_off = kb * ssr + g * ssh + slot
        _store_e4m3(k_dst, ks_ptr + s_off, gm, k1, k2, k_rest, HALF, REST)
        v1 = tl.load(base, mask=gm, other=0.0).to(tl.float32)
        v2 = tl.load(base + VHALF, mask=gm, other=0.0).to(tl.float32)
        _store_e4m3(v_dst, vs_ptr + s_off, gm, v1, v2, None, VHALF, 0)
    else:
        _rotate(k_src + j[None, :], k_dst + j[None, :], gm, c, sn, ki, kw_ptr, j[None, :], HALF, NORM)
        tl.store(v_dst + jv, tl.load(base, mask=gm, other=0.0).to(vo_ptr.dtype.element_ty), mask=gm)
        tl.store(v_dst + VHALF + jv, tl.load(base + VHALF, mask=gm, other=0.0).to(vo_ptr.dtype.element_ty), mask=gm)


@triton.jit
def _rope_tail(src_ptr, rm, M, stride_m, head, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr, vo_ptr,
               qw_ptr, kw_ptr, ks_ptr, vs_ptr, eps, S, H, HKV, T, D: tl.constexpr, HALF: tl.constexpr,
               REST: tl.constexpr, ROWS: tl.constexpr, NORM: tl.constexpr, KV8: tl.constexpr):
    """``_rope_qkv_kernel``'s work for one head of the rows ``rm`` of a q/k/v product, read back from the
    product's output ``src_ptr`` (row stride ``stride_m``; head ``head`` of H q, then HKV k, then HKV v heads,
    D columns each) as ``rope_qkv`` would read it: the same functions on the same values, so the same bits
    (with per-head norms, on a GPU, up to the fp32 order of the squares' sum over another tile shape).
    Row t is token t of [B, S] (cos/sin [B, S, HALF] and q_out [B, S, H, D] contiguous; k_out/v_out
    [R, HKV, T, D] contiguous; with KV8 e4m3, their scales at ks_ptr/vs_ptr [R, HKV, T] contiguous)."""
    t = rm[:, None]
    ok = t < M
    tt = tl.where(ok, t, 0).to(tl.int64)
    s = tt % S
    src = src_ptr + tt * stride_m + head * D
    slot = tl.load(slots_ptr + s, mask=ok, other=0).to(tl.int64)
    kb = tl.load(rows_ptr + s, mask=ok, other=0).to(tl.int64) if ROWS else tt // S  # the K/V's cache row
    if head < H + HKV:  # q or k: normed first (per-head norms), then rotated
        j = tl.arange(0, HALF)[None, :]
        c = tl.load(cos_ptr + tt * HALF + j, mask=ok, other=0.0)
        sn = tl.load(sin_ptr + tt * HALF + j, mask=ok, other=0.0)
        if head < H:  # (the norm's weight; q and k are stored apart below: their pointers' types differ)
            w_ptr = qw_ptr
        else:
            w_ptr = kw_ptr
        inv = _head_inv(src, ok, eps, D) if NORM else None
        rest = None
        if REST > 0:  # partial RoPE: the dims past the rotated ones pass through
            r = 2 * HALF + tl.arange(0, REST)[None, :]
            rest = _load(src + r, ok, inv, w_ptr, r, NORM)
        if head < H:
            _rotate_store(src, qo_ptr + (tt * H + head) * D, ok, c, sn, inv, w_ptr, rest, HALF, REST, NORM)
        else:
            k_dst = ko_ptr + ((kb * HKV + (head - H)) * T + slot) * D
            if KV8:  # an e4m3 cache's k: the head quantized whole
                y1, y2 = _rotated(src + j, ok, c, sn, inv, w_ptr, j, HALF, NORM)
                _store_e4m3(k_dst, ks_ptr + (kb * HKV + (head - H)) * T + slot, ok, y1, y2, rest, HALF, REST)
            else:
                _rotate_store(src, k_dst, ok, c, sn, inv, w_ptr, rest, HALF, REST, NORM)
    else:  # v: copied into its slot
        g = head - H - HKV
        if KV8:
            jh = tl.arange(0, D // 2)[None, :]
            v1 = tl.load(src + jh, mask=ok, other=0.0).to(tl.float32)
            v2 = tl.load(src + D // 2 + jh, mask=ok, other=0.0).to(tl.float32)
            _store_e4m3(vo_ptr + ((kb * HKV + g) * T + slot) * D, vs_ptr + (kb * HKV + g) * T + slot, ok, v1, v2,
                        None, D // 2, 0)
        else:
            jd = tl.arange(0, D)[None, :]
            v_dst = vo_ptr + ((kb * HKV + g) * T + slot) * D + jd  # (a name apart: another shape)
            tl.store(v_dst, tl.load(src + jd, mask=ok, other=0.0).to(vo_ptr.dtype.element_ty), mask=ok)


def rope_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_out: torch.Tensor, v_out: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None = None,
             q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.rope_qkv``; returns the rotated q [B, H, S, D]. An e4m3 cache
    (``k_out``/``v_out`` float8_e4m3fn) takes its per-head scales in ``k_scale``/``v_scale``."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q [B, S, H, D], k and v [B, S, Hkv, D]: got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, S, H, D = q.shape
    HKV = k.shape[2]
    if k.shape[:2] != (B, S) or k.shape[3] != D or D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree, or head_dim {D} is not twice "
                         "a power of two")
    half = cos.shape[-1] if cos.dim() == 3 else 0
    rest = D - 2 * half
    if (cos.shape != (B, S, half) or sin.shape != cos.shape or cos.dtype != torch.float32 or half < 1
            or half & (half - 1) or (rest and rest & (rest - 1))):
        raise ValueError(f"cos/sin must be fp32 [B, S, R/2] with B, S = {B}, {S} and R/2 and D - R powers of two "
                         f"(D = {D}), got {tuple(cos.shape)} {cos.dtype}")
    if rows is not None and (B != 1 or rows.shape != (S,) or rows.dtype != torch.int64):
        raise ValueError(f"rows must be int64 [S={S}] with B = 1, got B={B}, rows {rows.dtype} {tuple(rows.shape)}")
    if (k_out.dim() != 4 or k_out.shape[1] != HKV or (rows is None and k_out.shape[0] != B)
            or k_out.shape[3] != D or v_out.shape != k_out.shape):
        raise ValueError(f"k_out/v_out must be [B, Hkv, T, D] with B={B} Hkv={HKV} D={D}, got "
                         f"{tuple(k_out.shape)} and {tuple(v_out.shape)}")
    if slots.shape != (S,) or slots.dtype != torch.int64:
        raise ValueError(f"slots must be int64 [S={S}], got {slots.dtype} {tuple(slots.shape)}")
    norm = q_norm is not None
    if norm != (k_norm is not None) or norm and (q_norm.shape != (D,) or k_norm.shape != (D,) or q.dtype != k.dtype
                                                 or q_norm.dtype != q.dtype or k_norm.dtype != k.dtype):
        raise ValueError(f"q_norm and k_norm come together, each [D={D}] in q's and k's dtype ({q.dtype})")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_out, v_out)):
        raise ValueError("q, k, v, cos, sin, k_out and v_out must be contiguous in their last dimension")
    kv8 = check_kv_scales(k_out, v_out, k_scale, v_scale)
    # [B, H, S, D] as a view of [B, S, H, D] memory: attention then writes its output in that layout too, so
    # the [B, S, H * D] input of the output projection is a view, not a transpose copy
    q_out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    if B * S:
        _rope_qkv_kernel[(B * S,)](
            q, k, v, cos, sin, slots, slots if rows is None else rows, q_out, k_out, v_out,
            q_norm.contiguous() if norm else q, k_norm.contiguous() if norm else k,
            k_scale if kv8 else cos, v_scale if kv8 else cos, float(eps), S, H, HKV,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(1),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            v_out.stride(0), v_out.stride(1), v_out.stride(2),
            k_scale.stride(0) if kv8 else 0, k_scale.stride(1) if kv8 else 0,
            HALF=half, VHALF=D // 2, REST=rest, HB=triton.next_power_of_2(H), HKVB=triton.next_power_of_2(HKV),
            ROWS=rows is not None, NORM=norm, KV8=int(kv8), num_warps=4, **pdl(q.device, "rope_qkv"),
        )
    return q_out


def check_kv_scales(k_out: torch.Tensor, v_out: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> bool:
    """Whether the cache [R, Hkv, T, D] is e4m3 (then its scales must be fp32 [R, Hkv, T], contiguous in the
    last two dimensions and alike); raises where the caches and the scales disagree."""
    kv8 = k_out.dtype == FP8
    if (v_out.dtype == FP8) != kv8 or (k_scale is not None) != kv8 or (v_scale is not None) != kv8:
        raise ValueError(f"an e4m3 K/V cache takes k_scale and v_scale, a cache of another dtype neither: caches "
                         f"{k_out.dtype}, {v_out.dtype}, scales {'given' if k_scale is not None else 'None'}, "
                         f"{'given' if v_scale is not None else 'None'}")
    if kv8 and (k_scale.shape != k_out.shape[:3] or v_scale.shape != k_scale.shape
                or k_scale.stride() != v_scale.stride() or k_scale.dtype != torch.float32
                or v_scale.dtype != torch.float32 or k_scale.stride(2) != 1
                or k_scale.stride(1) != k_scale.shape[2]):
        raise ValueError(f"k_scale/v_scale must be fp32 {tuple(k_out.shape[:3])} with the last two dimensions "
                         f"contiguous, got {k_scale.dtype} {tuple(k_scale.shape)}, {v_scale.dtype} "
                         f"{tuple(v_scale.shape)}")
    return kv8
