"""attention: a block's queries over the whole KV cache, split along the keys (flash-decoding).

A cached step at small batch has few queries (a 32-token block) per head against hundreds of cached keys.
One program per (row, head), as the library attention kernels run it, leaves most of the GPU idle: at batch
1 an 8B model's 32 heads give 32 programs on 132 SMs, and the step's attention is latency-bound. Here each
(row, head) is cut into ``splits`` key ranges, each program keeps an online softmax over its range and
writes an unnormalised partial output with its running max and sum; a second kernel merges the partials
into the output. Semantics: ``l2pd_kernels.reference.attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile
KEYS_PER_SPLIT = 128  # default range per program: a row's result never depends on the batch it is in


@triton.jit
def _attention_partial_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, ml_ptr,
    S, T, H, GROUP, chunk, scale,
    sqb, sqh, sqs, skb, skh, skt, svb, svh, svt, smb,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = (h // GROUP).to(tl.int64)
    m_offs = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + h * sqh + m_offs[:, None] * sqs + d[None, :], mask=m_offs[:, None] < S, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, T)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        k = tl.load(k_ptr + b * skb + g * skh + n[:, None] * skt + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + b * svb + g * svh + n[:, None] * svt + d[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        if HAS_MASK:
            valid &= tl.load(mask_ptr + b * smb + n, mask=valid, other=0) != 0
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a range with no key yet: keep zeros
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (bh * SPLITS + split).to(tl.int64)
    rows = m_offs < S
    tl.store(acc_ptr + (part * BLOCK_M + m_offs[:, None]) * D + d[None, :], acc, mask=rows[:, None])
    tl.store(ml_ptr + (part * 2) * BLOCK_M + m_offs, m_i, mask=rows)
    tl.store(ml_ptr + (part * 2 + 1) * BLOCK_M + m_offs, l_i, mask=rows)


@triton.jit
def _attention_merge_kernel(
    acc_ptr, ml_ptr, o_ptr, S, H, sob, soh, sos,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    m_offs = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    rows = m_offs < S
    base = (bh * SPLITS).to(tl.int64)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for sp in tl.static_range(SPLITS):
        m = tl.maximum(m, tl.load(ml_ptr + ((base + sp) * 2) * BLOCK_M + m_offs, mask=rows, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    num = tl.zeros((BLOCK_M, D), tl.float32)
    den = tl.zeros((BLOCK_M,), tl.float32)
    for sp in tl.static_range(SPLITS):
        w = tl.exp(tl.load(ml_ptr + ((base + sp) * 2) * BLOCK_M + m_offs, mask=rows, other=float("-inf")) - m)
        den += w * tl.load(ml_ptr + ((base + sp) * 2 + 1) * BLOCK_M + m_offs, mask=rows, other=0.0)
        num += w[:, None] * tl.load(acc_ptr + ((base + sp) * BLOCK_M + m_offs[:, None]) * D + d[None, :],
                                    mask=rows[:, None], other=0.0)
    out = num / den[:, None]
    tl.store(o_ptr + b * sob + h * soh + m_offs[:, None] * sos + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rows[:, None])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              splits: int | None = None) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.attention``: q [B, H, S, D] (any strides, last one 1),
    k/v [B, Hkv, T, D], ``key_mask`` [B, T] (nonzero: may attend) or None; non-causal, scale 1/sqrt(D).
    Returns [B, H, S, D] over [B, S, H, D] memory (the output projection's input is then a view).
    ``splits``: key ranges per (row, head) (default: ranges of ``KEYS_PER_SPLIT`` keys)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q [B, H, S, D], k and v [B, Hkv, T, D]: got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, S, D = q.shape
    HKV, T = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % HKV or D < 16 or D & (D - 1) or not 1 <= S <= 128 or T < 1:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: need the same B and D, H divisible by Hkv, "
                         "head_dim a power of two >= 16, 1 <= S <= 128 queries and at least one key")
    if key_mask is not None and key_mask.shape != (B, T):
        raise ValueError(f"key_mask must be [B, T] = {(B, T)}, got {tuple(key_mask.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)) or (key_mask is not None and key_mask.stride(-1) != 1):
        raise ValueError("q, k, v and key_mask must be contiguous in their last dimension")
    chunk = -(-T // (splits or -(-T // KEYS_PER_SPLIT)))
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    splits = -(-T // chunk)
    BLOCK_M = max(16, triton.next_power_of_2(S))
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    acc = torch.empty(B * H * splits * BLOCK_M * D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B * H * splits * 2 * BLOCK_M, dtype=torch.float32, device=q.device)
    mask = key_mask if key_mask is not None else q  # a dummy pointer when there is no mask
    _attention_partial_kernel[(B * H, splits)](
        q, k, v, mask, acc, ml, S, T, H, H // HKV, chunk, D**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0),
        SPLITS=splits, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D, HAS_MASK=key_mask is not None,
        DOT_F32=not q.is_cuda, num_warps=4,  # Triton's CPU interpreter gets bf16 products wrong
    )
    _attention_merge_kernel[(B * H,)](
        acc, ml, out, S, H, out.stride(0), out.stride(1), out.stride(2),
        SPLITS=splits, BLOCK_M=BLOCK_M, D=D, num_warps=4,
    )
    return out
