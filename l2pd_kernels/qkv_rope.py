"""linear_rope_qkv: a cached step's q/k/v product and ``rope_qkv`` in one launch.

At batch 1 every kernel of a layer costs a fixed few microseconds beyond its bytes ("The few-row products'
tiles from an occupancy sweep" in ``benchmarks/RESULTS.md``: about 4 us per product), and ``rope_qkv`` is one
such kernel per layer. Here the skinny product runs with one head per program (a tile of ``head_dim``
columns); each program writes its head's product, then reads it back and does ``rope_qkv``'s work for it
(per-head norms, rotation, the K/V cache write) with the same device functions, so q, k and v come out with
the bits of the two launches (with per-head norms, on a GPU, up to the order of the squares' sum). Few heads
leave SMs idle, so their K is split among programs (``skinny.pick_rope_split``). The forward uses it where it
paid on an H200 (``l2pd.models.decoder._rope_fuses``; ``L2PD_FUSED_ROPE``). Semantics:
``l2pd_kernels.reference.linear_rope_qkv``.
"""

from __future__ import annotations

import torch

from .rope import check_kv_scales
from .skinny import _launch

MAX_HEAD_DIM = 256  # one head per program: its columns are the tile's width


def linear_rope_qkv(x: torch.Tensor, w: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor,
                    sin: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, slots: torch.Tensor,
                    rows: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, eps: float = 1e-6, scale: torch.Tensor | None = None,
                    a8: bool = False, xq: tuple[torch.Tensor, torch.Tensor] | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``rope_qkv`` of the q, k and v column slices of ``x @ w.T`` (x [B, S, K]; w [(heads + 2 kv_heads) * D,
    K], fp32/bf16/fp16, or e4m3 with its per-channel ``scale``; ``a8``: against x quantized per row, ``xq`` if
    already made). Writes k and v into ``k_out``/``v_out`` as ``rope_qkv`` does (an e4m3 cache: with their
    per-head scales in ``k_scale``/``v_scale``) and returns rotated q [B, H, S, D] over [B, S, H, D] memory.
    cos/sin, q_out and the caches must be contiguous."""
    if x.dim() != 3 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x [B, S, K] and w [N, K]: got {tuple(x.shape)} and {tuple(w.shape)}")
    B, S, _ = x.shape
    width = heads + 2 * kv_heads
    D = w.shape[0] // width if heads > 0 and kv_heads > 0 and heads % kv_heads == 0 else 0
    if not D or D * width != w.shape[0] or D & (D - 1) or not 16 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"w has {w.shape[0]} rows: not (heads + 2 kv_heads) = {width} heads of a power-of-two "
                         f"head_dim in [16, {MAX_HEAD_DIM}] (heads {heads} a multiple of kv_heads {kv_heads})")
    fp8 = w.dtype == torch.float8_e4m3fn
    if fp8 != (scale is not None) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (
            not fp8 and x.dtype != w.dtype):
        raise ValueError(f"w {w.dtype} takes x of its dtype (fp32, bf16, fp16), or is e4m3 with a scale; x {x.dtype}")
    if a8 and not fp8:
        raise ValueError("a8 (e4m3 activations) needs e4m3 weights")
    half = cos.shape[-1] if cos.dim() == 3 else 0
    rest = D - 2 * half
    if (cos.shape != (B, S, half) or sin.shape != cos.shape or cos.dtype != torch.float32 or half < 1
            or half & (half - 1) or (rest and rest & (rest - 1)) or rest < 0
            or not (cos.is_contiguous() and sin.is_contiguous())):
        raise ValueError(f"cos/sin must be contiguous fp32 [B, S, R/2] = [{B}, {S}, R/2], R/2 and D - R powers of "
                         f"two (D = {D}), got {tuple(cos.shape)} {cos.dtype}")
    if (k_out.dim() != 4 or k_out.shape[1] != kv_heads or k_out.shape[3] != D or v_out.shape != k_out.shape
            or (rows is None and k_out.shape[0] != B) or not (k_out.is_contiguous() and v_out.is_contiguous())):
        raise ValueError(f"k_out/v_out must be contiguous [B, {kv_heads}, T, {D}], got {tuple(k_out.shape)}, "
                         f"{tuple(v_out.shape)}")
    if slots.shape != (S,) or slots.dtype != torch.int64:
        raise ValueError(f"slots must be int64 [S={S}], got {slots.dtype} {tuple(slots.shape)}")
    if rows is not None and (B != 1 or rows.shape != (S,) or rows.dtype != torch.int64):
        raise ValueError(f"rows must be int64 [S={S}] with B = 1, got B={B}, rows {rows.dtype} {tuple(rows.shape)}")
    norm = q_norm is not None
    if norm != (k_norm is not None) or norm and (q_norm.shape != (D,) or k_norm.shape != (D,)
                                                 or q_norm.dtype != x.dtype or k_norm.dtype != x.dtype):
        raise ValueError(f"q_norm and k_norm come together, each [D={D}] in x's dtype ({x.dtype})")
    kv8 = check_kv_scales(k_out, v_out, k_scale, v_scale)
    if kv8 and not (k_scale.is_contiguous() and v_scale.is_contiguous()):
        raise ValueError("k_scale/v_scale must be contiguous")
    x2 = x.reshape(B * S, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    q_out = torch.empty(B, S, heads, D, dtype=x.dtype, device=x.device)
    out = torch.empty(B * S, w.shape[0], dtype=x.dtype, device=x.device)  # the product, read back per head
    if B * S:
        args = (cos, sin, slots, slots if rows is None else rows, q_out, k_out, v_out,
                q_norm.contiguous() if norm else q_out, k_norm.contiguous() if norm else q_out,
                k_scale if kv8 else q_out, v_scale if kv8 else q_out, float(eps), S, heads, kv_heads, k_out.shape[2])
        rope = {"args": args, "head_dim": D, "HALF": half, "REST": rest, "ROWS": int(rows is not None),
                "NORM": int(norm), "KV8": int(kv8)}
        if a8:
            from .fp8 import quantize_rows

            xq8, xs = quantize_rows(x2) if xq is None else xq
            _launch(xq8, w, out, w.shape[0], False, scale=scale, x_scale=xs, rope=rope)
        else:
            _launch(x2, w, out, w.shape[0], False, scale=scale, rope=rope)
    return q_out.transpose(1, 2)
