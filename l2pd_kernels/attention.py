"""pool_attention: attention of packed query tokens over the K/V rows of a slot pool (the engine's forward).

The engine packs the fed tokens of many requests into one sequence; each request is a *segment* of it,
given as one int64 row ``(q_start, q_len, row, k_len)``: its queries are tokens [q_start, q_start + q_len)
and they attend, bidirectionally, to keys [0, k_len) of cache row ``row`` (its own canvas, whose fed K/V
``rope_qkv`` has just written). So requests at different positions, with different canvas lengths, share one
forward with no padding and no key mask. ``tiles`` [n_tiles, 2] lists (segment, first query) per program
of ``block_m`` queries; the host builds it with the segments. A flash-attention loop (online softmax in fp32)
per (tile, head); grouped-query heads read their shared K/V head. Semantics:
``l2pd_kernels.reference.pool_attention``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pool_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, seg_ptr, tiles_ptr,
    sqn, sqh, skr, skh, skw, svr, svh, svw, son, soh,
    scale_log2, GROUP,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.load(tiles_ptr + tile * 2)
    t0 = tl.load(tiles_ptr + tile * 2 + 1)
    q_start = tl.load(seg_ptr + g * 4)
    q_len = tl.load(seg_ptr + g * 4 + 1)
    row = tl.load(seg_ptr + g * 4 + 2)
    k_len = tl.load(seg_ptr + g * 4 + 3)
    m = t0 + tl.arange(0, BM)
    mq = m < q_len
    d = tl.arange(0, D)
    tok = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * sqn + h * sqh + d[None, :], mask=mq[:, None], other=0.0)
    if IEEE:  # fp32 products (and the interpreter, whose bf16 dot is wrong)
        q = q.to(tl.float32)
    kvh = h // GROUP
    kbase = k_ptr + row.to(tl.int64) * skr + kvh * skh
    vbase = v_ptr + row.to(tl.int64) * svr + kvh * svh
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    n = tl.arange(0, BN)
    for start in range(0, k_len, BN):
        kn = start + n
        kmask = kn < k_len
        k = tl.load(kbase + kn[:, None].to(tl.int64) * skw + d[None, :], mask=kmask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(kmask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + kn[:, None].to(tl.int64) * svw + d[None, :], mask=kmask[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + tok[:, None] * son + h * soh + d[None, :], out.to(o_ptr.dtype.element_ty), mask=mq[:, None])


def pool_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: torch.Tensor,
                   tiles: torch.Tensor | None = None, block_m: int = 32, block_n: int | None = None,
                   num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.pool_attention``: q [1, H, N, D] (any strides with a
    contiguous last dimension), caches [R, Hkv, T, D], ``seg`` int64 [G, 4]; returns [1, H, N, D] laid out as
    [1, N, H, D] (so the output projection's input is a view). ``tiles`` (int64 [n, 2]: segment, first query;
    from ``pool_tiles``) is built here when not given. ``block_n`` (keys per loop, default 64), ``num_warps``,
    ``num_stages``: launch settings (``benchmarks/test_kernels_bench.py`` compares them; 64 keys and 4 warps
    were fastest at LLaDA-8B shapes on an H200)."""
    if q.dim() != 4 or q.shape[0] != 1 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q [1, H, N, D] and caches [R, Hkv, T, D]: got {tuple(q.shape)}, {tuple(k_cache.shape)},"
                         f" {tuple(v_cache.shape)}")
    _, H, N, D = q.shape
    HKV = k_cache.shape[1]
    if k_cache.shape[3] != D or H % HKV or D & (D - 1) or D < 16:
        raise ValueError(f"head_dim {D} (a power of two >= 16) and heads {H} (a multiple of {HKV} K/V heads) "
                         f"must match the cache {tuple(k_cache.shape)}")
    if seg.dim() != 2 or seg.shape[1] != 4 or seg.dtype != torch.int64:
        raise ValueError(f"seg must be int64 [G, 4] (q_start, q_len, row, k_len), got {seg.dtype} {tuple(seg.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        raise ValueError("q and the caches must be contiguous in their last dimension")
    if tiles is None:
        tiles = pool_tiles(seg.cpu(), block_m).to(q.device)
    out = torch.empty(1, N, H, D, dtype=q.dtype, device=q.device)
    if tiles.shape[0] and N:
        _pool_attention_kernel[(tiles.shape[0], H)](
            q, k_cache, v_cache, out, seg, tiles,
            q.stride(2), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(1), out.stride(2),
            1.0 / math.sqrt(D) * 1.4426950408889634, H // HKV,
            D=D, BM=block_m, BN=block_n or 64, IEEE=q.dtype == torch.float32 or _INTERPRET,
            num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
        )
    return out.transpose(1, 2)


def pool_tiles(seg: torch.Tensor, block_m: int = 32) -> torch.Tensor:
    """(segment, first query) of each program: ``ceil(q_len / block_m)`` tiles per segment (CPU int64)."""
    rows = []
    for g, q_len in enumerate(seg[:, 1].tolist()):
        rows.extend((g, t) for t in range(0, q_len, block_m))
    return torch.tensor(rows, dtype=torch.int64).view(-1, 2)
