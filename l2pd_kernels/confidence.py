"""confidence: logits [B, L, V] -> (token int64 [B, L], softmax probability of that token fp32 [B, L]), and
with ``stats`` the softmax's top-1 minus top-2 margin and its entropy (the richer filter inputs).

One pass over the vocabulary. Each row is split into chunks handled by separate programs (so that B * L = 32
rows still occupy every SM); a program keeps an online max / sum of exponentials and the running best
(lowest index on ties) over its chunk, per lane for greedy decoding (no reduction inside the loop) or per
tile for sampling, and a second tiny kernel merges the chunks of a row (skipped when a row is one chunk).
The statistics ride the same pass: the second-largest logit, and sum(exp(x - m) * (x - m)) rescaled with the
sum of exponentials, so that entropy = log(sum) - that / sum.
Semantics (NaN, inf, ties, sampling) are those of ``l2pd_kernels.reference.confidence``.
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from .device import pdl, pdl_wait, sm_count

_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_U32 = 0xFFFFFFFF


@triton.jit
def _mix32(x):
    # lowbias32 on uint32 values held in int64 (the same arithmetic as the reference)
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _clean(x, offs, suppress):
    # fp32 logits with the documented rules: NaN and the suppressed id count as -inf, +inf as the largest
    # finite value
    x = x.to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    x = tl.minimum(x, _FLT_MAX)
    return tl.where(offs == suppress, float("-inf"), x)


@triton.jit
def _load_tile(base, offs, hi, stride_v, suppress):
    # one tile that may run past the chunk: positions from ``hi`` on read -inf
    x = tl.load(base + offs.to(tl.int64) * stride_v, mask=offs < hi, other=float("-inf"))
    return _clean(x, offs, suppress)


@triton.jit
def _gumbel_score(x, offs, row_h, inv_temp):
    # Gumbel-max score from the counter hash of (row, index): the same noise as the reference
    h = _mix32(offs.to(tl.int64) + row_h)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return x * inv_temp - tl.log(-tl.log(u))


@triton.jit
def _lane_update(x, offs, m_v, s_v, idx_v, t_v, m2_v, STATS: tl.constexpr):
    # one element per lane: running max (with its first index) and the sum of exponentials relative to it,
    # with one exponential per element: exp(-|x - m|) is the new term or the rescale factor. STATS: also the
    # second-largest value and t = sum exp(x - m) * (x - m); products with a zero weight count as 0 (no NaN
    # from 0 * inf)
    gt = x > m_v
    d = x - m_v
    e = tl.exp(-tl.abs(d))
    if STATS:
        t_v = tl.where(gt, tl.where(e > 0, e * (t_v - d * s_v), 0.0), t_v + tl.where(e > 0, e * d, 0.0))
        m2_v = tl.where(gt, m_v, tl.maximum(m2_v, x))
    s_v = tl.where(gt, s_v * e + 1.0, s_v + e)
    return tl.where(gt, x, m_v), s_v, tl.where(gt, offs, idx_v), t_v, m2_v


@triton.jit
def _stats_out(m, s, t, second):
    # (margin, entropy) from a row's max, sum of exponentials, t and second-largest value; (0, 0) without a
    # finite logit
    none = m == float("-inf")
    s1 = tl.where(none, 1.0, s)
    margin = (1.0 - tl.exp(second - tl.where(none, 0.0, m))) / s1
    entropy = tl.log(s1) - t / s1
    return tl.where(none, 0.0, margin), tl.where(none, 0.0, entropy)


@triton.jit
def _partial_kernel(
    logits_ptr, part_ptr, token_ptr, prob_ptr, margin_ptr, entropy_ptr,
    L, V, stride_b, stride_l, stride_v,
    chunk, n_split, seed_h, inv_temp, suppress,
    SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr, LANES: tl.constexpr, STAGES: tl.constexpr,
    DIRECT: tl.constexpr, STATS: tl.constexpr, NP: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // L
    l_ = row % L
    base = logits_ptr + b.to(tl.int64) * stride_b + l_.to(tl.int64) * stride_l
    lo = split * chunk
    hi = tl.minimum(lo + chunk, V)
    row_h = _mix32(row.to(tl.int64) + seed_h)
    if LANES and not SAMPLE:
        # greedy with per-lane statistics, reduced across lanes once at the end: no reduction (and no
        # barrier) inside the loop. The running max starts at -FLT_MAX with an empty sum, so -inf logits
        # add exp(-inf) = 0 without a special case; a lane that saw only -inf keeps its first index.
        lane = tl.arange(0, BLOCK_V)
        m_v = tl.full((BLOCK_V,), -_FLT_MAX, tl.float32)
        s_v = tl.zeros((BLOCK_V,), tl.float32)
        t_v = tl.zeros((BLOCK_V,), tl.float32)
        m2_v = tl.full((BLOCK_V,), -_FLT_MAX, tl.float32)
        idx_v = lo + lane
        full_hi = lo + (hi - lo) // BLOCK_V * BLOCK_V
        for start in tl.range(lo, full_hi, BLOCK_V, num_stages=STAGES):
            offs = start + lane
            x = _clean(tl.load(base + offs.to(tl.int64) * stride_v), offs, suppress)  # a full tile: no mask
            m_v, s_v, idx_v, t_v, m2_v = _lane_update(x, offs, m_v, s_v, idx_v, t_v, m2_v, STATS)
        if full_hi < hi:
            offs = full_hi + lane
            m_v, s_v, idx_v, t_v, m2_v = _lane_update(_load_tile(base, offs, hi, stride_v, suppress), offs, m_v,
                                                      s_v, idx_v, t_v, m2_v, STATS)
        m = tl.max(m_v, 0)
        scale = tl.exp(m_v - m)
        s = tl.sum(s_v * scale, 0)
        best_idx = tl.min(tl.where(m_v == m, idx_v, 2147483647), 0)
        t = 0.0
        second = -_FLT_MAX
        if STATS:
            t = tl.sum(tl.where(scale > 0, scale * (t_v + (m_v - m) * s_v), 0.0), 0)
            # the second largest: the winning lane's own second, or another lane's max
            second = tl.max(tl.where(idx_v == best_idx, m2_v, m_v), 0)
        m = tl.where(s == 0.0, float("-inf"), m)  # no finite logit in the chunk
        best = m
        best_logit = m
    else:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        best = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.zeros((), tl.int32) + lo
        best_logit = tl.full((), float("-inf"), tl.float32)
        t = tl.zeros((), tl.float32)
        second = tl.full((), float("-inf"), tl.float32)
        for start in tl.range(lo, hi, BLOCK_V, num_stages=STAGES):
            offs = start + tl.arange(0, BLOCK_V)
            x = _load_tile(base, offs, hi, stride_v, suppress)
            # online softmax statistics, reduced over the tile at every iteration
            x_max = tl.max(x, 0)
            m_new = tl.maximum(m, x_max)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale = tl.exp(m - safe)
            ez = tl.exp(x - safe)  # one exponential per element, shared by the sum and the entropy term
            if STATS:
                t = tl.where(scale > 0, scale * (t + (m - safe) * s), 0.0) + tl.sum(tl.where(x > float("-inf"),
                                                                                        ez * (x - safe), 0.0), 0)
                first_max = tl.min(tl.where(x == x_max, offs, 2147483647), 0)
                t_second = tl.max(tl.where(offs == first_max, float("-inf"), x), 0)
                second = tl.maximum(tl.maximum(second, tl.minimum(m, x_max)), t_second)
            s = s * scale + tl.sum(ez, 0)
            m = m_new
            if SAMPLE:
                score = _gumbel_score(x, offs, row_h, inv_temp)
                t_best = tl.max(score, 0)
                t_idx = tl.min(tl.where(score == t_best, offs, 2147483647), 0)  # lowest index among the maxima
                t_logit = tl.sum(tl.where(offs == t_idx, x, 0.0), 0)
            else:  # greedy: the best score is the logit itself, no gather needed
                t_best = tl.max(x, 0)
                t_idx = tl.min(tl.where(x == t_best, offs, 2147483647), 0)
                t_logit = t_best
            better = t_best > best
            best_idx = tl.where(better, t_idx, best_idx)
            best_logit = tl.where(better, t_logit, best_logit)
            best = tl.where(better, t_best, best)
    if DIRECT:
        # one chunk per row: the merge's arithmetic for a single split, without its launch
        safe = tl.where(m == float("-inf"), 0.0, m)
        tl.store(token_ptr + row, best_idx.to(tl.int64))
        tl.store(prob_ptr + row, tl.where(m == float("-inf"), 0.0, tl.exp(best_logit - safe) / s))
        if STATS:
            margin, entropy = _stats_out(m, s, t, second)
            tl.store(margin_ptr + row, margin)
            tl.store(entropy_ptr + row, entropy)
    else:
        out = part_ptr + (row * n_split + split) * NP
        tl.store(out + 0, m)
        tl.store(out + 1, s)
        tl.store(out + 2, best)
        tl.store(out + 3, best_idx.to(tl.float32))  # exact: V < 2**24
        tl.store(out + 4, best_logit)
        if STATS:
            tl.store(out + 5, t)
            tl.store(out + 6, second)


@triton.jit
def _merge_kernel(part_ptr, token_ptr, prob_ptr, margin_ptr, entropy_ptr, n_split, SPLIT_P2: tl.constexpr,
                  STATS: tl.constexpr, NP: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, SPLIT_P2)
    ok = offs < n_split
    base = part_ptr + (row * n_split + offs) * NP
    m = tl.load(base + 0, mask=ok, other=float("-inf"))
    s = tl.load(base + 1, mask=ok, other=0.0)
    best = tl.load(base + 2, mask=ok, other=float("-inf"))
    idx = tl.load(base + 3, mask=ok, other=0.0)
    logit = tl.load(base + 4, mask=ok, other=float("-inf"))
    gm = tl.max(m, 0)
    safe = tl.where(gm == float("-inf"), 0.0, gm)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - safe)), 0)
    gbest = tl.max(best, 0)
    # the first split holding the best score: splits are in vocabulary order, so ties go to the lowest index
    first = tl.min(tl.where(best == gbest, offs, SPLIT_P2), 0)
    first = tl.where(gbest == float("-inf"), 0, first)
    tok = tl.sum(tl.where(offs == first, idx, 0.0), 0).to(tl.int64)
    lg = tl.sum(tl.where(offs == first, logit, 0.0), 0)
    p = tl.where(gm == float("-inf"), 0.0, tl.exp(lg - safe) / total)
    tl.store(token_ptr + row, tok)
    tl.store(prob_ptr + row, p)
    if STATS:
        t = tl.load(base + 5, mask=ok, other=0.0)
        sec = tl.load(base + 6, mask=ok, other=float("-inf"))
        sc = tl.exp(m - safe)
        gt = tl.sum(tl.where(sc > 0, sc * (t + (m - safe) * s), 0.0), 0)
        # the second largest: the split holding the maximum gives its own second, the others their max
        wsplit = tl.min(tl.where(m == gm, offs, SPLIT_P2), 0)
        gsecond = tl.max(tl.where(offs == wsplit, sec, m), 0)
        margin, entropy = _stats_out(gm, total, gt, gsecond)
        tl.store(margin_ptr + row, margin)
        tl.store(entropy_ptr + row, entropy)


# Launch configuration of the partial kernel; ``benchmarks/confidence_sweep.py`` measures the alternatives.
# ``programs_per_sm``: how many (row, chunk) programs per SM the vocabulary split aims for; ``stages``: the
# software-pipelining depth of the tile loop. L2PD_CONFIDENCE_TUNING='{"block_v": 4096, ...}' overrides keys.
TUNING = {"block_v": 2048, "num_warps": 4, "lanes": True, "stages": 4, "programs_per_sm": 1}
TUNING.update(json.loads(os.environ.get("L2PD_CONFIDENCE_TUNING") or "{}"))
if set(TUNING) != {"block_v", "num_warps", "lanes", "stages", "programs_per_sm"}:
    raise ValueError(f"L2PD_CONFIDENCE_TUNING: unknown keys in {sorted(TUNING)}")


def confidence(
    logits: torch.Tensor, temperature: float = 0.0, seed: int | None = None, suppress: int | None = None,
    block_v: int | None = None, num_warps: int | None = None, lanes: bool | None = None,
    stages: int | None = None, programs_per_sm: int | None = None, stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Triton version of ``l2pd_kernels.reference.confidence`` (same arguments and results; ``stats`` adds
    margin and entropy from the same pass over the vocabulary).

    ``block_v`` (vocabulary tile), ``num_warps``, ``lanes`` (greedy: per-lane statistics instead of a
    reduction per tile), ``stages`` and ``programs_per_sm`` tune the launch; they default to ``TUNING`` and
    never change the results beyond rounding of the probability.
    """
    block_v = TUNING["block_v"] if block_v is None else block_v
    num_warps = TUNING["num_warps"] if num_warps is None else num_warps
    lanes = TUNING["lanes"] if lanes is None else lanes
    stages = TUNING["stages"] if stages is None else stages
    programs_per_sm = TUNING["programs_per_sm"] if programs_per_sm is None else programs_per_sm
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits dtype {logits.dtype} is not supported (fp32, bf16, fp16)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature > 0 and seed is None:
        raise ValueError("sampling (temperature > 0) needs a seed")
    B, L, V = logits.shape
    if V >= 2**24:
        raise ValueError(f"vocabulary size {V} is too large (limit 2**24)")
    rows = B * L
    token = torch.empty(B, L, dtype=torch.int64, device=logits.device)
    prob = torch.empty(B, L, dtype=torch.float32, device=logits.device)
    margin = entropy = prob  # never written without stats
    if stats:
        margin, entropy = torch.empty_like(prob), torch.empty_like(prob)
    result = (token, prob, margin, entropy) if stats else (token, prob)
    if rows == 0:
        return result
    block_v = min(block_v, triton.next_power_of_2(V))
    max_split = triton.cdiv(V, block_v)
    n_split = max(1, min(max_split, triton.cdiv(programs_per_sm * sm_count(logits.device), rows)))
    chunk = triton.cdiv(triton.cdiv(V, n_split), block_v) * block_v
    n_split = triton.cdiv(V, chunk)
    direct = n_split == 1
    # a direct launch writes token/prob itself and never touches the partials buffer (prob stands in for it)
    n_part = 7 if stats else 5
    part = prob if direct else torch.empty(rows * n_split * n_part, dtype=torch.float32, device=logits.device)
    seed_h = 0
    if temperature > 0:
        seed_h = int(_mix32_host(seed & _U32))
    _partial_kernel[(rows, n_split)](
        logits, part, token, prob, margin, entropy, L, V, logits.stride(0), logits.stride(1), logits.stride(2),
        chunk, n_split, seed_h, 1.0 / temperature if temperature > 0 else 1.0,
        -1 if suppress is None else int(suppress),
        SAMPLE=temperature > 0, BLOCK_V=block_v, LANES=bool(lanes), STAGES=stages,
        DIRECT=direct, STATS=stats, NP=n_part, num_warps=num_warps, **pdl(logits.device, "confidence"),
    )
    if not direct:
        _merge_kernel[(rows,)](part, token, prob, margin, entropy, n_split,
                               SPLIT_P2=triton.next_power_of_2(n_split), STATS=stats, NP=n_part,
                               **pdl(logits.device, "confidence_merge"))
    return result


def _mix32_host(x: int) -> int:
    x &= _U32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)
