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

from .device import pdl, pdl_wait, sm_count
from .rope import check_kv_scales

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# queries per program of pool_attention: 64 was fastest at LLaDA-8B shapes on an H200 for step segments (32 or
# 64 queries, even with SDPA) and twice as fast as 32 for refresh segments (benchmarks/RESULTS.md); grouped-query
# models take 32 (``pool_tile_m``); L2PD_POOL_TILE_M sets one for every model
POOL_TILE_M = 64
POOL_TILE_M_GQA = 32
_TILE_M_ENV = int(os.environ.get("L2PD_POOL_TILE_M", "0"))
SPLIT_MIN_KEYS = 2048  # below this, and with fewer than 4 chunks, SDPA's one pass was as fast (H200)
# the engine's key split at batch 1 (pool_split_plan; L2PD_POOL_SPLIT=0 turns it off): one layer's attention over
# 4,096 keys fell from 60 to 24 us at LLaDA-8B shapes (4 chunks) and from 59 to 12 us at LLaDA2.0-mini's (8),
# `generate` at 3,072 + 1,024 by 13% (H200; benchmarks/RESULTS.md, "The engine's key split by default").
# L2PD_POOL_SPLITS=n forces n chunks (0: the rule of pool_split_plan)
POOL_SPLITS = int(os.environ.get("L2PD_POOL_SPLITS", "0"))
POOL_MAX_SPLITS = 16
POOL_MERGE_ROWS = 4
# grouped-query heads per program of pool_attention (pool_heads_per_program): up to this many rows (queries x
# heads) share each K/V tile loaded, in one pass (many programs) and with the keys split (few); L2PD_POOL_GQ=n
# forces n heads (1: one head per program)
POOL_GQA_ROWS = 128
POOL_GQA_ROWS_SPLIT = 64
POOL_GQ = int(os.environ.get("L2PD_POOL_GQ", "0"))
# over an e4m3 K/V cache with its keys split (few programs: batch 1), 128 keys per loop, the widened tiles
# amortised over twice the keys: at LLaDA-8B shapes on an H200 one layer over 4,096 keys 27.6 against 40.5 us
# (bf16 cache: 23.1), `generate` at 3,072 + 1,024 9% faster ("An e4m3 K/V cache" in benchmarks/RESULTS.md)
KV8_BLOCK_N = 128
# the attention kernel reads its host-built metadata (segments, tiles, key limits) before it waits for the
# kernel before it (programmatic dependent launch); False: after, as before (benchmarks/studies/step_rules.py)
META_FIRST = True


