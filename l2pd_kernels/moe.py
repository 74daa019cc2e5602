"""fused_moe: the routed experts of a mixture-of-experts MLP as two grouped GEMMs.

Few pairs (a decode step at small batch): no sort. Per column tile, a few programs (about four per SM in all)
find the touched experts from a histogram of the ids and take them in turn; for each, the program scans the ids
for the expert's pairs (a cumulative sum gives each its rank). No program is launched per idle expert.
Many pairs: the (token, expert) pairs are sorted by expert and each expert's run is padded to a multiple of ``BLOCK_M``
(``align``: two small kernels, no host read, so a CUDA graph can hold it). Each program of the first kernel takes
``BLOCK_M`` pairs of one expert and a column tile of its gate and up projections and writes ``silu(gate) * up``;
the second multiplies those rows by the expert's down projection and writes each pair's row in the input dtype;
a third weights a token's k rows by their routing weights and sums them in fp32 in a fixed order (expert slot 0
first), so the result does not depend on which tokens share the batch. Programs of padding blocks (experts
without tokens take none) return at once. Rounding follows ``l2pd_kernels.reference.fused_moe``: gate, up, their
product and the down projection are each rounded to the input dtype. On Hopper the sorted path loads the routed
experts' weight tiles by TMA, and so does the scan path inside a CUDA graph (``TMA``, ``_moe_tma``); its eager
launches load by pointers, with the same bits. e4m3 experts (``scales``, ``l2pd.quantize``'s): their tiles are
widened to the activations' dtype in registers, or (``a8``) multiplied against e4m3 rows on FP8 tensor cores.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .device import TensorDescriptor, capturing, pdl, pdl_wait, sm_count, tma_addressable, tma_capable
from .reference import ExpertRows

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``l2pd_kernels.reference.moe_align``: (pair index per sorted slot [L], padding = N * k;
    expert per block [L / block_m], -1 = unused), in two launches, no host read, so a CUDA graph can hold it.
    Up to ``ALIGN_CHUNKED_PAIRS`` pairs, one program per expert (count its pairs; then place them, in pair
    order, after the padded runs of the experts before it); from there, programs over chunks of the pairs, each
    reading its own pairs rather than all of them (each chunk's count per expert; then each chunk places its
    pairs after the padded runs of the experts before theirs and the same expert's pairs of the chunks before
    it, so in pair order too). At 256 experts on an H200, graphed: 2,048 pairs 5.4 us per expert against 8.6 in
    chunks; 16,384 pairs (batch 64 of LLaDA2.0-mini) 25.4 against 17.9; 32,768 pairs 47.1 against 25.1."""
    flat = ids.reshape(-1).contiguous()
    pairs = flat.numel()
    bound = pairs + min(num_experts, pairs) * (block_m - 1)
    length = triton.cdiv(bound, block_m) * block_m
    e_p = triton.next_power_of_2(num_experts)
    sorted_pairs = torch.empty(length, dtype=torch.int64, device=flat.device)
    block_expert = torch.empty(length // block_m, dtype=torch.int64, device=flat.device)
    if pairs < ALIGN_CHUNKED_PAIRS:
        chunk = min(1024, triton.next_power_of_2(pairs))
        counts = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
        _align_count_kernel[(num_experts,)](flat, counts, pairs, CHUNK=chunk, num_warps=4,
                                            **pdl(flat.device, "moe_align"))
        _align_place_kernel[(num_experts,)](flat, counts, sorted_pairs, block_expert, pairs, num_experts, length,
                                            BLOCK_M=block_m, CHUNK=chunk, E_P=e_p, NB=128, num_warps=4,
                                            **pdl(flat.device, "moe_align"))
        return sorted_pairs, block_expert
    chunk = max(ALIGN_SUB, triton.next_power_of_2(triton.cdiv(pairs, ALIGN_CHUNKS)))
    chunks = triton.cdiv(pairs, chunk)
    hist = torch.empty(chunks, e_p, dtype=torch.int32, device=flat.device)
    _align_hist_kernel[(chunks,)](flat, hist, pairs, CHUNK=chunk, SUB=ALIGN_SUB, E_P=e_p, num_warps=4,
                                  **pdl(flat.device, "moe_align"))
    _align_scatter_kernel[(chunks,)](flat, hist, sorted_pairs, block_expert, pairs, num_experts, length, chunks,
                                     BLOCK_M=block_m, CHUNK=chunk, SUB=ALIGN_SUB, E_P=e_p, NB=128, num_warps=4,
                                     **pdl(flat.device, "moe_align"))
    return sorted_pairs, block_expert


ALIGN_CHUNKED_PAIRS = 8192  # from this many pairs, programs over chunks of them (between 2,048 and 16,384 measured)
ALIGN_CHUNKS = 128  # about this many chunks of pairs (programs) at most
ALIGN_SUB = 32  # pairs per step of a chunk: a [SUB, experts] one-hot tile


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, P, CHUNK: tl.constexpr, PDL: tl.constexpr = 0):
    """counts[e]: how many pairs go to expert e (program e)."""
    pdl_wait(PDL)
    e = tl.program_id(0)
    total = 0
    for c0 in range(0, P, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        total += tl.sum((tl.load(ids_ptr + offs, mask=offs < P, other=-1) == e).to(tl.int32), 0)
    tl.store(counts_ptr + e, total)


@triton.jit
def _align_place_kernel(ids_ptr, counts_ptr, pairs_ptr, block_expert_ptr, P, E, LENGTH, BLOCK_M: tl.constexpr,
                        CHUNK: tl.constexpr, E_P: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr = 0):
    """Program e writes expert e's pairs in order from its run's start (the padded runs of experts 0..e-1), then
    its run's padding and its blocks' expert; program 0 also fills the slots past the last run."""
    pdl_wait(PDL)
    e = tl.program_id(0)
    idx = tl.arange(0, E_P)
    counts = tl.load(counts_ptr + idx, mask=idx < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    mine = idx == e
    end = tl.sum(tl.where(mine, ends, 0), 0)
    width = tl.sum(tl.where(mine, padded, 0), 0)
    count = tl.sum(tl.where(mine, counts, 0), 0)
    start = end - width
    placed = start
    for c0 in range(0, P, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        hit = tl.load(ids_ptr + offs, mask=offs < P, other=-1) == e
        rank = tl.cumsum(hit.to(tl.int32), 0)
        tl.store(pairs_ptr + placed + rank - 1, offs.to(tl.int64), mask=hit)
        placed += tl.sum(hit.to(tl.int32), 0)
    _run_tail(pairs_ptr, block_expert_ptr, e, start, count, end, P, BLOCK_M, NB)
    if e == 0:
        _past_runs(pairs_ptr, block_expert_ptr, tl.max(ends, 0), P, LENGTH, BLOCK_M, NB)


@triton.jit
def _run_tail(pairs_ptr, block_expert_ptr, e, start, count, end, P, BLOCK_M: tl.constexpr, NB: tl.constexpr):
    """Expert e's run [start, end) holding ``count`` pairs: its padding slots (P) and its blocks' expert."""
    pad = start + count + tl.arange(0, BLOCK_M)
    tl.store(pairs_ptr + pad, tl.full((BLOCK_M,), 0, tl.int64) + P, mask=pad < end)
    for b0 in range(start, end, NB * BLOCK_M):
        b = b0 // BLOCK_M + tl.arange(0, NB)
        tl.store(block_expert_ptr + b, tl.full((NB,), 0, tl.int64) + e, mask=b * BLOCK_M < end)


@triton.jit
def _past_runs(pairs_ptr, block_expert_ptr, last, P, LENGTH, BLOCK_M: tl.constexpr, NB: tl.constexpr):
    """The slots past the last run (P) and their blocks (-1)."""
    for s0 in range(last, LENGTH, NB * BLOCK_M):
        slot = s0 + tl.arange(0, NB * BLOCK_M)
        tl.store(pairs_ptr + slot, tl.full((NB * BLOCK_M,), 0, tl.int64) + P, mask=slot < LENGTH)
    for b0 in range(last, LENGTH, NB * BLOCK_M):
        b = b0 // BLOCK_M + tl.arange(0, NB)
        tl.store(block_expert_ptr + b, tl.full((NB,), -1, tl.int64), mask=b * BLOCK_M < LENGTH)


@triton.jit
def _align_hist_kernel(ids_ptr, hist_ptr, P, CHUNK: tl.constexpr, SUB: tl.constexpr, E_P: tl.constexpr,
                        PDL: tl.constexpr = 0):
    """hist[c, e]: how many of chunk c's pairs go to expert e (program c)."""
    pdl_wait(PDL)
    c = tl.program_id(0)
    experts = tl.arange(0, E_P)
    counts = tl.zeros((E_P,), dtype=tl.int32)
    for s0 in range(0, CHUNK, SUB):
        offs = c * CHUNK + s0 + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + c * E_P + experts, counts)


@triton.jit
def _align_scatter_kernel(ids_ptr, hist_ptr, pairs_ptr, block_expert_ptr, P, E, LENGTH, C, BLOCK_M: tl.constexpr,
                        CHUNK: tl.constexpr, SUB: tl.constexpr, E_P: tl.constexpr, NB: tl.constexpr,
                        PDL: tl.constexpr = 0):
    """Program c places chunk c's pairs: expert e's from its run's start (the padded runs of experts 0..e-1)
    plus its pairs in chunks 0..c-1, in pair order (a running count per expert over steps of SUB pairs); then
    the runs' padding and blocks' experts of experts c, c + C, ...; program 0 also fills the slots past the
    last run."""
    pdl_wait(PDL)
    c = tl.program_id(0)
    experts = tl.arange(0, E_P)
    counts = tl.zeros((E_P,), dtype=tl.int32)
    base = tl.zeros((E_P,), dtype=tl.int32)  # this chunk's first slot per expert, less the run's start
    for c2 in range(0, C):
        row = tl.load(hist_ptr + c2 * E_P + experts)
        counts += row
        base += tl.where(c2 < c, row, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    base += ends - padded
    for s0 in range(0, CHUNK, SUB):
        offs = c * CHUNK + s0 + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
        hot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [SUB, E_P]: a pair's expert
        slot = tl.sum(hot * (tl.cumsum(hot, 0) - 1 + base[None, :]), 1)
        tl.store(pairs_ptr + slot, offs.to(tl.int64), mask=offs < P)
        base += tl.sum(hot, 0)
    for e in range(c, E, C):  # expert e's padding and blocks
        mine = experts == e
        end = tl.sum(tl.where(mine, ends, 0), 0)
        start = end - tl.sum(tl.where(mine, padded, 0), 0)
        count = tl.sum(tl.where(mine, counts, 0), 0)
        _run_tail(pairs_ptr, block_expert_ptr, e, start, count, end, P, BLOCK_M, NB)
    if c == 0:
        _past_runs(pairs_ptr, block_expert_ptr, tl.max(ends, 0), P, LENGTH, BLOCK_M, NB)


@triton.jit
def _gate_up_tile(x_ptr, w_base, act_ptr, pair, tok, valid, D, INTER, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr = 0,
                  row0=0, s_base=0, FP8: tl.constexpr = 0, xs_ptr=0):
    """Rows ``pair`` of act = silu(x[tok] @ gate.T) * (x[tok] @ up.T), one column tile, for the experts' packed
    gate|up weight at ``w_base``; with ``TMA``, ``w_base`` is a descriptor of all the experts' packed weights
    [E * 2I, D] and the expert's start at row ``row0`` (rows past the expert's columns read its up half or the
    next expert's weight, and make columns that are not stored). ``FP8``: e4m3 weights, their channel scales at
    ``s_base`` (``_gate_up_tile_fp8``; 2: x e4m3 too, its row scales at ``xs_ptr``)."""
    if FP8:
        _gate_up_tile_fp8(x_ptr, w_base, s_base, act_ptr, pair, tok, valid, D, INTER, UPCAST, PREC, BLOCK_M,
                          BLOCK_N, BLOCK_K, TMA, row0, xs_ptr, FP8)
    else:
        _gate_up_tile_half(x_ptr, w_base, act_ptr, pair, tok, valid, D, INTER, UPCAST, PREC, BLOCK_M, BLOCK_N,
                           BLOCK_K, TMA, row0)


@triton.jit
def _mac_fp8(acc, w, a, UPCAST: tl.constexpr, FP8: tl.constexpr, PREC: tl.constexpr):
    """acc + w @ a.T for an e4m3 weight tile w [BLOCK_N, BLOCK_K] and rows a [BLOCK_M, BLOCK_K]: w widened to a's
    dtype (FP8 = 1) or both e4m3 (2); with UPCAST (the interpreter) both in fp32."""
    if UPCAST:
        a, w = a.to(tl.float32), w.to(tl.float32)
    elif FP8 == 1:
        w = w.to(a.dtype)
    return tl.dot(w, tl.trans(a), acc, input_precision=PREC)


@triton.jit
def _gate_up_tile_fp8(x_ptr, w_base, s_base, act_ptr, pair, tok, valid, D, INTER, UPCAST: tl.constexpr,
                      PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      TMA: tl.constexpr, row0, xs_ptr, FP8: tl.constexpr):
    """``_gate_up_tile`` for e4m3 weights: each weight tile widened in registers to x's dtype (exact) and taken
    as the left operand (w @ x.T: a tensor-core operand may come from registers only on that side), the sums
    scaled by the channels' scales in fp32, then rounded as the half-precision tile rounds. ``FP8`` = 2: x's
    rows are e4m3 as well (row scales at ``xs_ptr``): e4m3 products, nothing widened, each sum times its row's
    scale, then its channel's (``reference.linear_w8a8``'s order)."""
    tok = tl.where(valid, tok, 0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(x_ptr + tok[:, None] * D + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        if TMA:
            bg = w_base.load([row0 + n0, k0])
            bu = w_base.load([row0 + INTER + n0, k0])
        else:
            wmask = n_ok[:, None] & k_ok[None, :]
            bg = tl.load(w_base + offs_n[:, None] * D + kk[None, :], mask=wmask, other=0.0)
            bu = tl.load(w_base + (INTER + offs_n[:, None]) * D + kk[None, :], mask=wmask, other=0.0)
        acc_g = _mac_fp8(acc_g, bg, a, UPCAST, FP8, PREC)
        acc_u = _mac_fp8(acc_u, bu, a, UPCAST, FP8, PREC)
    if FP8 == 2:
        xr = tl.load(xs_ptr + tok, mask=valid, other=0.0)
        acc_g, acc_u = acc_g * xr[None, :], acc_u * xr[None, :]
    sg = tl.load(s_base + offs_n, mask=n_ok, other=0.0)
    su = tl.load(s_base + INTER + offs_n, mask=n_ok, other=0.0)
    dt = act_ptr.dtype.element_ty
    g = tl.trans(acc_g * sg[:, None]).to(dt).to(tl.float32)
    u = tl.trans(acc_u * su[:, None]).to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(act_ptr + pair[:, None] * INTER + offs_n[None, :], (s * u).to(dt), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _gate_up_tile_half(x_ptr, w_base, act_ptr, pair, tok, valid, D, INTER, UPCAST: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       TMA: tl.constexpr, row0):
    tok = tl.where(valid, tok, 0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(x_ptr + tok[:, None] * D + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        if TMA:  # one copy per tile (K past D reads zeros)
            bg = tl.trans(w_base.load([row0 + n0, k0]))
            bu = tl.trans(w_base.load([row0 + INTER + n0, k0]))
        else:
            wmask = k_ok[:, None] & n_ok[None, :]
            bg = tl.load(w_base + offs_n[None, :] * D + kk[:, None], mask=wmask, other=0.0)
            bu = tl.load(w_base + (INTER + offs_n[None, :]) * D + kk[:, None], mask=wmask, other=0.0)
        if UPCAST:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
    dt = act_ptr.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(act_ptr + pair[:, None] * INTER + offs_n[None, :], (s * u).to(dt), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_tile(act_ptr, w_base, out_ptr, pair, valid, D, INTER, UPCAST: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr = 0,
               row0=0, s_base=0, FP8: tl.constexpr = 0, xs_ptr=0):
    """``TMA``: ``w_base`` is a descriptor of all the experts' down weights [E * D, I], the expert's from row
    ``row0``. ``FP8``: e4m3 weights, their channel scales at ``s_base`` (as ``_gate_up_tile_fp8``; 2: act's rows
    e4m3, their scales at ``xs_ptr``)."""
    if FP8:
        _down_tile_fp8(act_ptr, w_base, s_base, out_ptr, pair, valid, D, INTER, UPCAST, PREC, BLOCK_M, BLOCK_N,
                       BLOCK_K, TMA, row0, xs_ptr, FP8)
    else:
        _down_tile_half(act_ptr, w_base, out_ptr, pair, valid, D, INTER, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K,
                        TMA, row0)


@triton.jit
def _down_tile_fp8(act_ptr, w_base, s_base, out_ptr, pair, valid, D, INTER, UPCAST: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   TMA: tl.constexpr, row0, xs_ptr, FP8: tl.constexpr):
    row = tl.where(valid, pair, 0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < INTER
        a = tl.load(act_ptr + row[:, None] * INTER + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        if TMA:
            b = w_base.load([row0 + n0, k0])
        else:
            b = tl.load(w_base + offs_n[:, None] * INTER + kk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
        acc = _mac_fp8(acc, b, a, UPCAST, FP8, PREC)
    if FP8 == 2:
        acc = acc * tl.load(xs_ptr + row, mask=valid, other=0.0)[None, :]
    sc = tl.load(s_base + offs_n, mask=n_ok, other=0.0)
    res = tl.trans(acc * sc[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pair[:, None] * D + offs_n[None, :], res, mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_tile_half(act_ptr, w_base, out_ptr, pair, valid, D, INTER, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr, row0):
    row = tl.where(valid, pair, 0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        a, b = _down_operands(act_ptr, w_base, row, valid, offs_n, n_ok, k0 + offs_k, n0, k0, INTER, UPCAST, TMA,
                              row0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(out_ptr + pair[:, None] * D + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_operands(act_ptr, w_base, row, valid, offs_n, n_ok, kk, n0, k0, INTER, UPCAST: tl.constexpr,
                   TMA: tl.constexpr, row0):
    """One K step's operands of a down tile: the block's rows of act [BLOCK_M, BLOCK_K] and the weight's tile
    transposed [BLOCK_K, BLOCK_N] (by TMA from row ``row0 + n0``, or by pointers)."""
    k_ok = kk < INTER
    a = tl.load(act_ptr + row[:, None] * INTER + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
    if TMA:
        b = tl.trans(w_base.load([row0 + n0, k0]))
    else:
        b = tl.load(w_base + offs_n[None, :] * INTER + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return a, b


@triton.jit
def _down_cols(act_ptr, w_base, out_ptr, pair, valid, D, INTER, UPCAST: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COLS: tl.constexpr,
               TMA: tl.constexpr = 0, row0=0):
    """``_down_tile`` over COLS column tiles in turn (program_id(1) picks the group), as one loop over (column
    tile, K step): the weight's loads stream on without a new pipeline per tile, and the block's rows of act,
    the same for every tile, are read again from near caches. Each tile's sum runs in ``_down_tile``'s order,
    so its bits are the same."""
    row = tl.where(valid, pair, 0)
    ksteps = tl.cdiv(INTER, BLOCK_K)
    first = tl.program_id(1) * COLS
    tiles = tl.minimum(COLS, tl.cdiv(D, BLOCK_N) - first)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles * ksteps):
        n0 = (first + i // ksteps) * BLOCK_N
        k0 = (i % ksteps) * BLOCK_K
        offs_n = n0 + tl.arange(0, BLOCK_N)
        a, b = _down_operands(act_ptr, w_base, row, valid, offs_n, offs_n < D, k0 + offs_k, n0, k0, INTER, UPCAST,
                              TMA, row0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if i % ksteps == ksteps - 1:  # the tile's last K step: store it, start the next
            tl.store(out_ptr + pair[:, None] * D + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=valid[:, None] & (offs_n < D)[None, :])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _scan(ids_ptr, num_pairs, e, PAIRS: tl.constexpr):
    """(pair indices, their rank among expert e's pairs (1-based), how many there are)."""
    offs = tl.arange(0, PAIRS)
    hit = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1) == e
    rank = tl.cumsum(hit.to(tl.int32), 0)
    return offs, tl.where(hit, rank, 0), tl.sum(hit.to(tl.int32), 0)


@triton.jit
def _touched(ids_ptr, num_pairs, PAIRS: tl.constexpr, E_P: tl.constexpr):
    """(which experts the pairs touch [E_P], each one's 1-based slot among them, how many): a histogram of the
    ids, the padding counted in bin 0 and taken off."""
    offs = tl.arange(0, PAIRS)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=0).to(tl.int32)
    bins = tl.arange(0, E_P)
    cnt = tl.histogram(ids, E_P)
    present = tl.where(bins == 0, cnt - (PAIRS - num_pairs), cnt) > 0
    return present, tl.cumsum(present.to(tl.int32), 0), tl.sum(present.to(tl.int32), 0)


@triton.jit
def _slot_expert(present, slot, s, E_P: tl.constexpr):
    """The expert in 0-based slot ``s`` of the touched ones."""
    return tl.sum(tl.where(present & (slot == s + 1), tl.arange(0, E_P), 0), 0).to(tl.int64)


@triton.jit
def _chunk(offs, rank, r0, count, BLOCK_M: tl.constexpr):
    """The pairs of ranks r0 + 1 .. r0 + BLOCK_M as a [BLOCK_M] vector, and which of them exist."""
    want = r0 + 1 + tl.arange(0, BLOCK_M)
    sel = rank[None, :] == want[:, None]
    return tl.sum(tl.where(sel, offs[None, :], 0), 1).to(tl.int64), want <= count


@triton.jit
def _scan_tiles(in_ptr, w_ptr, out_ptr, ids_ptr, num_pairs, pid_m, programs, D, INTER, TOPK: tl.constexpr,
                GATE_UP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, PAIRS: tl.constexpr,
                E_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                TMA: tl.constexpr, s_ptr, FP8: tl.constexpr, xs_ptr):
    """The scan path of either kernel: program ``pid_m`` of ``programs`` takes touched experts pid_m, pid_m +
    programs, ... (no program per idle expert), each expert's pairs found in the ids themselves, BLOCK_M at a
    time. ``TMA``: ``w_ptr`` is a descriptor of the experts' weights stacked by rows. ``FP8``: e4m3 weights,
    their channel scales stacked alike at ``s_ptr`` (2: the rows e4m3 too, their scales at ``xs_ptr``)."""
    present, slot, touched = _touched(ids_ptr, num_pairs, PAIRS, E_P)
    for s in range(pid_m, touched, programs):
        e = _slot_expert(present, slot, s, E_P)
        offs, rank, count = _scan(ids_ptr, num_pairs, e, PAIRS)
        for r0 in range(0, count, BLOCK_M):
            pair, valid = _chunk(offs, rank, r0, count, BLOCK_M)
            if GATE_UP:
                if TMA:
                    _gate_up_tile(in_ptr, w_ptr, out_ptr, pair, pair // TOPK, valid, D, INTER, UPCAST, PREC,
                                  BLOCK_M, BLOCK_N, BLOCK_K, 1, (e * (2 * INTER)).to(tl.int32),
                                  s_ptr + e * (2 * INTER), FP8, xs_ptr)
                else:
                    _gate_up_tile(in_ptr, w_ptr + e * (2 * INTER) * D, out_ptr, pair, pair // TOPK, valid, D,
                                  INTER, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, 0, 0, s_ptr + e * (2 * INTER),
                                  FP8, xs_ptr)
            elif TMA:
                _down_tile(in_ptr, w_ptr, out_ptr, pair, valid, D, INTER, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K,
                           1, (e * D).to(tl.int32), s_ptr + e * D, FP8, xs_ptr)
            else:
                _down_tile(in_ptr, w_ptr + e * D * INTER, out_ptr, pair, valid, D, INTER, UPCAST, PREC, BLOCK_M,
                           BLOCK_N, BLOCK_K, 0, 0, s_ptr + e * D, FP8, xs_ptr)


@triton.jit
def _shared_rows(pid_m, first, n_tok, row0, BLOCK_M: tl.constexpr):
    """The shared expert's program ``pid_m - first`` (one block of BLOCK_M tokens): its tokens, their rows
    (after the routed pairs' rows, from ``row0``), which exist."""
    t = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    return t.to(tl.int64), row0 + t.to(tl.int64), t < n_tok


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, pairs_ptr, expert_ptr, num_pairs, D, INTER, ws_ptr, first_shared, n_tok,
                    s_ptr, ss_ptr, xs_ptr, TOPK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    SCAN: tl.constexpr, PAIRS: tl.constexpr, E_P: tl.constexpr, SHARED_W: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr = 0,
                    FP8: tl.constexpr = 0, PDL: tl.constexpr = 0):
    """Programs from ``first_shared`` on (with SHARED_W) run the shared expert (weights at ``ws_ptr``), a block
    of BLOCK_M tokens each, into the rows after the routed pairs'. ``TMA``: ``w_ptr`` is a descriptor of the
    routed experts' weights [E * 2I, D]; the shared expert's load by pointers. ``FP8``: e4m3 weights, the routed
    experts' channel scales at ``s_ptr`` [E, 2I], the shared expert's at ``ss_ptr`` [2I] (2: x's rows e4m3,
    their scales at ``xs_ptr``)."""
    pdl_wait(PDL)
    pid_m = tl.program_id(0)
    if SHARED_W and pid_m >= first_shared:
        t, row, ok = _shared_rows(pid_m, first_shared, n_tok, num_pairs, BLOCK_M)
        _gate_up_tile(x_ptr, ws_ptr, act_ptr, row, t, ok, D, INTER, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, 0, 0,
                      ss_ptr, FP8, xs_ptr)
    elif SCAN:  # few pairs, no sort
        _scan_tiles(x_ptr, w_ptr, act_ptr, pairs_ptr, num_pairs, pid_m, first_shared, D, INTER, TOPK, True, UPCAST,
                    PREC, PAIRS, E_P, BLOCK_M, BLOCK_N, BLOCK_K, TMA, s_ptr, FP8, xs_ptr)
    else:  # program = a block of one expert's sorted pairs
        e = tl.load(expert_ptr + pid_m).to(tl.int64)
        if e >= 0:
            pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            if TMA:
                _gate_up_tile(x_ptr, w_ptr, act_ptr, pair, pair // TOPK, pair < num_pairs, D, INTER, UPCAST, PREC,
                              BLOCK_M, BLOCK_N, BLOCK_K, 1, (e * (2 * INTER)).to(tl.int32), s_ptr + e * (2 * INTER),
                              FP8, xs_ptr)
            else:
                _gate_up_tile(x_ptr, w_ptr + e * (2 * INTER) * D, act_ptr, pair, pair // TOPK, pair < num_pairs, D,
                              INTER, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, 0, 0, s_ptr + e * (2 * INTER), FP8,
                              xs_ptr)


@triton.jit
def _down_kernel(act_ptr, w_ptr, out_ptr, pairs_ptr, expert_ptr, num_pairs, D, INTER, wd_ptr, first_shared, n_tok,
                 s_ptr, ss_ptr, xs_ptr, UPCAST: tl.constexpr, PREC: tl.constexpr, SCAN: tl.constexpr,
                 PAIRS: tl.constexpr,
                 E_P: tl.constexpr, SHARED_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, TMA: tl.constexpr = 0, COLS: tl.constexpr = 1, FP8: tl.constexpr = 0,
                 PDL: tl.constexpr = 0):
    """As ``_gate_up_kernel``; ``TMA``: ``w_ptr`` a descriptor of the routed experts' weights [E * D, I];
    ``COLS`` > 1 (the sorted path only, not with FP8): each program takes COLS column tiles (``_down_cols``).
    ``FP8``: the scales at ``s_ptr`` [E, D] and ``ss_ptr`` [D] (2: act's rows e4m3, their scales at
    ``xs_ptr``)."""
    pdl_wait(PDL)
    pid_m = tl.program_id(0)
    if SHARED_W and pid_m >= first_shared:
        t, row, ok = _shared_rows(pid_m, first_shared, n_tok, num_pairs, BLOCK_M)
        if COLS > 1:
            _down_cols(act_ptr, wd_ptr, out_ptr, row, ok, D, INTER, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, COLS)
        else:
            _down_tile(act_ptr, wd_ptr, out_ptr, row, ok, D, INTER, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K, 0, 0,
                       ss_ptr, FP8, xs_ptr)
    elif SCAN:
        _scan_tiles(act_ptr, w_ptr, out_ptr, pairs_ptr, num_pairs, pid_m, first_shared, D, INTER, 1, False, UPCAST,
                    PREC, PAIRS, E_P, BLOCK_M, BLOCK_N, BLOCK_K, TMA, s_ptr, FP8, xs_ptr)
    else:
        e = tl.load(expert_ptr + pid_m).to(tl.int64)
        if e >= 0:
            pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
            if COLS > 1 and TMA:
                _down_cols(act_ptr, w_ptr, out_ptr, pair, pair < num_pairs, D, INTER, UPCAST, PREC, BLOCK_M,
                           BLOCK_N, BLOCK_K, COLS, 1, (e * D).to(tl.int32))
            elif COLS > 1:
                _down_cols(act_ptr, w_ptr + e * D * INTER, out_ptr, pair, pair < num_pairs, D, INTER, UPCAST, PREC,
                           BLOCK_M, BLOCK_N, BLOCK_K, COLS)
            elif TMA:
                _down_tile(act_ptr, w_ptr, out_ptr, pair, pair < num_pairs, D, INTER, UPCAST, PREC, BLOCK_M,
                           BLOCK_N, BLOCK_K, 1, (e * D).to(tl.int32), s_ptr + e * D, FP8, xs_ptr)
            else:
                _down_tile(act_ptr, w_ptr + e * D * INTER, out_ptr, pair, pair < num_pairs, D, INTER, UPCAST, PREC,
                           BLOCK_M, BLOCK_N, BLOCK_K, 0, 0, s_ptr + e * D, FP8, xs_ptr)


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, E, scale, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                  E_P: tl.constexpr, GROUPS: tl.constexpr, GROUPS_P: tl.constexpr, KEEP: tl.constexpr,
                  SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_P)
    ok = offs < E
    x = tl.load(logits_ptr + row * E + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = tl.where(ok, 1.0 / (1.0 + tl.exp(-x)), 0.0)
        b = s
        if HAS_BIAS:
            b = s + tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        b = tl.where(ok, b, float("-inf"))
        if GROUPS > 1:  # keep the KEEP groups whose two best biased scores sum highest
            per = E // GROUPS
            grp = offs // per
            gidx = tl.arange(0, GROUPS_P)
            gs = tl.full((GROUPS_P,), float("-inf"), tl.float32)
            for g in tl.static_range(GROUPS):
                mine = tl.where(grp == g, b, float("-inf"))
                best = tl.argmax(mine, 0)
                second = tl.max(tl.where(offs == best, float("-inf"), mine), 0)
                total = tl.max(mine, 0) + tl.where(second > float("-inf"), second, 0.0)
                gs = tl.where(gidx == g, total, gs)
            allowed = offs < 0
            for _ in tl.static_range(KEEP):
                gi = tl.argmax(gs, 0)
                allowed = allowed | (grp == gi)
                gs = tl.where(gidx == gi, float("-inf"), gs)
            b = tl.where(allowed & ok, b, float("-inf"))
    else:
        m = tl.max(x, 0)
        ex = tl.where(ok, tl.exp(x - m), 0.0)
        s = ex / tl.sum(ex, 0)
        b = tl.where(ok, s, float("-inf"))
    kidx = tl.arange(0, TOPK_P)
    ids = tl.zeros((TOPK_P,), tl.int64)
    ws = tl.zeros((TOPK_P,), tl.float32)
    for j in tl.static_range(TOPK):  # the top-k, best first (ties: the lower index)
        i = tl.argmax(b, 0)
        ids = tl.where(kidx == j, i, ids)
        ws = tl.where(kidx == j, tl.sum(tl.where(offs == i, s, 0.0), 0), ws)
        b = tl.where(offs == i, float("-inf"), b)
    if NORMALIZE:
        if SIGMOID:
            if TOPK > 1:
                ws = ws / (tl.sum(ws, 0) + 1e-20)
        else:
            ws = ws / tl.sum(ws, 0)
    kok = kidx < TOPK
    tl.store(ids_ptr + row * TOPK + kidx, ids, mask=kok)
    tl.store(w_ptr + row * TOPK + kidx, ws * scale, mask=kok)


def moe_route(logits: torch.Tensor, top_k: int, score: str = "sigmoid", bias: torch.Tensor | None = None,
              n_group: int = 1, topk_group: int = 1, scale: float = 1.0,
              normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``l2pd_kernels.reference.moe_route``: one program (one warp) per token."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, E], got {tuple(logits.shape)}")
    N, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} outside [1, {E}]")
    if score not in ("sigmoid", "softmax"):
        raise ValueError(f"score={score!r}: expected 'sigmoid' or 'softmax'")
    if score == "sigmoid" and (E % n_group or not 1 <= topk_group <= n_group):
        raise ValueError(f"{E} experts in {n_group} groups, keeping {topk_group}: not a valid grouping")
    logits = logits.contiguous()
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    if N:
        grouped = score == "sigmoid" and n_group > 1
        _route_kernel[(N,)](logits, logits if bias is None else bias.contiguous(), ids, weights, E, float(scale),
                            TOPK=top_k, TOPK_P=triton.next_power_of_2(top_k), E_P=triton.next_power_of_2(E),
                            GROUPS=n_group if grouped else 1,
                            GROUPS_P=triton.next_power_of_2(n_group if grouped else 1),
                            KEEP=topk_group if grouped else 1, SIGMOID=score == "sigmoid",
                            HAS_BIAS=bias is not None and score == "sigmoid", NORMALIZE=bool(normalize),
                            # one warp: its reductions stay in registers (2.2x faster at 2,048 rows)
                            num_warps=1, **pdl(logits.device, "moe_route"))
    return ids, weights


CPU_TILE = 32  # the interpreter's tile width (0: the GPU's, as the compile test records them)
SCAN_MAX_PAIRS = 1024  # up to this many (token, expert) pairs the programs find their pairs by scanning


# (pairs per expert up to, block_m, gate/up (block_n, block_k, warps, stages), down (...)), from
# benchmarks/moe_configs.py on an H200 at LLaDA2.0-mini shapes (RESULTS, "LLaDA 2.x"); the first (a batch-1
# step, whose block routes alike: 32-row tiles) from benchmarks/moe_layer_b1.py ("LLaDA 2.x at batch 1")
CONFIGS = [(2, 32, (64, 64, 4, 4), (128, 128, 4, 3)),
           (16, 32, (128, 64, 8, 4), (128, 64, 8, 4)),
           (128, 64, (128, 64, 8, 4), (128, 64, 8, 4)),
           (float("inf"), 128, (128, 64, 8, 4), (128, 64, 8, 4))]


def scans(pairs: int) -> bool:
    """Whether ``pairs`` (token, expert) pairs take the scan path (no sort) by default."""
    return pairs <= SCAN_MAX_PAIRS


def scan_programs(pairs: int, experts: int, col_tiles: int, device: torch.device) -> int:
    """Programs per column tile of the scan path: one per touched expert, up to about four programs per SM in
    all (more touched experts: some programs take several)."""
    return max(1, min(experts, pairs, triton.cdiv(4 * sm_count(device), col_tiles)))


# L2PD_MOE_DOWN="BNxBKxWxS": the down kernel's tile in the sorted path's 64-row tiles (batch 64; taller tiles
# keep theirs, which a wide tile would not fit beside in shared memory), for tile studies
_DOWN_ENV = tuple(int(v) for v in os.environ["L2PD_MOE_DOWN"].split("x")) if os.environ.get("L2PD_MOE_DOWN") else None


def pick_config(tokens: int, top_k: int, experts: int) -> tuple:
    """(block_m, gate/up config, down config) for ``tokens`` routed to ``top_k`` of ``experts`` each: the
    tile height follows the mean pairs per expert (few: short tiles, so an expert's weights are read once)."""
    per_expert = tokens * top_k / max(1, experts)
    block_m, gate_up, down = next(c[1:] for c in CONFIGS if per_expert <= c[0])
    if _DOWN_ENV is not None and not scans(tokens * top_k) and block_m <= 64:
        down = _DOWN_ENV
    return block_m, gate_up, down


@triton.jit
def _combine_kernel(part_ptr, weight_ptr, shared_ptr, out_ptr, D, K: tl.constexpr, SHARED: tl.constexpr,
                    BLOCK_D: tl.constexpr, PDL: tl.constexpr = 0):
    """A token's k expert outputs (rounded to the input dtype) weighted in fp32, summed in order, rounded, plus
    the shared expert's output. Launched without fp fusion: each weighted output is rounded before the sum, as
    the reference's separate multiply and add."""
    pdl_wait(PDL)
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    res = _combined(part_ptr, weight_ptr, shared_ptr, n, d, ok, D, K, SHARED, out_ptr.dtype.element_ty)
    tl.store(out_ptr + n * D + d, res, mask=ok)


@triton.jit
def _combined(part_ptr, weight_ptr, shared_ptr, n, d, ok, D, K: tl.constexpr, SHARED: tl.constexpr,
              dt: tl.constexpr):
    """Token n's columns d of the combine, in ``dt``: its K rows weighted in fp32 and summed in slot order,
    rounded, plus the shared expert's row (both widened, added, rounded: ``routed + shared`` in ``dt``).
    Also the RMSNorm's when it combines (``rms_norm`` with ``ExpertRows``)."""
    acc = tl.load(part_ptr + n * K * D + d, mask=ok, other=0.0).to(tl.float32) * tl.load(weight_ptr + n * K)
    for j in tl.static_range(1, K):
        y = tl.load(part_ptr + (n * K + j) * D + d, mask=ok, other=0.0).to(tl.float32)
        acc += y * tl.load(weight_ptr + n * K + j)
    res = acc.to(dt)
    if SHARED:
        res = (res.to(tl.float32) + tl.load(shared_ptr + n * D + d, mask=ok, other=0.0).to(tl.float32)).to(dt)
    return res


# "auto", on Hopper: the sorted path (many pairs: large launches, whose host time hides behind the GPU's) loads
# the routed experts' weight tiles by TMA, the scan path (a decode step's few pairs) while a CUDA graph is captured
# (an eager launch builds descriptors on the host, and takes pointer loads: the same bits). On an H200 at
# LLaDA2.0-mini shapes `generate` took 2.7% less time at batch 1 (the scan path graphed) and 1.5% to 1.8% less at
# batch 64 (benchmarks/RESULTS.md). "1": TMA loads in every launch a descriptor can address, the interpreter
# included; "0": never
TMA = os.environ.get("L2PD_MOE_TMA", "auto")
# In the sorted path from DOWN_COLS_PAIRS pairs each program of the down kernel takes DOWN_COLS column tiles in one
# loop (``_down_cols``): the down product's K (the experts' width, 512 at LLaDA2.0-mini) is a few steps, and a
# program over 4 tiles keeps its pipeline full across them. On an H200 at LLaDA2.0-mini shapes a layer's MoE took
# 4% less at 16,384 pairs (2,048 tokens) and 3% more at 2,048 pairs (benchmarks/RESULTS.md).
# L2PD_MOE_DOWN_COLS=n forces n tiles a program at any number of pairs (1: one tile a program)


# e4m3 experts take the half-precision tiles with BLOCK_K times FP8_K (L2PD_MOE_FP8_K): on an H200 at LLaDA2.0-mini
# shapes twice as deep tied at 32 tokens and lost 26% at 256 and 23% at 2,048 (benchmarks/RESULTS.md), so 1
FP8_K = int(os.environ.get("L2PD_MOE_FP8_K", "1"))


def _down_cols_setting(env: str | None) -> tuple[int, int]:
    """(DOWN_COLS, DOWN_COLS_PAIRS) for ``L2PD_MOE_DOWN_COLS`` = ``env``: 4 tiles from 8,192 pairs when unset."""
    return (int(env), 0) if env else (4, 8192)


DOWN_COLS, DOWN_COLS_PAIRS = _down_cols_setting(os.environ.get("L2PD_MOE_DOWN_COLS"))


def down_cols(pairs: int, tiles: int, scan: bool) -> int:
    """Column tiles per program of the down kernel, of its ``tiles`` (``DOWN_COLS`` from ``DOWN_COLS_PAIRS``
    pairs in the sorted path; the scan path takes one)."""
    return 1 if scan or pairs < DOWN_COLS_PAIRS else max(1, min(DOWN_COLS, tiles))


def _moe_tma(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, scan: bool) -> bool:
    """Whether this launch loads the routed experts' weight tiles by TMA (``TMA``): 2-byte weights whose rows a
    descriptor can address (16-byte aligned), on Hopper or later (or forced, the interpreter included)."""
    if TMA == "0" or TensorDescriptor is None or x.element_size() != 2:
        return False
    if not all(tma_addressable(w.view(-1, w.shape[-1])) for w in (w_gate_up, w_down)):
        return False
    if TMA == "1":
        return x.device.type == "cuda" or _INTERPRET
    return (not scan or capturing(x.device)) and tma_capable(x.device)


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor, config: tuple | None = None, scan: bool | None = None,
              shared: torch.Tensor | None = None, shared_weights: tuple | None = None,
              combine: bool = True, scales: tuple | None = None, shared_scales: tuple | None = None,
              a8: bool = False, xq: tuple | None = None) -> torch.Tensor | ExpertRows:
    """Triton version of ``l2pd_kernels.reference.fused_moe`` (x [N, D], w_gate_up [E, 2I, D], w_down [E, D, I],
    ids [N, k], weights [N, k], ``shared`` [N, D] added at the end; or ``shared_weights`` (gate|up [2I, D], down
    [D, I]): a shared expert of the routed experts' width, run by the same two kernels over every token, its
    output added the same way). ``config``: (block_m, (block_n, block_k,
    warps, stages) of the gate/up kernel, the same of the down kernel); default ``pick_config``. ``scan``: find
    each expert's pairs by scanning the ids in its program instead of sorting them (default: up to
    ``SCAN_MAX_PAIRS`` pairs). One small kernel weights and sums each token's k outputs and adds ``shared``.
    ``combine=False``: the rows before that kernel (``ExpertRows``), for ``rms_norm`` to combine in its own
    pass (or ``moe_combine``).
    ``scales`` (fp32 gate|up [E, 2I], down [E, D]): the experts' weights are e4m3 with these channel scales
    (``reference.quantize_fp8``'s), widened to x's dtype in registers; ``shared_scales`` ([2I], [D]) likewise for
    e4m3 ``shared_weights``. ``a8`` (with ``scales``): the activations e4m3 too, one scale per row (x's as ``xq``
    = ``quantize_rows(x)`` gives them, made here if not given; the SiLU product's by ``quantize_rows`` between
    the two kernels), the products on FP8 tensor cores (``reference.fused_moe(..., a8=True)``).
    ``ids`` must lie in [0, E), as ``moe_route`` gives them. They are not checked (that would read them back
    to the host at every layer): a pair outside reaches no expert, and its token's output is undefined."""
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("fused_moe takes x [N, D], w_gate_up [E, 2I, D] and w_down [E, D, I]")
    N, D = x.shape
    E, two_i, d_in = w_gate_up.shape
    inter = two_i // 2
    if d_in != D or two_i % 2 or tuple(w_down.shape) != (E, D, inter):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [{N}, k]")
    fp8 = scales is not None
    wdt = torch.float8_e4m3fn if fp8 else x.dtype
    if not (wdt == w_gate_up.dtype == w_down.dtype) or x.dtype not in (torch.float32, torch.bfloat16,
                                                                        torch.float16):
        raise ValueError(f"x must be fp32/bf16/fp16 and w_gate_up and w_down {wdt} (e4m3 with scales, else x's "
                         f"dtype), got {x.dtype}, {w_gate_up.dtype}, {w_down.dtype}")
    if fp8:
        _check_scales(scales, (E, two_i), (E, D), "scales")
    if (a8 and not fp8) or (xq is not None and not a8):
        raise ValueError("a8 (e4m3 activations) goes with e4m3 experts and their scales; xq with a8")
    if xq is not None and not (len(xq) == 2 and xq[0].dtype == torch.float8_e4m3fn and xq[0].shape == x.shape
                               and xq[1].dtype == torch.float32 and xq[1].numel() == N):
        raise ValueError(f"xq must be x's rows as e4m3 [{N}, {D}] and their fp32 scales [{N}]")
    k = ids.shape[1]
    if shared is not None and (shared.shape != x.shape or shared.dtype != x.dtype):
        raise ValueError(f"shared must be {x.dtype} {tuple(x.shape)}, got {shared.dtype} {tuple(shared.shape)}")
    if shared_weights is not None:
        ws, wd = shared_weights
        if shared is not None or tuple(ws.shape) != (two_i, D) or tuple(wd.shape) != (D, inter) \
                or ws.dtype != wdt or wd.dtype != wdt:
            raise ValueError(f"shared_weights must be {wdt} gate|up [{two_i}, {D}] and down [{D}, {inter}] "
                             f"(not with shared), got {tuple(ws.shape)} {ws.dtype}, {tuple(wd.shape)} {wd.dtype}")
        if fp8:
            _check_scales(shared_scales, (two_i,), (D,), "shared_scales")
    if shared_scales is not None and (not fp8 or shared_weights is None):
        raise ValueError("shared_scales go with e4m3 shared_weights and scales")
    if N == 0:
        return torch.empty_like(x) if combine else ExpertRows(x.new_empty(0, D), weights.float(), None)
    block_m, (bn1, bk1, w1, st1), (bn2, bk2, w2_, st2) = config or pick_config(N, k, E)
    if x.device.type != "cuda" and CPU_TILE:  # the interpreter: small tiles keep the CPU tests quick
        bn1 = bn2 = bk1 = bk2 = CPU_TILE
    elif x.dtype == torch.float32:  # 4-byte tiles: at most 64 columns and two stages fit shared memory (A100 too)
        bn1, bn2, st1, st2 = min(bn1, 64), min(bn2, 64), min(st1, 2), min(st2, 2)
    elif fp8 and config is None and FP8_K > 1:  # deeper e4m3 weight tiles: as many bytes a step as half precision
        bk1, bk2 = min(bk1 * FP8_K, triton.next_power_of_2(D)), min(bk2 * FP8_K, triton.next_power_of_2(inter))
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    scan = scans(N * k) if scan is None else scan
    nt1, nt2 = triton.cdiv(inter, bn1), triton.cdiv(D, bn2)  # column tiles of the two kernels
    if scan:  # no sort: per column tile, programs that each take some of the touched experts
        pairs, experts = ids.reshape(-1).contiguous(), ids
        routed1, routed2 = scan_programs(N * k, E, nt1, x.device), scan_programs(N * k, E, nt2, x.device)
    else:  # one program per block of an expert's sorted pairs
        pairs, experts = align(ids.long(), E, block_m)
        routed1 = routed2 = experts.shape[0]
    sw = shared_weights is not None
    # the shared expert's programs come after the routed ones, a block of tokens each
    extra = triton.cdiv(N, block_m) if sw else 0
    if sw:
        ws, wd = shared_weights[0].contiguous(), shared_weights[1].contiguous()
    else:
        ws, wd = w_gate_up, w_down
    rows = N * k + (N if sw else 0)  # the routed pairs' rows, then the shared expert's
    act = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(rows, D, dtype=x.dtype, device=x.device)  # each pair's down projection, unweighted
    # the interpreter's bf16 dot is wrong (and it has no e4m3 one)
    upcast = x.device.type != "cuda" and (x.dtype == torch.bfloat16 or a8)
    # fp32 products in full precision (as the reference's matmuls), not TF32
    flags = dict(UPCAST=upcast, PREC="ieee" if x.dtype == torch.float32 and not a8 else "tf32", SCAN=scan,
                 PAIRS=triton.next_power_of_2(N * k), E_P=triton.next_power_of_2(E) if scan else 1, SHARED_W=sw,
                 BLOCK_M=block_m)
    wg, wdn = w_gate_up, w_down
    if tma := _moe_tma(x, w_gate_up, w_down, scan):  # descriptors over the experts stacked by rows
        wg = TensorDescriptor.from_tensor(w_gate_up.view(E * two_i, D), [bn1, bk1])
        wdn = TensorDescriptor.from_tensor(w_down.view(E * D, inter), [bn2, bk2])
    # the channel scales and the rows' e4m3 scales (unread without FP8 / a8: any pointer)
    s1, s2 = scales if fp8 else (x, x)
    ss1, ss2 = shared_scales if fp8 and sw else (s1, s2)
    xin, xs = x, x
    if a8:
        from .fp8 import quantize_rows

        xin, xs = (xq[0], xq[1].reshape(-1)) if xq is not None else quantize_rows(x)
    mode = 2 if a8 else int(fp8)
    _gate_up_kernel[(routed1 + extra, nt1)](xin, wg, act, pairs, experts, N * k, D, inter, ws, routed1, N, s1, ss1,
                                            xs, TOPK=k, BLOCK_N=bn1, BLOCK_K=bk1, TMA=int(tma), FP8=mode,
                                            num_warps=w1, num_stages=st1, **flags, **pdl(x.device, "moe_gate_up"))
    act_in, act_s = quantize_rows(act) if a8 else (act, x)
    cols = 1 if fp8 else down_cols(N * k, nt2, scan)
    _down_kernel[(routed2 + extra, triton.cdiv(nt2, cols))](act_in, wdn, out, pairs, experts, N * k, D, inter, wd,
                                                            routed2, N, s2, ss2, act_s, BLOCK_N=bn2, BLOCK_K=bk2,
                                                            TMA=int(tma), COLS=cols, FP8=mode, num_warps=w2_,
                                                            num_stages=st2, **flags, **pdl(x.device, "moe_down"))
    parts = ExpertRows(out, weights.float().contiguous(),
                       out[N * k:] if sw else shared.contiguous() if shared is not None else None)
    return _combine(parts, N, k, D) if combine else parts


def _check_scales(scales: tuple | None, gate_up: tuple, down: tuple, name: str) -> None:
    """Raise unless ``scales`` is (fp32 ``gate_up``-shaped, fp32 ``down``-shaped), contiguous."""
    ok = isinstance(scales, (tuple, list)) and len(scales) == 2 and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == shape and t.is_contiguous()
        for t, shape in zip(scales, (gate_up, down)))
    if not ok:
        got = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in scales] \
            if isinstance(scales, (tuple, list)) else type(scales).__name__
        raise ValueError(f"{name} must be contiguous fp32 tensors {list(gate_up)} and {list(down)}, got {got}")


def check_rows(parts: ExpertRows) -> tuple[int, int, int]:
    """(tokens, experts per token, hidden size) of ``parts``, which must be consistent."""
    if not isinstance(parts, ExpertRows):
        raise TypeError(f"expected ExpertRows, got {type(parts).__name__}")
    rows, w, sh = parts
    if w.dim() != 2 or w.dtype != torch.float32 or rows.dim() != 2 or rows.shape[0] < w.numel():
        raise ValueError(f"ExpertRows: rows [N * k (+ N), D] and fp32 weights [N, k], got {tuple(rows.shape)} and "
                         f"{w.dtype} {tuple(w.shape)}")
    N, k = w.shape
    if sh is not None and (sh.shape != (N, rows.shape[1]) or sh.dtype != rows.dtype or not sh.is_contiguous()):
        raise ValueError(f"ExpertRows: shared must be {rows.dtype} [{N}, {rows.shape[1]}], got {sh.dtype} "
                         f"{tuple(sh.shape)}")
    if not rows.is_contiguous() or not w.is_contiguous():
        raise ValueError("ExpertRows: rows and weights must be contiguous")
    return N, k, rows.shape[1]


def moe_combine(parts: ExpertRows) -> torch.Tensor:
    """Triton version of ``l2pd_kernels.reference.moe_combine``: each token's k expert rows weighted and summed in
    slot order, plus the shared expert's output; [N, D] in the rows' dtype."""
    return _combine(parts, *check_rows(parts))


def _combine(parts: ExpertRows, N: int, k: int, D: int) -> torch.Tensor:
    rows, w, sh = parts
    res = torch.empty(N, D, dtype=rows.dtype, device=rows.device)
    if N == 0:
        return res
    block_d = min(1024, triton.next_power_of_2(D))
    nofuse = {} if rows.device.type != "cuda" else {"enable_fp_fusion": False}
    _combine_kernel[(N, triton.cdiv(D, block_d))](rows, w, res if sh is None else sh, res, D, K=k,
                                                  SHARED=sh is not None, BLOCK_D=block_d, num_warps=4,
                                                  **nofuse, **pdl(rows.device, "moe_combine"))
    return res
