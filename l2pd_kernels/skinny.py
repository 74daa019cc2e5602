"""skinny_matmul: ``x @ w.T`` for a few rows of x (a cached decode step feeds 32 tokens at batch 1), reading
the weight once at memory speed, with an optional SiLU-gate epilogue.

At 32 rows a linear layer is a weight read: cuBLAS reaches about 93% of the copy bandwidth there on an H100.
This kernel gives every program one slice of output columns and all the rows, streams that slice of the
weight through a deep software pipeline, and accumulates in fp32. ``gate_up_silu`` computes both halves of a
packed [gate; up] weight in the same program and writes ``silu(gate) * up`` directly: no [rows, 2F] buffer,
no separate ``silu_mul`` launch. Rounding follows the unfused code: each product is rounded to the output
dtype, then silu is rounded, then the product (``l2pd_kernels.reference.gate_up_silu``).
The tile comes from ``pick_config``, a rule set from ``benchmarks/skinny_configs.py`` (every candidate timed
on the 8B shapes); no tuning at run time, so the first decode does not pay for compiling candidates. On Hopper,
bf16/fp16 products take ``pick_tma``'s tiles where they were measured faster, and inside CUDA graphs load them
by TMA (one copy per tile, no address arithmetic per thread).
Where a program's own work bounds the product (e4m3 weights widened in registers), ``pick_split`` shares each
output tile's K among several programs: each leaves an fp32 partial, and the last of them to arrive (a
per-tile counter) sums the partials in a fixed order and writes the tile, so results do not depend on timing
and the counters are back at zero for the next launch (graph replays included).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .device import TensorDescriptor, device_name, pdl, pdl_wait, sm_count, smem_bytes
from .device import capturing as _capturing
from .device import tma_addressable as _tma_addressable
from .device import tma_capable as _hopper  # (a module name the tests replace)
from .rope import _rope_tail

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = int(os.environ.get("L2PD_SKINNY_ROWS", "64"))  # above this, F.linear (compute-bound: cuBLAS)
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=): newer torch only


@triton.jit
def _mac(acc, xt, wt, SWAP: tl.constexpr, IEEE: tl.constexpr):
    """acc + x @ w.T (or its transpose, w @ x.T, with SWAP); one return: the compiler takes no early one."""
    if SWAP:
        if IEEE:
            acc = tl.dot(wt, tl.trans(xt), acc, input_precision="ieee")
        else:
            acc = tl.dot(wt, tl.trans(xt), acc)
    else:
        if IEEE:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    return acc


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm,
                   stride_wn, stride_om, b_ptr, GATE: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr, FP8: tl.constexpr, A8: tl.constexpr, SWAP: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   TMA: tl.constexpr = 0, BIAS: tl.constexpr = 0, PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    _skinny_body(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn,
                 stride_om, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr,
                 out_ptr, 0.0, 1, 1, 1, 1, GATE, EVEN_K, IEEE, UPCAST, FP8, A8, SWAP, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K,
                 0, 1, 0, 0, 0, 0, TMA, b_ptr, BIAS)


@triton.jit
def _skinny_rope_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm,
                        stride_wn, stride_om, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr, vo_ptr, qw_ptr,
                        kw_ptr, ks_ptr, vs_ptr, eps, S, H, HKV, T, GATE: tl.constexpr, EVEN_K: tl.constexpr,
                        IEEE: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr, A8: tl.constexpr,
                        SWAP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, ROWS: tl.constexpr,
                        NORM: tl.constexpr, KV8: tl.constexpr = 0, TMA: tl.constexpr = 0, PDL: tl.constexpr = 0):
    """``_skinny_kernel`` for a q/k/v product whose programs each hold one head (BLOCK_N = head_dim) and then do
    ``rope_qkv``'s work for it (``linear_rope_qkv``; the arguments from cos_ptr on are that op's). A kernel of
    its own, so the plain products' launches carry no more arguments than before."""
    pdl_wait(PDL)
    _skinny_body(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn,
                 stride_om, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr, vo_ptr, qw_ptr, kw_ptr, ks_ptr,
                 vs_ptr, eps, S, H, HKV, T, GATE, EVEN_K, IEEE, UPCAST, FP8, A8, SWAP, SPLIT, BLOCK_M, BLOCK_N,
                 BLOCK_K, 1, HALF, REST, ROWS, NORM, KV8, TMA, out_ptr, 0)