@triton.jit
def _pool_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, seg_ptr, tiles_ptr, part_ptr, lse_ptr, ks_ptr, vs_ptr,
    sqn, sqh, skr, skh, skw, svr, svh, svw, son, soh, ssr, ssh,
    scale_log2, GROUP, DENSE_L, DENSE_T, DENSE_TILES, KEY_CHUNK, NH, H,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, DENSE: tl.constexpr,
    SPLIT: tl.constexpr, QLIM: tl.constexpr, GQ: tl.constexpr = 1, META_FIRST: tl.constexpr = 1,
    KV8: tl.constexpr = 0, PDL: tl.constexpr = 0):
    # KV8: an e4m3 cache; each key's and value's scale (per row, K/V head and slot) at ks_ptr / vs_ptr (strides
    # ssr, ssh, 1): a key's scale multiplies its scores, a value's its probabilities, so the tiles only widen,
    # to fp16 (the products against q and the probabilities in fp16: 1.1x to 1.26x faster than widening to bf16
    # on an H200, yet slower than a bf16 cache on every shape measured: "An e4m3 K/V cache" in
    # benchmarks/RESULTS.md)
    # GQ: query heads per program (heads h0 .. h0 + GQ - 1 of one K/V head): its BM * GQ rows are (head j,
    # query m) with j = r // BM, so each K/V tile loaded serves GQ heads
    # META_FIRST: the segments, tiles and key limits are the host's (written before the forward, never by the
    # kernel just before this one), so their chain of dependent loads runs before the wait for q, k and v
    if not META_FIRST:
        pdl_wait(PDL)
    tile = tl.program_id(0)
    if DENSE:  # B rows of L queries over all T keys of their own cache row: the segment follows from the tile
        g = tile // DENSE_TILES
        t0 = (tile % DENSE_TILES) * BM
        q_start = g * DENSE_L
        q_len = DENSE_L
        row = g
        k_len = DENSE_T
    else:
        g = tl.load(tiles_ptr + tile * 2)
        t0 = tl.load(tiles_ptr + tile * 2 + 1)
        q_start = tl.load(seg_ptr + g * 4)
        q_len = tl.load(seg_ptr + g * 4 + 1)
        row = tl.load(seg_ptr + g * 4 + 2)
        k_len = tl.load(seg_ptr + g * 4 + 3)
    r = tl.arange(0, BM * GQ)
    h = tl.program_id(1) * GQ + r // BM  # each row's query head
    m = t0 + r % BM
    mq = m < q_len
    d = tl.arange(0, D)
    tok = (q_start + m).to(tl.int64)
    if QLIM:  # dense form: each query's own key count (block-causal: up to its block's end; in seg_ptr)
        qlim = tl.minimum(tl.load(seg_ptr + tok, mask=mq, other=0), k_len).to(tl.int32)
        k_len = tl.max(qlim, 0)
    if META_FIRST:
        pdl_wait(PDL)
    k_lo = 0
    k_hi = k_len
    if SPLIT:  # this program's share of the keys: chunk program_id(2)
        k_lo = tl.program_id(2) * KEY_CHUNK
        k_hi = tl.minimum(k_lo + KEY_CHUNK, k_len)
    q = tl.load(q_ptr + tok[:, None] * sqn + h[:, None] * sqh + d[None, :], mask=mq[:, None], other=0.0)
    if IEEE:  # fp32 products (and the interpreter, whose bf16 dot is wrong)
        q = q.to(tl.float32)
    elif KV8:  # fp16 against the widened keys, scaled by 2^-8 (back in the scores) so no bf16 q overflows
        q = (q.to(tl.float32) * 0.00390625).to(tl.float16)
        scale_log2 = scale_log2 * 256.0
    kvh = tl.program_id(1) * GQ // GROUP
    kbase = k_ptr + row.to(tl.int64) * skr + kvh * skh
    vbase = v_ptr + row.to(tl.int64) * svr + kvh * svh
    sbase = row.to(tl.int64) * ssr + kvh * ssh
    m_i = tl.full((BM * GQ,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM * GQ,), tl.float32)
    acc = tl.zeros((BM * GQ, D), tl.float32)
    n = tl.arange(0, BN)
    for start in range(k_lo, k_hi, BN):
        kn = start + n
        kmask = kn < k_hi
        k = tl.load(kbase + kn[:, None].to(tl.int64) * skw + d[None, :], mask=kmask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))  # (e4m3 keys widen to fp16 exactly)
        if KV8:
            s = s * (tl.load(ks_ptr + sbase + kn, mask=kmask, other=0.0) * scale_log2)[None, :]
        else:
            s = s * scale_log2
        if QLIM:
            s = tl.where(kn[None, :] < qlim[:, None], s, float("-inf"))
        else:
            s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if QLIM:  # a query with no key in this loop yet: keep its state finite (its p are all 0)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + kn[:, None].to(tl.int64) * svw + d[None, :], mask=kmask[:, None], other=0.0)
        pv = p
        if KV8:
            pv = p * tl.load(vs_ptr + sbase + kn, mask=kmask, other=0.0)[None, :]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pv, v.to(tl.float32), input_precision="ieee")
        else:  # (e4m3 values widen to fp16 exactly)
            acc = acc * alpha[:, None] + tl.dot(pv.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    if SPLIT:  # the chunk's normalised output and log2-sum-exp (an empty chunk: weight 0 in the combine)
        full = l_i > 0
        out = tl.where(full[:, None], acc / tl.where(full, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(full, m_i + tl.log2(tl.where(full, l_i, 1.0)), float("-inf"))
        pr = tl.program_id(2).to(tl.int64) * NH + tok * H + h  # part [splits, N, H, D]
        tl.store(part_ptr + pr[:, None] * D + d[None, :], out, mask=mq[:, None])
        tl.store(lse_ptr + pr, lse, mask=mq)
    else:
        out = acc / l_i[:, None]
        tl.store(o_ptr + tok[:, None] * son + h[:, None] * soh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=mq[:, None])


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, o_ptr, NH, SPLITS: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
                    PDL: tl.constexpr = 0):
    """Merge the key chunks of BR (token, head) pairs: weights 2^(lse_s - max) (an online log-sum-exp), in
    chunk order. The loop is unrolled (a compile-time chunk count), so every chunk's loads go out before the
    first is used: 7.3 against 7.7 us for a layer at LLaDA-8B shapes over 768 keys in 4 chunks (H200)."""
    pdl_wait(PDL)
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    mr = r < NH
    d = tl.arange(0, D)
    m_i = tl.load(lse_ptr + r, mask=mr, other=0.0)  # chunk 0 is never empty (k_len >= 1)
    acc = tl.load(part_ptr + r[:, None] * D + d[None, :], mask=mr[:, None], other=0.0)
    l_i = tl.full((BR,), 1.0, tl.float32)
    for s in tl.static_range(1, SPLITS):
        ls = tl.load(lse_ptr + s * NH + r, mask=mr, other=float("-inf"))
        o = tl.load(part_ptr + (s * NH + r)[:, None] * D + d[None, :], mask=mr[:, None], other=0.0)
        m_new = tl.maximum(m_i, ls)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(ls - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + r[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=mr[:, None])


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> bool:
    """Raise on shapes the kernel does not take; whether the cache is e4m3 (with its scales)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q [B, H, N, D] and caches [R, Hkv, T, D]: got {tuple(q.shape)}, {tuple(k_cache.shape)},"
                         f" {tuple(v_cache.shape)}")
    H, D, HKV = q.shape[1], q.shape[3], k_cache.shape[1]
    if k_cache.shape[3] != D or H % HKV or D & (D - 1) or D < 16:
        raise ValueError(f"head_dim {D} (a power of two >= 16) and heads {H} (a multiple of {HKV} K/V heads) "
                         f"must match the cache {tuple(k_cache.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        raise ValueError("q and the caches must be contiguous in their last dimension")
    return check_kv_scales(k_cache, v_cache, k_scale, v_scale)


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: torch.Tensor | None,
            tiles: torch.Tensor | None, programs: int, dense: tuple[int, int, int], key_chunk: int, splits: int,
            block_m: int, block_n: int, num_warps: int | None, num_stages: int | None,
            qlim: torch.Tensor | None = None, merge_rows: int = 16, gq: int = 1,
            scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One launch over ``programs`` query tiles x head groups of ``gq`` (x ``splits`` key chunks, then the
    combine); q is [1, H, N, D]; returns [1, N, H, D]. ``qlim`` (dense form): int64 [N], each query's key
    count. ``num_warps`` None: 4, or 8 for tiles of 128 rows or more. ``scales``: an e4m3 cache's (k, v)."""
    _, H, N, D = q.shape
    out = torch.empty(1, N, H, D, dtype=q.dtype, device=q.device)
    if not programs or not N:
        return out
    split = splits > 1
    part = torch.empty(splits, N, H, D, dtype=torch.float32, device=q.device) if split else out
    lse = torch.empty(splits, N, H, dtype=torch.float32, device=q.device) if split else out
    dummy = seg if seg is not None else qlim if qlim is not None else out  # (unused pointers of the dense form)
    group = H // k_cache.shape[1]
    if gq < 1 or group % gq or gq & (gq - 1):
        raise ValueError(f"heads per program {gq}: a power of two dividing the {group} query heads per K/V head")
    if num_warps is None:
        num_warps = 8 if block_m * gq >= 128 else 4
    _pool_attention_kernel[(programs, H // gq, splits)](
        q, k_cache, v_cache, out, dummy, dummy if tiles is None else tiles, part, lse,
        *(scales or (lse, lse)),
        q.stride(2), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(1), out.stride(2),
        *(scales[0].stride()[:2] if scales else (0, 0)),
        1.0 / math.sqrt(D) * 1.4426950408889634, group, *dense, key_chunk, N * H, H,
        D=D, BM=block_m, BN=block_n, IEEE=q.dtype == torch.float32 or _INTERPRET, DENSE=seg is None,
        SPLIT=split, QLIM=qlim is not None and seg is None, GQ=gq, META_FIRST=int(META_FIRST),
        KV8=int(scales is not None), num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}), **pdl(q.device, "attention"),
    )
    if split:  # merge_rows (token, head) pairs per program of the merge
        _combine_kernel[(triton.cdiv(N * H, merge_rows),)](part, lse, out, N * H, SPLITS=splits, D=D,
                                                           BR=merge_rows, num_warps=4,
                                                           **pdl(q.device, "attention_combine"))
    return out


def pool_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: torch.Tensor,
                   tiles: torch.Tensor | None = None, block_m: int = POOL_TILE_M, block_n: int | None = None,
                   num_warps: int | None = None, num_stages: int | None = None, key_chunk: int | None = None,
                   splits: int = 1, merge_rows: int = 16, heads_per_program: int | None = None,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.pool_attention``: q [1, H, N, D] (any strides with a
    contiguous last dimension), caches [R, Hkv, T, D], ``seg`` int64 [G, 4]; returns [1, H, N, D] laid out as
    [1, N, H, D] (so the output projection's input is a view). ``tiles`` (int64 [n, 2]: segment, first query;
    from ``pool_tiles``) is built here when not given. ``block_n`` (keys per loop, default 64), ``num_warps``,
    ``num_stages``: launch settings (``benchmarks/test_kernels_bench.py`` compares them; 64 keys and 4 warps
    were fastest at LLaDA-8B shapes on an H200; ``block_m`` must be the ``tiles``' own). ``splits`` > 1 with
    ``key_chunk`` (a multiple of ``block_n``; ``splits * key_chunk`` must cover the longest ``k_len``): each
    program takes one chunk of its segment's keys and a second kernel merges the chunks (flash-decoding); a
    segment's result depends only on its own ``k_len`` and the chunk size, not on the other segments;
    ``merge_rows`` (a power of two) is the (token, head) pairs each merging program takes.
    ``heads_per_program``: query heads of one K/V head that a program takes together, so each K/V tile it loads
    serves them all (grouped-query models; None: ``pool_heads_per_program``); ``num_warps`` None: 4, or 8 for
    tiles of 128 rows (queries x heads) or more. An e4m3 cache comes with its per-head scales ``k_scale`` /
    ``v_scale`` [R, Hkv, T] (``rope_qkv``'s)."""
    kv8 = _check(q, k_cache, v_cache, k_scale, v_scale)
    if q.shape[0] != 1:
        raise ValueError(f"q must be [1, H, N, D], got {tuple(q.shape)}")
    if seg.dim() != 2 or seg.shape[1] != 4 or seg.dtype != torch.int64:
        raise ValueError(f"seg must be int64 [G, 4] (q_start, q_len, row, k_len), got {seg.dtype} {tuple(seg.shape)}")
    block_n = block_n or 64
    if splits > 1 and (key_chunk is None or key_chunk % block_n):
        raise ValueError(f"splits={splits} needs a key_chunk that is a multiple of block_n={block_n}")
    if tiles is None:
        tiles = pool_tiles(seg.cpu(), block_m).to(q.device)
    if merge_rows < 1 or merge_rows & (merge_rows - 1):
        raise ValueError(f"merge_rows={merge_rows} must be a power of two")
    gq = heads_per_program or pool_heads_per_program(q.shape[1], k_cache.shape[1], block_m)
    out = _launch(q, k_cache, v_cache, seg, tiles, tiles.shape[0], (0, 0, 0), key_chunk or 0, splits, block_m,
                  block_n, num_warps, num_stages, merge_rows=merge_rows, gq=gq,
                  scales=(k_scale, v_scale) if kv8 else None)
    return out.transpose(1, 2)


def pool_tile_m(heads: int, kv_heads: int, tiles: int = 0, device: torch.device | None = None) -> int:
    """Queries per program (``block_m``) the engine tiles an iteration's segments in, ``tiles`` the query tiles
    it plans at ``POOL_TILE_M``: ``POOL_TILE_M_GQA`` where each K/V head serves an even number of query heads
    and one head per program would fill a GPU's SMs in one pass (its programs then take 4 heads, 128 rows, and
    load each K/V tile once for them: LLaDA2.0-mini at batch 64 on an H200, `generate` 5.5% faster), else
    ``POOL_TILE_M`` (few programs split the keys: batch 1 keeps its tiles and one head per program, the
    fastest measured there); ``L2PD_POOL_TILE_M`` for every model and batch."""
    if _TILE_M_ENV:
        return _TILE_M_ENV
    if (heads // kv_heads) % 2:
        return POOL_TILE_M
    if device is not None and device.type == "cuda" and tiles * heads <= sm_count(device):
        return POOL_TILE_M
    return POOL_TILE_M_GQA


def pool_heads_per_program(heads: int, kv_heads: int, block_m: int = POOL_TILE_M, split: bool = False) -> int:
    """Query heads of one K/V head that a program of ``pool_attention`` takes together: the largest power of
    two dividing ``heads // kv_heads`` with at most ``POOL_GQA_ROWS`` rows (``block_m`` queries per head) per
    program, ``POOL_GQA_ROWS_SPLIT`` with the keys ``split`` (few programs: more of them pay there), or
    ``L2PD_POOL_GQ`` (1: one head per program, as before). At LLaDA2.0-mini shapes on an H200 (one layer,
    graphed): batch 64 over 768 keys 43 us in 32-query tiles of 4 heads against 78 us for one head per
    program; batch 1, keys split, 2 heads in 16 chunks 6.7 us against 6.6 (768 keys) and 9.5 against 11.3
    (4,096 keys) for one head in 8 (``benchmarks/RESULTS.md``)."""
    group = heads // kv_heads
    want = POOL_GQ or max(1, (POOL_GQA_ROWS_SPLIT if split else POOL_GQA_ROWS) // block_m)
    gq = 1
    while gq * 2 <= want and group % (gq * 2) == 0:
        gq *= 2
    return gq


def pool_split_plan(tiles: int, heads: int, keys: int, device: torch.device, block_n: int = 64,
                    kv_heads: int | None = None, block_m: int = POOL_TILE_M) -> tuple[int, int]:
    """(splits, key_chunk) for the engine's pool attention: ``tiles`` query tiles x ``heads`` programs over a
    pool ``keys`` wide. Split only where one pass leaves SMs idle (fewer programs than SMs: batch 1 to about 2
    at LLaDA-8B shapes), into about one program per SM for one query tile's head groups (``sm_count //
    groups``, at most ``POOL_MAX_SPLITS``: 4 chunks at LLaDA-8B shapes, 8 at LLaDA2.0-mini's with one head a
    program, the fastest of the kernel benchmark at 4,096 keys; 16 with two heads a program in 32-query tiles)
    or ``L2PD_POOL_SPLITS``; (1, 0) on the CPU or with ``L2PD_POOL_SPLIT=0``. The
    engine passes a tile count from its bucketed tokens and rows (``Pack.plan_tiles``), the same for an
    iteration graphed (padded) or not, since the split changes the sums' order. Chunks past a segment's own
    keys are empty and weigh nothing in the merge. ``kv_heads``: a grouped-query model's, whose programs each
    take ``pool_heads_per_program`` heads (of ``block_m`` queries each), fewer with the keys split."""
    if device.type != "cuda" or os.environ.get("L2PD_POOL_SPLIT", "1") == "0":
        return 1, 0
    sms = sm_count(device)
    kv_heads = kv_heads or heads
    if tiles * (heads // pool_heads_per_program(heads, kv_heads, block_m)) > sms:  # one pass fills the SMs
        return 1, 0
    groups = heads // pool_heads_per_program(heads, kv_heads, block_m, split=True)  # programs per query tile
    splits = min(POOL_SPLITS or min(POOL_MAX_SPLITS, sms // groups), triton.cdiv(keys, block_n))
    if splits < 2:
        return 1, 0
    chunk = triton.cdiv(triton.cdiv(keys, splits), block_n) * block_n
    return triton.cdiv(keys, chunk), chunk


def split_plan(programs: int, keys: int, sms: int, block_n: int = 64, waves: int = 4) -> tuple[int, int]:
    """(splits, key_chunk) for ``programs`` query tiles x heads over ``keys`` keys: split the keys until about
    ``waves`` programs per SM run, in chunks of whole ``block_n`` loops (no split when the grid is full)."""
    splits = max(1, min(triton.cdiv(keys, block_n), triton.cdiv(waves * sms, max(programs, 1))))
    chunk = triton.cdiv(triton.cdiv(keys, splits), block_n) * block_n
    return triton.cdiv(keys, chunk), chunk


def split_pays(batch: int, queries: int, heads: int, keys: int, device: torch.device, block_m: int = 32) -> bool:
    """Whether ``cached_attention`` beats SDPA's one pass: long canvases (``SPLIT_MIN_KEYS``) with a grid small
    enough that the keys split at least four ways (at LLaDA-8B shapes on an H200: batch 1 to about 4)."""
    if keys < SPLIT_MIN_KEYS:
        return False
    return split_plan(batch * triton.cdiv(queries, block_m) * heads, keys, sm_count(device))[0] >= 4


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_m: int = 32,
                     block_n: int = 64, splits: int | None = None, num_warps: int = 4,
                     key_limit: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.cached_attention``: a cached step's queries q [B, H, L, D]
    (laid out [B, L, H, D], as ``rope_qkv`` returns them) over every key of their row of the cache
    [B, Hkv, T, D], without a mask; or with ``key_limit`` (int64 [B, L], each at least 1) query (b, i) over
    the first ``key_limit[b, i]`` keys (a block-causal step: keys up to its block's end). Few queries over a
    long canvas leave most of the GPU idle in one program per query tile and head, so the keys are split into
    chunks (``split_plan``; ``splits`` forces a count) and the chunks merged. Returns [B, H, L, D] laid out
    [B, L, H, D]. An e4m3 cache comes with its scales ``k_scale``/``v_scale`` [B, Hkv, T]."""
    kv8 = _check(q, k_cache, v_cache, k_scale, v_scale)
    B, H, L, D = q.shape
    T = k_cache.shape[2]
    if k_cache.shape[0] != B:
        raise ValueError(f"the cache holds {k_cache.shape[0]} rows for {B} query rows")
    if q.transpose(1, 2).stride(1) != H * D or (B > 1 and q.stride(0) != L * H * D) or q.stride(3) != 1:
        raise ValueError("q must be laid out [B, L, H, D] (rope_qkv's output)")
    per_row = triton.cdiv(L, block_m)
    if splits is None:
        splits, chunk = split_plan(B * per_row * H, T, sm_count(q.device), block_n)
    else:
        chunk = triton.cdiv(triton.cdiv(T, splits), block_n) * block_n
        splits = triton.cdiv(T, chunk)
    if key_limit is not None and (key_limit.shape != (B, L) or key_limit.dtype != torch.int64):
        raise ValueError(f"key_limit must be int64 [{B}, {L}], got {key_limit.dtype} {tuple(key_limit.shape)}")
    flat = q.transpose(1, 2).reshape(1, B * L, H, D).transpose(1, 2)  # a view
    qlim = None if key_limit is None else key_limit.contiguous().view(-1)
    out = _launch(flat, k_cache, v_cache, None, None, B * per_row, (L, T, per_row), chunk, splits, block_m,
                  block_n, num_warps, None, qlim, scales=(k_scale, v_scale) if kv8 else None)
    return out.view(B, L, H, D).transpose(1, 2)


def pool_tiles(seg: torch.Tensor, block_m: int = POOL_TILE_M) -> torch.Tensor:
    """(segment, first query) of each program: ``ceil(q_len / block_m)`` tiles per segment (CPU int64)."""
    rows = []
    for g, q_len in enumerate(seg[:, 1].tolist()):
        rows.extend((g, t) for t in range(0, q_len, block_m))
    return torch.tensor(rows, dtype=torch.int64).view(-1, 2)
