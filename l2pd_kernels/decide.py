"""decide: one step's decision for a batch of blocks, fused into one program per batch row.

Reads the block's tokens/probabilities and the canvas, runs the filter MLP (weights small enough to stay on
chip; its inputs are the confidences and, for a richer filter, the margins, entropies and the step index),
accepts still-masked positions whose score exceeds tau plus the k most confident ones, writes them into the
canvas in place, applies EoTP (end-of-text written to every position after the cut, to the end of the canvas)
and writes per-row counts to device memory: no host sync. Semantics are those of
``l2pd_kernels.reference.decide``; ``steps`` and ``threshold`` are this kernel with the filter off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import pdl, pdl_wait
from .reference import (
    EOTP_MODES,
    HISTORY_FEATURES,
    RUN_CAP,
    SHARED_FEATURES,
    check_history,
    check_inputs,
    check_rule,
    filter_width,
)


@triton.jit
def _decide_kernel(
    canvas_ptr, token_ptr, prob_ptr, margin_ptr, entropy_ptr, out_ptr, hist_tok_ptr, hist_run_ptr, hist_conf_ptr,
    stride_h, persist,
    w1_ptr, b1_ptr, wm_ptr, bm_ptr, w2_ptr, b2_ptr,
    T, n_rows, stride_c, stride_t, stride_p, stride_m, stride_e,
    block_start, L, LF, W, H, k, step, threshold, mask_id, eos_id, params_ptr, rows_ptr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, PER_ROW: tl.constexpr, HB: tl.constexpr, N_MID: tl.constexpr,
    USE_FILTER: tl.constexpr, RULE: tl.constexpr,
    EOTP: tl.constexpr, TAIL: tl.constexpr, DYN_PARAMS: tl.constexpr,
    USE_MARGIN: tl.constexpr, USE_ENTROPY: tl.constexpr, USE_STEP: tl.constexpr, SHARED: tl.constexpr,
    HISTORY: tl.constexpr, HIST_CONF: tl.constexpr, HIST_FEATS: tl.constexpr, RUN_CAP: tl.constexpr,
    PDL: tl.constexpr = 0):
    pdl_wait(PDL)
    row = tl.program_id(0)
    if DYN_PARAMS:  # block start and k read from device memory (bits 20-39 and 0-19): one CUDA graph serves all
        pp = params_ptr + row * 2 if PER_ROW else params_ptr  # per row: two words each (the engine's rows)
        packed = tl.load(pp)
        block_start = ((packed >> 20) & 0xFFFFF).to(tl.int32)
        k = (packed & 0xFFFFF).to(tl.int32)
        if PER_ROW:  # bits 40-59: the row's block width when it is shorter than L (0: L)
            width = ((packed >> 40) & 0xFFFFF).to(tl.int32)
            L = tl.where(width > 0, tl.minimum(width, L), L)
        if USE_STEP:  # the step index in the block: the word after
            step = tl.load(pp + 1).to(tl.int32)
    i = tl.arange(0, BLOCK)
    inb = i < L
    crow_i = tl.load(rows_ptr + row).to(tl.int64) if ROWS else row.to(tl.int64)  # the canvas row it decides
    crow = canvas_ptr + crow_i * stride_c
    block = tl.load(crow + block_start + i, mask=inb, other=0)
    token = tl.load(token_ptr + row * stride_t + i, mask=inb, other=0)
    prob = tl.load(prob_ptr + row * stride_p + i, mask=inb, other=0.0).to(tl.float32)
    masked = (block == mask_id) & inb
    if HISTORY:  # the guesses' history at the block (persistence, a history filter): read, advance, store
        hp = crow_i * stride_h + block_start + i
        prev = tl.load(hist_tok_ptr + hp, mask=inb, other=-1)
        run = tl.load(hist_run_ptr + hp, mask=inb, other=0)
        run = tl.where(token == prev, run + 1, 1)
        tl.store(hist_tok_ptr + hp, token, mask=inb)
        tl.store(hist_run_ptr + hp, run, mask=inb)
        if HIST_CONF:
            prev_conf = tl.load(hist_conf_ptr + hp, mask=inb, other=0.0)
            tl.store(hist_conf_ptr + hp, prob, mask=inb)

    if USE_FILTER and SHARED:
        # one MLP for every position over its own features (reference.shared_features), all in registers;
        # the neighbour, prefix and count features come from [BLOCK, BLOCK] comparisons along the block
        mg = tl.load(margin_ptr + row * stride_m + i, mask=inb, other=0.0).to(tl.float32)
        en = tl.load(entropy_ptr + row * stride_e + i, mask=inb, other=0.0).to(tl.float32)
        conf_f = tl.where(masked, prob, 1.0)
        mk = masked.to(tl.float32)
        jj = tl.arange(0, BLOCK)[None, :]
        ii = i[:, None]
        left = tl.sum(tl.where(jj == ii - 1, conf_f[None, :], 0.0), 1) + tl.where(i == 0, 1.0, 0.0)
        right = tl.sum(tl.where(jj == ii + 1, conf_f[None, :], 0.0), 1) + tl.where(i == BLOCK - 1, 1.0, 0.0)
        before = tl.sum(tl.where(jj < ii, mk[None, :], 0.0), 1) / LF
        prefix_min = tl.min(tl.where(jj < ii, conf_f[None, :], 1.0), 1)
        decided = 1.0 - tl.sum(mk, 0) / LF
        hj = tl.arange(0, HB)
        hok = hj < H
        h = tl.zeros((BLOCK, HB), tl.float32) + tl.load(b1_ptr + hj, mask=hok, other=0.0)[None, :]
        h += conf_f[:, None] * tl.load(w1_ptr + hj * W + 0, mask=hok, other=0.0)[None, :]
        h += tl.where(masked, mg, 1.0)[:, None] * tl.load(w1_ptr + hj * W + 1, mask=hok, other=0.0)[None, :]
        h += tl.where(masked, en, 0.0)[:, None] * tl.load(w1_ptr + hj * W + 2, mask=hok, other=0.0)[None, :]
        h += (i * 1.0 / LF)[:, None] * tl.load(w1_ptr + hj * W + 3, mask=hok, other=0.0)[None, :]
        h += (step * 1.0 / LF) * tl.load(w1_ptr + hj * W + 4, mask=hok, other=0.0)[None, :]
        h += decided * tl.load(w1_ptr + hj * W + 5, mask=hok, other=0.0)[None, :]
        h += left[:, None] * tl.load(w1_ptr + hj * W + 6, mask=hok, other=0.0)[None, :]
        h += right[:, None] * tl.load(w1_ptr + hj * W + 7, mask=hok, other=0.0)[None, :]
        h += before[:, None] * tl.load(w1_ptr + hj * W + 8, mask=hok, other=0.0)[None, :]
        h += prefix_min[:, None] * tl.load(w1_ptr + hj * W + 9, mask=hok, other=0.0)[None, :]
        if HIST_FEATS:  # a history filter: run length (capped), previous confidence, change (HISTORY_FEATURES)
            run_f = tl.minimum(tl.where(inb, run, 1), RUN_CAP).to(tl.float32) / RUN_CAP
            pc = tl.where(inb, prev_conf, 0.0)
            h += run_f[:, None] * tl.load(w1_ptr + hj * W + 10, mask=hok, other=0.0)[None, :]
            h += pc[:, None] * tl.load(w1_ptr + hj * W + 11, mask=hok, other=0.0)[None, :]
            h += (conf_f - pc)[:, None] * tl.load(w1_ptr + hj * W + 12, mask=hok, other=0.0)[None, :]
        h = tl.maximum(h, 0.0)
        logit = tl.sum(h * tl.load(w2_ptr + hj, mask=hok, other=0.0)[None, :], 1) + tl.load(b2_ptr)
        score = 1.0 / (1.0 + tl.exp(-logit))
    elif USE_FILTER:
        # features: confidences (margins) 1.0, entropies 0.0 at decoded positions and past a short last block,
        # LF inputs each, side by side in the first layer's columns; then the step index / LF
        hj = tl.arange(0, HB)
        hok = hj < H
        wmask = hok[:, None] & (i[None, :] < LF)
        feat = tl.where(masked, prob, 1.0)
        w1 = tl.load(w1_ptr + hj[:, None] * W + i[None, :], mask=wmask, other=0.0)
        h = tl.sum(w1 * feat[None, :], 1) + tl.load(b1_ptr + hj, mask=hok, other=0.0)
        col = LF
        if USE_MARGIN:
            mg = tl.load(margin_ptr + row * stride_m + i, mask=inb, other=0.0).to(tl.float32)
            w1 = tl.load(w1_ptr + hj[:, None] * W + col + i[None, :], mask=wmask, other=0.0)
            h += tl.sum(w1 * tl.where(masked, mg, 1.0)[None, :], 1)
            col += LF
        if USE_ENTROPY:
            en = tl.load(entropy_ptr + row * stride_e + i, mask=inb, other=0.0).to(tl.float32)
            w1 = tl.load(w1_ptr + hj[:, None] * W + col + i[None, :], mask=wmask, other=0.0)
            h += tl.sum(w1 * tl.where(masked, en, 0.0)[None, :], 1)
            col += LF
        if USE_STEP:
            h += tl.load(w1_ptr + hj * W + col, mask=hok, other=0.0) * (step * 1.0 / LF)
        h = tl.maximum(h, 0.0)
        for layer in tl.static_range(N_MID):
            wm = tl.load(wm_ptr + layer * H * H + hj[:, None] * H + hj[None, :],
                         mask=hok[:, None] & hok[None, :], other=0.0)
            hn = tl.sum(wm * h[None, :], 1) + tl.load(bm_ptr + layer * H + hj, mask=hok, other=0.0)
            h = tl.maximum(hn, 0.0)
        w2 = tl.load(w2_ptr + i[:, None] * H + hj[None, :], mask=(i[:, None] < LF) & hok[None, :], other=0.0)
        logit = tl.sum(w2 * h[None, :], 1) + tl.load(b2_ptr + i, mask=i < LF, other=0.0)
        score = 1.0 / (1.0 + tl.exp(-logit))
    elif RULE == 1:  # margin: top-1 minus top-2 probability
        score = tl.load(margin_ptr + row * stride_m + i, mask=inb, other=0.0).to(tl.float32)
    elif RULE == 2:  # persistence: the guess unchanged for `persist` forwards in a row (this one included)
        score = tl.where(run >= persist, prob, -1.0)
    else:
        score = prob

    # the k most confident masked positions; ties to the lowest index
    p_i = tl.where(masked, prob, float("-inf"))
    j = tl.arange(0, BLOCK)
    p_j = p_i[None, :]
    m_j = masked[None, :]
    beats = ((p_j > p_i[:, None]) | ((p_j == p_i[:, None]) & (j[None, :] < i[:, None]))) & m_j
    rank = tl.sum(beats.to(tl.int32), 1)
    accept = masked & ((score > threshold) | (rank < k))
    new = tl.where(accept, token, block)
    n_before = tl.sum(masked.to(tl.int32), 0)

    eot = tl.full((), -1, tl.int64)
    if EOTP > 0:
        first = tl.min(tl.where((new == eos_id) & inb, i, BLOCK), 0)
        if EOTP == 2:
            pred = (new == mask_id) & inb & (token == eos_id)
            q_i = tl.where(pred, prob, float("-inf"))
            q_j = q_i[None, :]
            qb = ((q_j > q_i[:, None]) | ((q_j == q_i[:, None]) & (j[None, :] < i[:, None]))) & pred[None, :]
            top = pred & (tl.sum(qb.to(tl.int32), 1) == 0)
            first = tl.minimum(first, tl.min(tl.where(top, i, BLOCK), 0))
        # the cut inside the block is applied in registers and stored once (no store-then-load of the same
        # addresses across threads); positions after the block are only written
        new = tl.where((i > first) | ((i == first) & (new == mask_id)), eos_id, new)
        if first < BLOCK:
            eot = (block_start + first).to(tl.int64)
            for start in range(block_start + L, T, TAIL):
                offs = start + tl.arange(0, TAIL)
                tl.store(crow + offs, tl.full((TAIL,), eos_id, tl.int64), mask=offs < T)
    tl.store(crow + block_start + i, new, mask=inb)
    still = (new == mask_id) & inb
    n_left = tl.sum(still.to(tl.int32), 0)
    tl.store(out_ptr + row, (n_before - n_left).to(tl.int64))
    tl.store(out_ptr + n_rows + row, n_left.to(tl.int64))
    tl.store(out_ptr + 2 * n_rows + row, eot)


def decide(
    canvas: torch.Tensor,
    token: torch.Tensor,
    prob: torch.Tensor,
    *,
    block_start: int,
    k: int,
    threshold: float,
    mask_id: int,
    eos_id: int,
    eotp: str = "off",
    filter_weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    filter_block: int | None = None,
    filter_inputs=("confidence",),
    margin: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    step: int = 0,
    filter_kind: str = "dense",
    params: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rule: str = "confidence",
    history: tuple[torch.Tensor, torch.Tensor] | None = None,
    persist: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``l2pd_kernels.reference.decide`` (same arguments and results).

    ``params`` (int64 [1] on the device, ``block_start << 20 | k``; bits from 40 up are free for the caller;
    [2] with the step index in the second word for a filter that reads it), when given, replaces
    ``block_start``, ``k`` and ``step`` at run time (the Python values then only size the checks): what a
    captured CUDA graph needs. ``params`` [B, 2] gives each row its own words, and there bits 40-59 hold the
    row's block width when it is shorter than L (0: L; a block-causal model's first block, a last block);
    ``rows`` [B] (int64) sends row i of ``token``/``prob`` to canvas row ``rows[i]`` (the engine's rows each
    sit at their own block).
    """
    if canvas.dim() != 2 or canvas.dtype != torch.int64:
        raise ValueError(f"canvas must be int64 [B, T], got {canvas.dtype} {tuple(canvas.shape)}")
    if canvas.stride(1) != 1:
        raise ValueError("canvas must be contiguous along the sequence")
    B, L = token.shape
    if rows is not None and (rows.shape != (B,) or rows.dtype != torch.int64):
        raise ValueError(f"rows must be int64 [{B}], got {rows.dtype} {tuple(rows.shape)}")
    per_row = params is not None and params.dim() == 2
    if per_row and params.shape != (B, 2):
        raise ValueError(f"per-row params must be int64 [{B}, 2], got {tuple(params.shape)}")
    if prob.shape != (B, L) or (rows is None and canvas.shape[0] != B):
        raise ValueError(f"token {tuple(token.shape)}, prob {tuple(prob.shape)}, canvas {tuple(canvas.shape)}")
    if block_start < 0 or block_start + L > canvas.shape[1]:
        raise ValueError(f"block {block_start}..{block_start + L} is outside the canvas of {canvas.shape[1]}")
    if eotp not in EOTP_MODES:
        raise ValueError(f"eotp {eotp!r}: expected one of {list(EOTP_MODES)}")
    rule_id = check_rule(rule, canvas, filter_weights, margin, history, persist, B, L)
    hist_feats = filter_weights is not None and filter_kind == "history"
    if hist_feats:
        check_history(history, canvas, 3, "a history filter")
    uses_history = rule == "persistence" or hist_feats
    hist = tuple(history) if uses_history else (canvas, canvas)
    hist_tok, hist_run = hist[:2]
    hist_conf = hist[2] if len(hist) == 3 else prob
    token = token.to(torch.int64)
    token = token if token.stride(1) == 1 else token.contiguous()
    prob = prob if prob.stride(1) == 1 else prob.contiguous()
    out = torch.empty(3, B, dtype=torch.int64, device=canvas.device)
    w1 = b1 = wm = bm = w2 = b2 = prob  # never read when the filter is off
    LF, W, H, n_mid = L, L, 1, 0
    shared = filter_weights is not None and filter_kind in ("shared", "history")
    if filter_kind not in ("dense", "shared", "history"):
        raise ValueError(f"filter_kind {filter_kind!r}: expected 'dense', 'shared' or 'history'")
    features = HISTORY_FEATURES if hist_feats else SHARED_FEATURES
    if shared:
        inputs = features
    else:
        inputs = check_inputs(filter_inputs) if filter_weights is not None else ("confidence",)
    stats = {}
    for name, v in (("margin", margin), ("entropy", entropy)):
        if name in inputs:
            if v is None or v.shape != (B, L):
                raise ValueError(f"the filter reads {name!r}: expected [{B}, {L}], got "
                                 f"{None if v is None else tuple(v.shape)}")
            stats[name] = v if v.stride(1) == 1 else v.contiguous()
    if "step" in inputs and params is not None and params.shape[-1] < 2:
        raise ValueError("a filter that reads the step index needs params with 2 words (the step in the second)")
    if shared:
        LF = filter_block or L
        (w1, b1), (w2, b2) = filter_weights[0], filter_weights[-1]
        H, W = w1.shape
        if len(filter_weights) != 2 or W != len(features) or w2.shape != (1, H):
            raise ValueError(f"the kernel runs {filter_kind} filters of one hidden layer over {len(features)} "
                             f"features, got layers {[tuple(w.shape) for w, _ in filter_weights]}")
        if L > LF:
            raise ValueError(f"block of {L} positions exceeds the filter's block_length {LF}")
        if H > 128:
            raise ValueError(f"shared filter hidden size {H} is too large for the fused kernel (limit 128)")
    elif filter_weights is not None:
        LF = filter_block or filter_weights[-1][0].shape[0]
        if L > LF:
            raise ValueError(f"block of {L} positions exceeds the filter's block_length {LF}")
        (w1, b1), (w2, b2) = filter_weights[0], filter_weights[-1]
        H, W = w1.shape
        if W != filter_width(inputs, LF) or w2.shape[0] != LF:
            raise ValueError(f"filter weights {tuple(w1.shape)} / {tuple(w2.shape)} do not match inputs "
                             f"{list(inputs)} at block_length {LF}")
        mids = filter_weights[1:-1]
        n_mid = len(mids)
        if n_mid:
            if any(w.shape != (H, H) for w, _ in mids):
                raise ValueError("the kernel needs equal hidden sizes in every filter layer")
            wm = torch.stack([w for w, _ in mids]).contiguous()
            bm = torch.stack([b for _, b in mids]).contiguous()
        if H > 512:
            raise ValueError(f"filter hidden size {H} is too large for the fused kernel (limit 512)")
    BLOCK = triton.next_power_of_2(max(L, LF))
    mg, en = stats.get("margin", prob), stats.get("entropy", prob)
    if rule == "margin":
        mg = margin if margin.stride(1) == 1 else margin.contiguous()
    if B:
        _decide_kernel[(B,)](
            canvas, token, prob, mg, en, out, hist_tok, hist_run, hist_conf, hist_tok.stride(0), int(persist),
            w1, b1, wm, bm, w2, b2,
            canvas.shape[1], B, canvas.stride(0), token.stride(0), prob.stride(0), mg.stride(0), en.stride(0),
            # with params the kernel reads block start, k and step from device memory; constant launch
            # arguments keep Triton from specialising (and compiling) per block inside a graph capture
            0 if params is not None else block_start, L, LF, W, H, 0 if params is not None else int(k),
            0 if params is not None else int(step), float(threshold), int(mask_id), int(eos_id),
            out if params is None else params, out if rows is None else rows,
            BLOCK=BLOCK, ROWS=rows is not None, PER_ROW=per_row, HB=triton.next_power_of_2(H), N_MID=n_mid,
            USE_FILTER=filter_weights is not None, RULE=rule_id,
            EOTP=EOTP_MODES[eotp], TAIL=256, DYN_PARAMS=params is not None,
            USE_MARGIN="margin" in inputs, USE_ENTROPY="entropy" in inputs, USE_STEP="step" in inputs,
            SHARED=shared, HISTORY=uses_history, HIST_CONF=uses_history and len(hist) == 3, HIST_FEATS=hist_feats,
            RUN_CAP=RUN_CAP, **pdl(canvas.device, "decide"),
        )
    return out[0], out[1], out[2]  # views: no extra kernel launches