@triton.jit
def _skinny_body(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm,
                 stride_wn, stride_om, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr, vo_ptr, qw_ptr, kw_ptr,
                 ks_ptr, vs_ptr, eps, S, H, HKV, T, GATE: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr, FP8: tl.constexpr, A8: tl.constexpr, SWAP: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ROPE: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, ROWS: tl.constexpr,
                 NORM: tl.constexpr, KV8: tl.constexpr, TMA: tl.constexpr, b_ptr, BIAS: tl.constexpr):
    """With ``TMA``, x_ptr and w_ptr are tensor descriptors of x [M, K] and w (tiles [BLOCK_M, BLOCK_K] and
    [BLOCK_N, BLOCK_K]): each tile arrives by one TMA copy, rows and K past the ends read as zeros. ``BIAS``:
    b_ptr's [N] bias added to the fp32 sums before they round (as ``F.linear`` with a bias)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    k_lo = tl.program_id(2) * K_SPLIT  # this program's share of K (all of it without a split)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    if not TMA:
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k_lo + rk)[None, :]
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k_lo + rk)[None, :]
        u_ptrs = w_ptrs + N * stride_wn  # the up half of a packed [gate; up] weight
    if SWAP:  # out.T = w @ x.T: the weight slice is the tensor cores' wide operand (their M is 64 or more)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        if TMA:
            xt = x_ptr.load([pid_m * BLOCK_M, k])
            wt = w_ptr.load([pid_n * BLOCK_N, k])
        elif EVEN_K:
            xt = tl.load(x_ptrs, mask=m_ok, other=0.0)
            wt = tl.load(w_ptrs, mask=n_ok, other=0.0)
        else:
            k_ok = (k + rk[None, :]) < K
            xt = tl.load(x_ptrs, mask=m_ok & k_ok, other=0.0)
            wt = tl.load(w_ptrs, mask=n_ok & k_ok, other=0.0)
        if FP8 and not A8:  # e4m3 weights widen exactly to the activations' dtype; the channel scale comes last
            wt = wt.to(xt.dtype)
        if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = _mac(acc, xt, wt, SWAP, IEEE)
        if GATE:
            if TMA:  # (the last gate tile's rows past N read up rows where the pointer path reads zeros: the
                ut = w_ptr.load([N + pid_n * BLOCK_N, k])  # columns they make are not stored)
            elif EVEN_K:
                ut = tl.load(u_ptrs, mask=n_ok, other=0.0)
            else:
                ut = tl.load(u_ptrs, mask=n_ok & k_ok, other=0.0)
            if FP8 and not A8:
                ut = ut.to(xt.dtype)
            if UPCAST:
                ut = ut.to(tl.float32)
            acc_u = _mac(acc_u, xt, ut, SWAP, IEEE)
            if not TMA:
                u_ptrs += BLOCK_K
        if not TMA:
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
        acc_u = tl.trans(acc_u)
    tile_ok = m_ok & (rn[None, :] < N)
    if SPLIT == 1:
        _epilogue(acc, acc_u, rm, rn, tile_ok, s_ptr, xs_ptr, out_ptr, M, N, stride_om, GATE, FP8, A8, b_ptr, BIAS)
        if ROPE:  # the head's product is written: read it back as rope_qkv would (same bits), rotate, place
            tl.debug_barrier()
            _rope_tail(out_ptr, rm, M, stride_om, pid_n, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr,
                       vo_ptr, qw_ptr, kw_ptr, ks_ptr, vs_ptr, eps, S, H, HKV, T, BLOCK_N, HALF, REST, ROWS, NORM,
                       KV8)
    else:
        # split K: each program leaves its fp32 partial; the last of a tile's SPLIT programs to arrive sums
        # them in split order (the same bits whichever arrives last), resets the tile's counter for the next
        # launch and writes the output
        tile = pid_m * tl.num_programs(0) + pid_n
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        mn = M * N
        plane = mn * 2 if GATE else mn
        part = part_ptr + tl.program_id(2).to(tl.int64) * plane + offs
        tl.store(part, acc, mask=tile_ok)
        if GATE:
            tl.store(part + mn, acc_u, mask=tile_ok)
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                base = part_ptr + s * plane + offs
                acc += tl.load(base, mask=tile_ok, other=0.0, cache_modifier=".cg")
                if GATE:
                    acc_u += tl.load(base + mn, mask=tile_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0)
            _epilogue(acc, acc_u, rm, rn, tile_ok, s_ptr, xs_ptr, out_ptr, M, N, stride_om, GATE, FP8, A8, b_ptr, BIAS)
            if ROPE:  # the last program of a head's K shares does its rope_qkv work
                tl.debug_barrier()
                _rope_tail(out_ptr, rm, M, stride_om, pid_n, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr,
                           vo_ptr, qw_ptr, kw_ptr, ks_ptr, vs_ptr, eps, S, H, HKV, T, BLOCK_N, HALF, REST, ROWS, NORM,
                           KV8)


@triton.jit
def _epilogue(acc, acc_u, rm, rn, tile_ok, s_ptr, xs_ptr, out_ptr, M, N, stride_om, GATE: tl.constexpr,
              FP8: tl.constexpr, A8: tl.constexpr, b_ptr, BIAS: tl.constexpr):
    """Scales (FP8 channel, e4m3 row), the bias, rounding to the output dtype, the SiLU gate, the store."""
    dt = out_ptr.dtype.element_ty
    if FP8:
        n_in = rn < N
        acc = acc * tl.load(s_ptr + rn, mask=n_in, other=0.0)[None, :]
        if GATE:
            acc_u = acc_u * tl.load(s_ptr + N + rn, mask=n_in, other=0.0)[None, :]
    if A8:  # e4m3 activations: each row's scale
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
        acc = acc * xs
        if GATE:
            acc_u = acc_u * xs
    if BIAS:  # (never with GATE: ``_launch``)
        acc = acc + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    res = acc.to(dt)
    if GATE:
        g = res.to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        res = (s * acc_u.to(dt).to(tl.float32)).to(dt)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, res, mask=tile_ok)


# (BLOCK_N, BLOCK_K, num_warps, num_stages)
DEFAULT_CONFIG = (32, 128, 4, 4)


def pick_config(rows: int, n: int, k: int, gate: bool, device: str = "") -> tuple[int, int, int, int]:
    """The tile for a product of ``rows`` x ``k`` by ``n`` output columns (per half for ``gate``) on the GPU
    named ``device``.

    From ``benchmarks/skinny_configs.py``: on an H100 at 32 and 64 rows (cold weights, each choice within 1% of
    the best candidate) narrow outputs (LLaDA-8B's out and down projections, 4096 columns) want one 32-column
    slice per SM and long K steps; wide ones (q/k/v, the LM head) 128-column slices; the gated product, which
    streams two weights per program, 16-column slices and a shallower pipeline. On an H200 (``--splits``,
    replayed from graphs) the wide gated products and q/k/v run faster in 64-column slices (54 us against 60 us
    for LLaDA-8B's gate/up); devices not measured take the H200's tiles. (``--occupancy`` found 16-column
    slices faster for LLaDA2.0-mini's output projection, 6.1 us against 6.8, but with them and a bf16 K split
    Dream-7B's step was 3.6% slower: not taken; ``benchmarks/RESULTS.md``.)
    """
    older = "H100" in device or "A100" in device
    if gate:  # 64-column slices only where they still give every SM programs (a MoE's small shared expert not)
        return (16, 128, 4, 3) if older or n < 8192 else (64, 128, 4, 3)
    if n <= 8192:
        return (32, 256, 4, 4)
    return (128, 128, 4, 4) if older or n > 65536 else (64, 128, 4, 4)


def pick_config_fp8(rows: int, n: int, k: int, gate: bool, a8: bool = False) -> tuple[int, int, int, int]:
    """The tile for FP8 weights (``benchmarks/skinny_configs.py --weights fp8``, ``--splits`` and ``--splits
    --occupancy`` on an H200 at 32 rows), widened in registers or (``a8``) against e4m3 activations, which take
    longer K steps; an LM head's many columns in 128-column slices (a8: 136 us against 145 for LLaDA-8B's).
    e4m3 activations at LLaDA-8B shapes: the gated product in 128-byte K steps (28.5 us against 32.8), q/k/v in
    a 3-stage pipeline (15.6 against 16.8), the 4,096-column outputs in 4-warp programs (out 7.4 against 8.1),
    LLaDA2.0-mini's short K in 256-byte steps (its q/k/v 4.5 against 5.2 us)."""
    if a8:
        if n > 65536:
            return (128, 256, 4, 4)
        if gate:
            return (64, 128, 4, 4)
        if n <= 8192:
            return (64, 512, 4, 4) if k >= 4096 else (64, 256, 4, 4)
        return (64, 256, 4, 3)
    return (64, 256, 4, 3)  # with K split across programs (``pick_split``)


# which products run transposed (w @ x.T): "a8" (e4m3 activations), "all" or "none"
SWAP = os.environ.get("L2PD_SKINNY_SWAP", "a8")


def _swap(a8: bool) -> bool:
    """Whether the product runs transposed (``benchmarks/skinny_configs.py`` measures both per kind)."""
    return SWAP == "all" or (SWAP == "a8" and a8)


def _fit(bm: int, bn: int, bk: int, stages: int, gate: bool, elsize: int, limit: int) -> tuple[int, int]:
    """(BLOCK_K, stages) shrunk until the pipelined x and weight tiles fit in ``limit`` bytes of shared
    memory (fp32 tiles take twice the bytes of the bf16 ones the configurations were chosen for)."""
    def need(bk_, st):
        return st * (bm + bn * (2 if gate else 1)) * bk_ * elsize
    while need(bk, stages) > limit and stages > 2:
        stages -= 1
    while need(bk, stages) > limit and bk > 32:
        bk //= 2
    return bk, stages


_counters: dict[int, torch.Tensor] = {}
MAX_TILES = 1 << 15  # counters per device: the most (N tile, M tile) pairs a split product may have


def _tile_counters(device: torch.device) -> torch.Tensor | None:
    """The device's split-K arrival counters (int32, zero between launches: the last program of a tile resets
    its own); None while a CUDA graph is being captured before any exist (a capture must not allocate them)."""
    key = -1 if device.type != "cuda" else (device.index if device.index is not None else torch.cuda.current_device())
    if key not in _counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _counters[key]


def pick_split(tiles: int, k_steps: int, sms: int, widened: bool = False, a8: bool = False) -> int:
    """How many programs share one output tile's K (``benchmarks/skinny_configs.py --splits``, an H200 at 32
    rows, replayed from graphs). bf16 products: none (LLaDA-8B's down projection split in two: 30.5 us against
    31.8, and its step 0.7% faster, but Dream-7B's step 3.6% slower with it and narrower tiles). e4m3 weights
    widened in registers are bound by the widening, so more programs help: up to 4 per SM, each keeping at
    least 4 K steps (LLaDA-8B's down projection 28 us against 42). e4m3 activations: 2 for
    outputs of at most half an SM each with 16 K steps or more (down: 18.5 us against 20.1)."""
    if SPLIT_K > 0:
        return max(1, min(SPLIT_K, k_steps))
    split = 1
    if widened:
        while tiles * split * 2 <= 4 * sms and k_steps // (split * 2) >= 4:
            split *= 2
    elif a8 and 2 * tiles <= sms and k_steps >= 16:
        split = 2
    return split


def pick_rope_split(tiles: int, k_steps: int, sms: int) -> int:
    """How many programs share a head's K in ``linear_rope_qkv`` (one head per program): a model of few heads
    (LLaDA2.0-mini: 24 heads of q, k and v) would stream its weight on a fifth of an H200's SMs, so K is split
    until the programs cover the SMs once, each keeping 4 K steps or more (the last to arrive does the RoPE)."""
    if SPLIT_K > 0:
        return max(1, min(SPLIT_K, k_steps))
    split = 1
    while tiles * split * 2 <= sms and k_steps // (split * 2) >= 4:
        split *= 2
    return split


# 0: the rule of ``pick_split``; n > 0: every product splits K n ways
SPLIT_K = int(os.environ.get("L2PD_SKINNY_SPLIT", "0"))


# "auto": ``pick_tma``'s tiles where it has one, loaded by TMA inside CUDA graphs (by pointers in eager launches);
# "1": TMA loads in every launch a descriptor can address; "0": the pointer path's own tiles and loads
TMA = os.environ.get("L2PD_SKINNY_TMA", "auto")


def pick_tma(rows: int, n: int, k: int, gate: bool, sms: int, fp8: bool = False,
             a8: bool = False) -> tuple[int, int, int, int, bool] | None:
    """The TMA tile (BLOCK_N, BLOCK_K, num_warps, num_stages, swap) of a product where loading its tiles by
    TMA was measured faster than the pointer path, else None (``benchmarks/studies/skinny_tma.py``, an H200 at
    32 rows, replayed from graphs; ``benchmarks/RESULTS.md``, "Few-row products loaded by TMA"):
    - outputs that give every SM at most one 32-column slice, K up to 12,288: 256-wide K steps, 5 deep
      (LLaDA-8B's down projection 27.6 us against 31.0; in its step its output and down projections 2.1 us
      faster each). Dream-7B's down projection (K 18,944) was faster so alone (37.7 us against 45.6) but
      6.6 us slower in its step (48.7 against 42.1; ``benchmarks/studies/step_kernels.py``): pointers there;
    - wider ones: the transposed product in 64-column slices (LLaDA-8B's q/k/v 27.3 against 30.7, its LM head
      246 against 273);
    - the gated product, transposed: 128-column slices in 3 stages where they fill the SMs' waves as evenly as
      64-column ones (LLaDA-8B's gate/up: 96 or 192 programs on 132 SMs, 50.5 us against 51.9), else 64-column
      slices in 5 (Dream-7B's 69.7 against 86.2, LLaDA2.0-mini's dense layer 12.6 against 16.9);
    - e4m3 weights: none (at LLaDA-8B shapes, widened or against e4m3 activations, TMA tiles were within 0.5 us
      of the pointer path's but for the widened down projection, 25.0 against 26.1 us, not tried in a step).
    """
    if fp8 or a8:
        return None
    if gate:
        def fill(bn: int) -> float:  # programs over the SM slots of the waves they take
            p = triton.cdiv(n, bn)
            return p / (triton.cdiv(p, sms) * sms)
        return (128, 128, 4, 3, True) if fill(128) >= fill(64) - 0.01 else (64, 128, 4, 5, True)
    if triton.cdiv(n, 32) <= sms:
        return (32, 256, 4, 5, False) if k <= 12288 else None
    return (64, 128, 4, 4, True)


def check_bias(bias: torch.Tensor | None, n: int) -> None:
    """A product's bias: None, or n contiguous values (the kernel reads it as one row)."""
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"a bias of {n} contiguous values, got {tuple(bias.shape)}")


def _launch(x2, w, out, n_out, gate, cfg=None, scale=None, x_scale=None, swap=None, split=None, rope=None,
            tma=None, bias=None):
    """One launch of the kernel; ``rope`` (``linear_rope_qkv``): the dict of its arguments and constants
    (``ROPE_ARGS``, ``head_dim``, ``HALF``, ``REST``, ``ROWS``, ``NORM``, ``KV8``): one head per program, K split by
    ``pick_rope_split``. ``tma``: load the tiles by TMA (None: ``L2PD_SKINNY_TMA``, by default where
    ``pick_tma`` has a tile, its tile in every launch and its TMA loads while a CUDA graph is captured);
    with ``cfg`` and ``tma``, ``swap`` as given. ``bias``: [n_out], added before the output rounds (not with
    ``gate`` or ``rope``)."""
    M, K = x2.shape
    check_bias(bias, n_out)
    if bias is not None and (gate or rope is not None):
        raise ValueError("a bias goes with a plain product only (no SiLU gate, no RoPE)")
    a8 = x_scale is not None
    sms = sm_count(x2.device)
    tma_cfg = None
    if tma is None:
        hopper = _hopper(x2.device)
        # ``pick_tma``'s tiles for bf16/fp16 (what was measured) on Hopper, loaded by TMA inside a CUDA graph
        # only: an eager launch with descriptors took up to 87 us more host time than one with pointers
        # (``benchmarks/test_kernels_bench.py::test_skinny_matmul``), so eager launches run the same tile with
        # pointer loads. Forced (``TMA == "1"``), by TMA everywhere, the interpreter included.
        if TMA != "0" and (hopper or TMA == "1") and cfg is None and x2.element_size() == 2:
            tma_cfg = pick_tma(M, n_out, K, gate, sms, scale is not None, a8)
        tma = TMA == "1" and (hopper or (_INTERPRET and TensorDescriptor is not None)) or (
            tma_cfg is not None and _capturing(x2.device))
    tma = tma and _tma_addressable(x2) and _tma_addressable(w)
    if tma_cfg is not None:  # the tile, whichever way it loads
        cfg, swap = tma_cfg[:4], tma_cfg[4] if swap is None else swap
    bn, bk, warps, stages = cfg or (pick_config_fp8(M, n_out, K, gate, a8) if scale is not None else
                                    pick_config(M, n_out, K, gate, device_name(x2.device)))
    if rope is not None:  # one head per program; K steps of 256 bytes keep a head-wide pipeline in shared memory
        bn, bk = rope["head_dim"], min(bk, 256 // w.element_size())
    bm = max(16, triton.next_power_of_2(min(M, 64)))
    if cfg is None or tma_cfg is not None:
        bk, stages = _fit(bm, bn, bk, stages, gate, x2.element_size(), smem_bytes(x2.device))
    grid_n, grid_m = triton.cdiv(n_out, bn), triton.cdiv(M, bm)
    k_steps = triton.cdiv(K, bk)
    if split is None and rope is not None:
        split = pick_rope_split(grid_n * grid_m, k_steps, sms)
    elif split is None:
        split = pick_split(grid_n * grid_m, k_steps, sms, scale is not None and not a8, a8)
    split = max(1, min(split, k_steps))
    counters = _tile_counters(x2.device) if split > 1 and grid_n * grid_m <= MAX_TILES else None
    if counters is None:
        split = 1
    k_split = triton.cdiv(k_steps, split) * bk  # whole K steps per program
    split = triton.cdiv(K, k_split)  # no program without K
    part = out if split == 1 else torch.empty(split * (2 if gate else 1) * M * n_out, dtype=torch.float32,
                                              device=x2.device)
    if rope is not None:  # the arguments after the plain ones: RoPE's, or the bias
        kernel, extra_args = _skinny_rope_kernel, rope["args"]
        extra_consts = {k: rope[k] for k in ("HALF", "REST", "ROWS", "NORM", "KV8")}
    else:
        kernel, extra_args = _skinny_kernel, (out if bias is None else bias,)
        extra_consts = {"BIAS": int(bias is not None)}
    xa, wa = x2, w
    if tma:  # descriptors per launch: a cached one would keep its tensor alive
        xa, wa = TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk])
    kernel[(grid_n, grid_m, split)](
        xa, wa, w if scale is None else scale, w if x_scale is None else x_scale, out, part,
        out if counters is None else counters, M, n_out, K, k_split, x2.stride(0), w.stride(0), out.stride(0),
        *extra_args, GATE=gate, EVEN_K=tma or K % bk == 0, IEEE=x2.dtype == torch.float32 or _INTERPRET,
        UPCAST=_INTERPRET and (x2.dtype == torch.bfloat16 or a8),  # no fp8 dot on the CPU
        FP8=scale is not None, A8=a8, SWAP=_swap(a8) if swap is None else swap, SPLIT=split, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, **extra_consts, TMA=int(bool(tma)), num_warps=warps, num_stages=stages,
        **pdl(x2.device, "skinny"))


def _check(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)} do not multiply as x @ w.T")
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x {x.dtype} and w {w.dtype} must share one of fp32, bf16, fp16")
    if w.stride(1) != 1:
        raise ValueError("w must have unit stride along K")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` (``F.linear``; ``bias`` added to the fp32 sums before they round) with the Triton kernel, for
    any number of rows. ``out_dtype`` torch.float32: the fp32 sums unrounded (half-precision products are exact
    in fp32)."""
    x2 = _check(x, w)
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be x's dtype or torch.float32, got {out_dtype}")
    out = torch.empty(x2.shape[0], w.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    if out.numel():
        _launch(x2, w, out, w.shape[0], False, bias=bias)
    return out.view(*x.shape[:-1], w.shape[0])


def gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` for a packed ``w = cat([gate, up])`` [2F, K]."""
    x2 = _check(x, w)
    if w.shape[0] % 2:
        raise ValueError(f"a packed [gate; up] weight has an even number of rows, got {w.shape[0]}")
    f = w.shape[0] // 2
    out = torch.empty(x2.shape[0], f, dtype=x.dtype, device=x.device)
    if out.numel():
        _launch(x2, w, out, f, True)
    return out.view(*x.shape[:-1], f)


def _use_kernel(x: torch.Tensor) -> bool:
    rows = x.numel() // max(1, x.shape[-1])
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 0 < rows <= MAX_ROWS


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The forward's linear layer: the skinny kernel for up to ``MAX_ROWS`` rows of bf16/fp16 on CUDA
    (``L2PD_SKINNY_ROWS=0`` turns it off), ``F.linear`` otherwise; a bias is added before the output rounds."""
    if _use_kernel(x) and w.stride(1) == 1 and (bias is None or bias.is_contiguous()):
        return skinny_matmul(x, w, bias=bias)
    return torch.nn.functional.linear(x, w, bias)


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in fp32 for half-precision x and w (a router's logits): the skinny kernel with fp32 output for
    up to ``MAX_ROWS`` rows on CUDA, a tensor-core matmul with fp32 output above (newer torch), else the fp32
    matmul. Each way sums exact products in fp32; only the order of the sum differs."""
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        raise ValueError(f"linear_f32 takes half-precision x and w of one dtype, got {x.dtype} and {w.dtype}")
    if _use_kernel(x) and w.stride(1) == 1:
        return skinny_matmul(x, w, torch.float32)
    if x.is_cuda and MM_OUT_DTYPE:
        x2 = x.reshape(-1, x.shape[-1])
        return torch.mm(x2, w.t(), out_dtype=torch.float32).view(*x.shape[:-1], w.shape[0])
    return torch.nn.functional.linear(x.float(), w.float())


def linear_gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gated MLP's first half from a packed weight; ``F.linear`` and ``silu_mul`` above ``MAX_ROWS``."""
    if _use_kernel(x) and w.stride(1) == 1:
        return gate_up_silu(x, w)
    from .silu_mul import silu_mul

    gate, up = torch.nn.functional.linear(x, w).chunk(2, -1)
    return silu_mul(gate, up)
