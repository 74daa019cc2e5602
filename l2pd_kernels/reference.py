"""Plain PyTorch versions of the per-step ops: ground truth for the Triton kernels and the CPU path.

Conventions shared with the kernels:
- Logits are read in fp32. NaN counts as -inf; +inf counts as the largest finite fp32 value. A row with no
  finite logit at all gives token 0 with probability 0.
- Ties go to the lowest index (as ``torch.argmax``), in the vocabulary and in the top-k fallback.
- Sampling (temperature > 0) is Gumbel-max with a counter-based hash of (seed, row, vocab index), so a seed
  fixes the samples on every backend. The returned probability is that of the chosen token under the
  untempered softmax (LLaDA's confidence).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

EOTP_MODES = {"off": 0, "accepted": 1, "predicted": 2}
_U32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash on uint32 values held in int64."""
    x = x & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, rows: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, vocab] in fp32 from the counter hash; rows are flattened (b * L + l)."""
    r = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    v = torch.arange(vocab, device=device, dtype=torch.int64)[None, :]
    h = _mix32(v + _mix32(r + _mix32(torch.tensor(seed & _U32, device=device))))
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)  # 24 random bits, strictly inside (0, 1)
    return -torch.log(-torch.log(u))


def _clean(logits: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    return x.clamp(max=torch.finfo(torch.float32).max)


def confidence(
    logits: torch.Tensor, temperature: float = 0.0, seed: int | None = None, suppress: int | None = None,
    stats: bool = False,
) -> tuple[torch.Tensor, ...]:
    """logits [B, L, V] -> (token int64 [B, L], probability fp32 [B, L]).

    ``suppress``: a token id that is never chosen and leaves the softmax (the mask id: a mask predicted for a
    masked position would leave it masked, and decoding would make no progress). ``stats=True`` also returns
    the margin (top-1 minus top-2 probability; a tie at the top gives 0) and the entropy (nats) of the same
    softmax, fp32 [B, L] each: the richer filter inputs. A row with no finite logit gives margin 0 and
    entropy 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, L, V], got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    B, L, V = logits.shape
    x = _clean(logits)
    if suppress is not None:
        x[..., suppress] = float("-inf")
    if temperature > 0:
        if seed is None:
            raise ValueError("sampling (temperature > 0) needs a seed")
        noise = gumbel_noise(seed, B * L, V, logits.device).view(B, L, V)
        token = (x / temperature + noise).argmax(-1)
    else:
        token = x.argmax(-1)
    m = x.amax(-1, keepdim=True)
    finite = torch.isfinite(m)
    denom = torch.exp(x - torch.where(finite, m, torch.zeros_like(m))).sum(-1)
    chosen = x.gather(-1, token[..., None]).squeeze(-1)
    prob = torch.exp(chosen - m.squeeze(-1)) / denom
    prob = torch.where(finite.squeeze(-1), prob, torch.zeros_like(prob))
    if not stats:
        return token, prob
    return (token, prob) + softmax_stats(x)


def softmax_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 minus top-2 probability, entropy in nats) of softmax(x) over the last axis; x holds cleaned
    fp32 logits (no NaN, no +inf). Rows without a finite value give (0, 0)."""
    m = x.amax(-1, keepdim=True)
    finite = torch.isfinite(m.squeeze(-1))
    z = x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z)
    s = e.sum(-1)
    top2 = x.topk(min(2, x.shape[-1]), -1).values
    second = top2[..., 1] if top2.shape[-1] > 1 else torch.full_like(s, float("-inf"))
    margin = (1 - torch.exp(second - m.squeeze(-1))) / s
    plogp = torch.where(e > 0, e * z, torch.zeros_like(e)).sum(-1)  # sum exp(z) * z, 0 * -inf taken as 0
    entropy = torch.log(s) - plogp / s
    zero = torch.zeros_like(s)
    return torch.where(finite, margin, zero), torch.where(finite, entropy, zero)


def filter_logits(features: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The filter MLP: Linear -> ReLU -> ... -> Linear, on features [B, block_length] (fp32)."""
    h = features.float()
    for i, (w, b) in enumerate(weights):
        h = torch.nn.functional.linear(h, w.float(), b.float())
        if i < len(weights) - 1:
            h = torch.relu(h)
    return h


FILTER_INPUTS = ("confidence", "margin", "entropy", "step")  # the canonical order of a filter's inputs
_DECODED = {"confidence": 1.0, "margin": 1.0, "entropy": 0.0}  # the value at decoded and padding positions


def check_inputs(inputs) -> tuple[str, ...]:
    """A filter's input layout: an ordered subset of ``FILTER_INPUTS`` that starts with confidence."""
    inputs = tuple(inputs)
    if not inputs or inputs[0] != "confidence" or len(set(inputs)) != len(inputs) or \
            [i for i in FILTER_INPUTS if i in inputs] != list(inputs):
        raise ValueError(f"filter inputs {list(inputs)}: expected an ordered subset of {list(FILTER_INPUTS)} "
                         "that starts with 'confidence'")
    return inputs


def filter_width(inputs, block_length: int) -> int:
    """The filter's first-layer width: ``block_length`` per per-position input, one for the step index."""
    return sum(1 if name == "step" else block_length for name in inputs)


def filter_features(prob: torch.Tensor, masked: torch.Tensor, block_length: int, inputs=("confidence",),
                    margin: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                    step: int | torch.Tensor = 0) -> torch.Tensor:
    """The filter's input [B, width]: per input of ``inputs`` in order, the block's values (confidence and
    margin 1.0, entropy 0.0 at decoded positions and past a short last block), then ``step`` (forwards
    already spent on this block) divided by ``block_length``. Confidence only is Learn2PD's original filter."""
    given = {"confidence": prob, "margin": margin, "entropy": entropy}
    parts = []
    for name in check_inputs(inputs):
        if name == "step":
            s = torch.as_tensor(step, dtype=torch.float32, device=prob.device)
            parts.append((s / block_length).expand(prob.shape[0])[:, None])
        elif given[name] is None:
            raise ValueError(f"the filter reads {name!r}: pass it (confidence(..., stats=True) computes it)")
        else:
            parts.append(filter_channel(given[name], masked, block_length, name))
    return torch.cat(parts, 1)


# A shared filter scores each position from its own features with one small MLP for every position (weights
# shared along the block): it trains on every masked position and its size does not grow with the block.
SHARED_FEATURES = ("confidence", "margin", "entropy", "position", "step", "decided", "left", "right",
                   "masked_before", "prefix_min")


def shared_features(conf: torch.Tensor, margin: torch.Tensor, entropy: torch.Tensor, masked: torch.Tensor,
                    step: int | torch.Tensor, block_length: int) -> torch.Tensor:
    """Per-position inputs [B, LF, len(SHARED_FEATURES)] of a shared filter from the filled channels [B, LF]
    (``filter_channel``: decided and padding positions read confidence 1, margin 1, entropy 0) and the
    still-masked positions ``masked`` [B, LF]: the position's confidence, margin and entropy; its index and
    the step index over the block length; the block's decided fraction; the confidences to its left and right
    (1 past the ends); the masked positions before it over the block length; the lowest confidence before it
    (1 at the first position)."""
    B, LF = conf.shape
    dev = conf.device
    m = masked.float()
    pos = (torch.arange(LF, device=dev, dtype=torch.float32) / block_length).expand(B, LF)
    st = (torch.as_tensor(step, dtype=torch.float32, device=dev) / block_length).reshape(-1, 1).expand(B, LF)
    decided = (1 - m.mean(1, keepdim=True)).expand(B, LF)
    one = torch.ones(B, 1, device=dev)
    left = torch.cat([one, conf[:, :-1]], 1)
    right = torch.cat([conf[:, 1:], one], 1)
    before = (torch.cumsum(m, 1) - m) / block_length
    prefix_min = torch.cat([one, torch.cummin(conf, 1).values[:, :-1]], 1)
    return torch.stack([conf, margin, entropy, pos, st, decided, left, right, before, prefix_min], -1)


# A history filter is a shared filter that also reads how the position's guess has evolved over the block's
# forwards (what beats a snapshot of confidences): the run length of its current guess (capped at RUN_CAP,
# over RUN_CAP), its confidence at the previous forward (0 at the block's first) and the change since.
HISTORY_FEATURES = SHARED_FEATURES + ("run", "previous", "change")
RUN_CAP = 8


def history_features(shared: torch.Tensor, conf: torch.Tensor, run: torch.Tensor,
                     previous: torch.Tensor) -> torch.Tensor:
    """[B, LF, len(HISTORY_FEATURES)]: ``shared_features`` and, per position, its run length ``run`` (this
    forward included), its previous confidence ``previous`` and the change ``conf - previous``."""
    runf = run.float().clamp(max=RUN_CAP) / RUN_CAP
    previous = previous.float()
    return torch.cat([shared, torch.stack([runf, previous, conf.float() - previous], -1)], -1)


def update_history(history: tuple, token: torch.Tensor, prob: torch.Tensor, block_start: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the block's history (previous guess, run length[, previous confidence]; [B, T] like the canvas)
    by this forward's guesses: returns (run length, previous confidence or zeros) as they are now, and stores
    the new values."""
    L = token.shape[1]
    prev, run = (h[:, block_start : block_start + L] for h in history[:2])
    new_run = torch.where(token == prev, run + 1, torch.ones_like(run))
    prev.copy_(token)
    run.copy_(new_run)
    if len(history) < 3:
        return new_run, torch.zeros_like(prob, dtype=torch.float32)
    pc = history[2][:, block_start : block_start + L]
    before = pc.clone()
    pc.copy_(prob.float())
    return new_run, before


def filter_channel(value: torch.Tensor, masked: torch.Tensor, block_length: int, name: str) -> torch.Tensor:
    """One per-position input [B, block_length]: ``value`` at masked positions, the decided value elsewhere."""
    fill = _DECODED[name]
    f = torch.where(masked, value.float(), torch.full_like(value, fill, dtype=torch.float32))
    pad = block_length - f.shape[1]
    return torch.nn.functional.pad(f, (0, pad), value=fill) if pad > 0 else f


def filter_scores(prob: torch.Tensor, masked: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]],
                  block_length: int, inputs=("confidence",), kind: str = "dense", margin: torch.Tensor | None = None,
                  entropy: torch.Tensor | None = None, step: int | torch.Tensor = 0,
                  run: torch.Tensor | None = None, previous: torch.Tensor | None = None) -> torch.Tensor:
    """sigmoid(filter logits) [B, L] for the block's still-masked positions ``masked`` [B, L]: a dense filter
    over ``filter_features``, a shared one over each position's ``shared_features``, a history one also over
    its ``run`` and ``previous`` confidence (``history_features``)."""
    L = prob.shape[1]
    if kind in ("shared", "history"):
        feats = position_inputs(prob, masked, block_length, kind, margin, entropy, step, run, previous)
        return torch.sigmoid(filter_logits(feats, weights)[..., 0])[:, :L]
    feats = filter_features(prob, masked, block_length, inputs, margin, entropy, step)
    return torch.sigmoid(filter_logits(feats, weights))[:, :L]


def position_inputs(prob: torch.Tensor, masked: torch.Tensor, block_length: int, kind: str,
                    margin: torch.Tensor | None, entropy: torch.Tensor | None, step: int | torch.Tensor = 0,
                    run: torch.Tensor | None = None, previous: torch.Tensor | None = None) -> torch.Tensor:
    """A shared or history filter's inputs [B, block_length, features] for the block's positions [B, L]."""
    if margin is None or entropy is None:
        raise ValueError(f"a {kind} filter reads margins and entropies (confidence(..., stats=True))")
    L = prob.shape[1]
    ch = [filter_channel(v, masked, block_length, n) for v, n in ((prob, "confidence"), (margin, "margin"),
                                                                  (entropy, "entropy"))]
    feats = shared_features(*ch, torch.nn.functional.pad(masked, (0, block_length - L)), step, block_length)
    if kind == "history":
        pad = (0, block_length - L)
        feats = history_features(feats, ch[0], torch.nn.functional.pad(run, pad, value=1),
                                 torch.nn.functional.pad(previous.float(), pad))
    return feats


def topk_lowest_index(score: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [B, L]: the k highest scores among eligible positions, ties to the lowest index."""
    s = torch.where(eligible, score.float(), torch.full_like(score, float("-inf"), dtype=torch.float32))
    L = s.shape[1]
    idx = torch.arange(L, device=s.device)
    beats = (s[:, None, :] > s[:, :, None]) | ((s[:, None, :] == s[:, :, None]) & (idx[None, :] < idx[:, None]))
    rank = (beats & eligible[:, None, :]).sum(-1)  # how many eligible positions come before position i
    return eligible & (rank < k)


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
    """One step's decision for the block ``canvas[:, block_start : block_start + L]``; updates ``canvas``.

    A still-masked position is accepted when its score exceeds ``threshold`` (score: sigmoid of the filter's
    logit with a filter, else the confidence), and the ``k`` most confident still-masked positions are always
    accepted. Accepted positions get their token. EoTP: ``accepted`` finds the first end-of-text token in the
    block and writes end-of-text to every position after it, to the end of the canvas; ``predicted`` also
    cuts at the most confident still-masked end-of-text prediction. A filter reads ``filter_inputs`` (see
    ``filter_features``; ``margin``/``entropy`` [B, L] and ``step`` when it names them); a ``filter_kind``
    'shared' filter scores each position from ``shared_features``. Returns per row
    (positions of the block decided by this step, masks left in the block, end-of-text position or -1; all
    int64).

    Without a filter, ``rule`` picks the score the threshold applies to: ``confidence`` (the guess's
    probability), ``margin`` (top-1 minus top-2 probability; ``margin`` [B, L] given) or ``persistence`` (the
    confidence, but only where the guess has been the same for ``persist`` forwards in a row, this one
    included; ``history`` = (previous guess int64, run length int32), both [B, T] like the canvas (previous
    guess -1 at the start), read and updated at the block's positions).

    Per row (the engine): ``params`` int64 [B, 2] holds ``width << 40 | block_start << 20 | k`` and the step
    index of each row (``width``: the row's block width when shorter than L, 0 for L: only the first ``width``
    positions decide), and ``rows`` [B] the canvas row each row of ``token``/``prob`` decides (default: row i).
    """
    if params is not None or rows is not None:
        return _decide_rows(canvas, token, prob, params, rows, block_start=block_start, k=k, step=step,
                            threshold=threshold, mask_id=mask_id, eos_id=eos_id, eotp=eotp,
                            filter_weights=filter_weights, filter_block=filter_block, filter_inputs=filter_inputs,
                            margin=margin, entropy=entropy, filter_kind=filter_kind, rule=rule, history=history,
                            persist=persist)
    B, L = token.shape
    check_rule(rule, canvas, filter_weights, margin, history, persist, B, L)
    if filter_weights is not None and filter_kind == "history":
        check_history(history, canvas, 3, "a history filter")
    block = canvas[:, block_start : block_start + L]
    masked = block == mask_id
    if filter_weights is not None:
        run = previous = None
        if filter_kind == "history":
            run, previous = update_history(history, token, prob, block_start)
        score = filter_scores(prob, masked, filter_weights, filter_block or L, filter_inputs, filter_kind, margin,
                              entropy, step, run, previous)
    elif rule == "margin":
        score = margin.float()
    elif rule == "persistence":
        new_run, _ = update_history(history, token, prob, block_start)
        score = torch.where(new_run >= persist, prob.float(), torch.full_like(prob, -1.0, dtype=torch.float32))
    else:
        score = prob.float()
    accept = masked & (score > threshold)
    accept |= topk_lowest_index(prob, masked, k)
    block.copy_(torch.where(accept, token, block))
    still = block == mask_id

    idx = torch.arange(L, device=canvas.device)
    eot = torch.full((B,), -1, dtype=torch.int64, device=canvas.device)
    mode = EOTP_MODES[eotp]
    if mode:
        first = torch.where(block == eos_id, idx, L).amin(-1)
        if mode == 2:
            pred = still & (token == eos_id)
            best = topk_lowest_index(prob, pred, 1)
            cut_pred = torch.where(best, idx, L).amin(-1)
            first = torch.minimum(first, cut_pred)
        eot = end_fill(canvas, block_start + first, first < L, mask_id, eos_id)
        still = block == mask_id
    left = still.sum(-1)
    return masked.sum(-1) - left, left, eot


def end_fill(canvas: torch.Tensor, pos: torch.Tensor, has: torch.Tensor, mask_id: int, eos_id: int) -> torch.Tensor:
    """EoTP's cut: in rows ``has``, end-of-text at canvas column ``pos`` (if still masked) and every column
    after it. Returns the cut column per row, -1 where none."""
    col = torch.arange(canvas.shape[1], device=canvas.device)
    fill = has[:, None] & (col[None, :] >= pos[:, None]) & ((col[None, :] > pos[:, None]) | (canvas == mask_id))
    canvas.copy_(torch.where(fill, torch.full_like(canvas, eos_id), canvas))
    return torch.where(has, pos, torch.full_like(pos, -1))


RULES = ("confidence", "margin", "persistence")


def check_rule(rule: str, canvas: torch.Tensor, filter_weights: Any, margin: torch.Tensor | None,
               history: Any, persist: int, B: int, L: int) -> int:
    """The rule's index after checking what it reads; a ValueError naming what is missing."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {list(RULES)}")
    if rule != "confidence" and filter_weights is not None:
        raise ValueError(f"rule {rule!r} is a training-free rule; a filter scores by itself")
    if rule == "margin" and (margin is None or margin.shape != (B, L)):
        got = None if margin is None else tuple(margin.shape)
        raise ValueError(f"rule 'margin' needs margin [{B}, {L}], got {got}")
    if rule == "persistence":
        check_history(history, canvas, 2, "rule 'persistence'")
        if int(persist) < 1:
            raise ValueError(f"persist={persist} must be >= 1")
    return RULES.index(rule)


def check_history(history: Any, canvas: torch.Tensor, need: int, who: str) -> None:
    """``history`` = (previous guess int64, run length int32[, previous confidence float32]), each shaped and
    strided like the canvas; ``need`` of them at least."""
    if history is None or not need <= len(history) <= 3:
        names = "previous guess, run length" + (", previous confidence" if need == 3 else "")
        raise ValueError(f"{who} needs history=({names})")
    want = (torch.int64, torch.int32, torch.float32)
    bad = any(h.shape != canvas.shape or h.dtype != d or h.stride() != history[0].stride()
              for h, d in zip(history, want))
    if bad or history[0].stride(1) != 1:
        raise ValueError(f"history must be {[str(d) for d in want[:len(history)]]} tensors shaped like the canvas "
                         f"{tuple(canvas.shape)} with equal strides, got "
                         f"{[(str(h.dtype), tuple(h.shape)) for h in history]}")


def _decide_rows(canvas, token, prob, params, rows, *, block_start, k, step, margin, entropy, history=None, **kw):
    """``decide`` one row at a time, each at its own block start, k and step, on its own canvas row."""
    B = token.shape[0]
    outs = []
    for i in range(B):
        r = i if rows is None else int(rows[i])
        width = token.shape[1]
        if params is not None and params.dim() == 2:
            word, step_i = int(params[i, 0]), int(params[i, 1])
            s_i, k_i = (word >> 20) & 0xFFFFF, word & 0xFFFFF
            width = min(width, (word >> 40) & 0xFFFFF or width)
        elif params is not None:  # one shared word
            word = int(params[0])
            s_i, k_i = (word >> 20) & 0xFFFFF, word & 0xFFFFF
            step_i = int(params[1]) if params.numel() > 1 else step
        else:
            s_i, k_i, step_i = block_start, k, step
        one = (slice(i, i + 1), slice(0, width))
        outs.append(decide(canvas[r : r + 1], token[one], prob[one], block_start=s_i, k=k_i, step=step_i,
                           margin=None if margin is None else margin[one],
                           entropy=None if entropy is None else entropy[one],
                           history=None if history is None else tuple(h[r : r + 1] for h in history), **kw))
    if not outs:
        empty = torch.zeros(0, dtype=torch.int64, device=canvas.device)
        return empty, empty, empty
    return tuple(torch.cat(col) for col in zip(*outs))


# ---- the forward's elementwise ops (fused by the kernels in rms_norm.py, rope.py, silu_mul.py) -----------


class ExpertRows(NamedTuple):
    """A mixture of experts' output before its combine (``fused_moe(..., combine=False)``): ``rows`` [N * k (+ N),
    D] each (token, expert slot)'s down projection in x's dtype, unweighted (then the shared expert's rows, when
    the experts' kernels ran it), ``weights`` [N, k] fp32 routing weights, ``shared`` [N, D] the shared expert's
    output or None. ``moe_combine`` gives the output; ``rms_norm`` takes it as its ``delta`` and combines in the
    same pass."""

    rows: torch.Tensor
    weights: torch.Tensor
    shared: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.weights.shape[0], self.rows.shape[1]))


def moe_combine(parts: ExpertRows) -> torch.Tensor:
    """A token's k expert outputs weighted in fp32 and summed in slot order (each product rounded to fp32 before
    the add), rounded to the rows' dtype, plus the shared expert's output: ``fused_moe``'s last step."""
    N, k = parts.weights.shape
    y = parts.rows[: N * k].view(N, k, -1).float() * parts.weights.float()[..., None]
    acc = y[:, 0]
    for j in range(1, k):
        acc = acc + y[:, j]
    out = acc.to(parts.rows.dtype)
    return out if parts.shared is None else out + parts.shared


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             delta: torch.Tensor | ExpertRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + delta) * weight, x + delta) in the official order: the sum rounded to x's dtype,
    normalised in fp32, rounded back, then scaled by the weight. ``delta`` may be a mixture of experts' rows
    before their combine (``ExpertRows``): combined first, as ``moe_combine``."""
    if isinstance(delta, ExpertRows):
        delta = moe_combine(delta).view(x.shape)
    if delta is not None:
        x = x + delta
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (h if weight is None else weight * h), x


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 delta: torch.Tensor | ExpertRows | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``rms_norm``, and its normed rows quantized by ``quantize_rows_fp8`` (the input of an e4m3 product)."""
    h, total = rms_norm(x, weight, eps, delta)
    return h, total, quantize_rows_fp8(h)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer, ``x @ w.T + bias``."""
    return torch.nn.functional.linear(x, w, bias)


def linear_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in fp32 (a router's logits from half-precision rows and weight)."""
    return torch.nn.functional.linear(x.float(), w.float())


def linear_gate_up_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for a packed ``w = cat([gate, up])``: the gated MLP's first half."""
    gate, up = torch.nn.functional.linear(x, w).chunk(2, -1)
    return silu_mul(gate, up)


def linear_rope_qkv(x: torch.Tensor, w: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor,
                    sin: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, slots: torch.Tensor,
                    rows: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                    k_norm: torch.Tensor | None = None, eps: float = 1e-6, scale: torch.Tensor | None = None,
                    a8: bool = False, xq: tuple[torch.Tensor, torch.Tensor] | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``rope_qkv`` of the q, k and v column slices of x [B, S, K] times w [(heads + 2 kv_heads) * D, K]
    (``linear``; e4m3 w with ``scale``: ``linear_fp8``, or ``linear_w8a8`` with ``a8``)."""
    if scale is None:
        qkv = linear(x, w)
    else:
        qkv = linear_w8a8(x, w, scale, xq) if a8 else linear_fp8(x, w, scale)
    B, S = x.shape[:2]
    D = w.shape[0] // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], -1)
    return rope_qkv(q.view(B, S, heads, D), k.view(B, S, kv_heads, D), v.view(B, S, kv_heads, D), cos, sin,
                    k_out, v_out, slots, rows, q_norm, k_norm, eps, k_scale, v_scale)


def rope_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             k_out: torch.Tensor, v_out: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor | None = None,
             q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding (rotate-half layout, fp32) of q [B, S, H, D] and k [B, S, Hkv, D]; with ``q_norm`` /
    ``k_norm`` [D] each head is first ``rms_norm``-ed over its D dims with that weight and ``eps``.

    ``cos``/``sin`` are fp32 [B, S, R/2]: R = D rotates whole heads; R < D (partial RoPE, LLaDA 2.x) rotates
    the first R dims of each head (pairs i and i + R/2) and passes the rest through. Writes rotated k and v into
    ``k_out``/``v_out`` [B, Hkv, T, D] at ``slots`` [S] (position s to slot slots[s]) and returns rotated q as
    [B, H, S, D]. With ``rows`` [S] (B = 1: one packed sequence) position s goes to row ``rows[s]`` of
    ``k_out``/``v_out`` [R, Hkv, T, D]. An e4m3 cache (``k_out``/``v_out`` float8_e4m3fn) stores each head of
    k and v from its fp32 values by ``quantize_kv``, its scale into ``k_scale``/``v_scale`` [R, Hkv, T].
    """
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps)[0], rms_norm(k, k_norm, eps)[0]
    c = torch.cat((cos, cos), -1)[:, None]  # [B, 1, S, R]
    s = torch.cat((sin, sin), -1)[:, None]
    r = c.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.transpose(1, 2).float()
        part = xf[..., :r]
        rotated = torch.cat((-part[..., r // 2 :], part[..., : r // 2]), dim=-1)
        return torch.cat((part * c + rotated * s, xf[..., r:]), -1)

    kv = [(k_out, k_scale, rotate(k)), (v_out, v_scale, v.transpose(1, 2).float())]  # [B, Hkv, S, D] fp32
    for out, scale, x in kv:
        if (out.dtype == torch.float8_e4m3fn) != (scale is not None):
            raise ValueError("an e4m3 K/V cache takes its scales, a cache of another dtype none")
        x, x_scale = quantize_kv(x) if scale is not None else (x.to(out.dtype), None)
        if scale is not None:  # (e4m3 copied as its bytes: not every op takes the dtype)
            out, x = out.view(torch.uint8), x.view(torch.uint8)
        if rows is not None:  # [S, Hkv, D]
            out[rows, :, slots] = x[0].transpose(0, 1)
            if scale is not None:
                scale[rows, :, slots] = x_scale[0].transpose(0, 1)
        else:
            out.index_copy_(2, slots, x)
            if scale is not None:
                scale.index_copy_(2, slots, x_scale)
    return rotate(q).to(q.dtype)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [..., D], fp32 scales [...]): each head vector of an e4m3 K/V cache scaled so its largest magnitude
    is 448 (scale 1 for all zeros), rounded to nearest (``quantize_rows_fp8`` over the last dimension)."""
    q, scale = quantize_rows_fp8(x)
    return q.view(x.shape), scale.view(x.shape[:-1])


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A K/V cache's values in ``dtype``: e4m3 ones times their head's scale (fp32, then rounded); others as
    they are (``scale`` None)."""
    if scale is None:
        return x
    return (x.float() * scale[..., None]).to(dtype)


def pool_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: torch.Tensor,
                   tiles: torch.Tensor | None = None, block_m: int = 64, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed queries q [1, H, N, D] over a slot pool's K/V rows [R, Hkv, T, D].

    ``seg`` int64 [G, 4] holds one (q_start, q_len, row, k_len) per segment: queries [q_start, q_start + q_len)
    attend, without a mask, to keys [0, k_len) of cache row ``row``. Returns [1, H, N, D] (queries outside
    every segment are zero). ``tiles`` and ``block_m`` only shape the kernel's programs. An e4m3 cache comes
    with its scales [R, Hkv, T]: its rows are dequantized in fp32 and attended to in fp32.
    """
    out = torch.zeros_like(q)
    for q_start, q_len, row, k_len in seg.tolist():
        if q_len == 0:
            continue
        # contiguous, as a [1, Hkv, k_len, D] cache of its own would be: SDPA's CPU kernels round differently
        # on strided keys, and a request's tokens should not depend on the pool's width
        k = k_cache[row : row + 1, :, :k_len].contiguous()
        v = v_cache[row : row + 1, :, :k_len].contiguous()
        qs = q[:, :, q_start : q_start + q_len]
        if k_scale is not None:
            k = dequantize_kv(k, k_scale[row : row + 1, :, :k_len], torch.float32)
            v = dequantize_kv(v, v_scale[row : row + 1, :, :k_len], torch.float32)
            qs = qs.float()
        out[:, :, q_start : q_start + q_len] = torch.nn.functional.scaled_dot_product_attention(
            qs, k, v, enable_gqa=k.shape[1] != q.shape[1]).to(q.dtype)
    return out


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     key_limit: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A cached step's attention: queries q [B, H, L, D] over every key of their row of the cache
    [B, Hkv, T, D], without a mask (what SDPA computes for an unpadded, bidirectional cached forward); with
    ``key_limit`` [B, L], query (b, i) over the first ``key_limit[b, i]`` keys only. An e4m3 cache (with
    its scales [B, Hkv, T]) is dequantized and attended to in fp32."""
    if k_scale is not None:
        k, v = dequantize_kv(k_cache, k_scale, torch.float32), dequantize_kv(v_cache, v_scale, torch.float32)
        return cached_attention(q.float(), k, v, key_limit).to(q.dtype)
    mask = None
    if key_limit is not None:
        mask = (torch.arange(k_cache.shape[2], device=q.device) < key_limit[..., None])[:, None]  # [B, 1, L, T]
    return torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                                            enable_gqa=k_cache.shape[1] != q.shape[1])


def moe_route(logits: torch.Tensor, top_k: int, score: str = "sigmoid", bias: torch.Tensor | None = None,
              n_group: int = 1, topk_group: int = 1, scale: float = 1.0,
              normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture-of-experts router: (expert ids int64 [N, top_k], weights fp32 [N, top_k]) from router logits
    [N, E] (read in fp32).

    ``score='sigmoid'`` (LLaDA 2.x): s = sigmoid(logits); the experts are chosen on s + ``bias`` within the
    ``topk_group`` of ``n_group`` groups whose two best biased scores sum highest; the weights are the chosen
    unbiased s, divided by their sum (+ 1e-20) when ``normalize`` and top_k > 1, times ``scale``.
    ``score='softmax'`` (LLaDA-MoE): s = softmax(logits); the top_k of s, renormalised only when ``normalize``.
    Ties go to the lower index (``torch.topk``'s order on equal values is not promised; routing on exact ties is
    measure-zero with real weights).
    """
    logits = logits.float()
    N, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} outside [1, {E}]")
    if score == "softmax":
        s = logits.softmax(-1)
        weights, ids = s.topk(top_k, -1)
        if normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights * scale
    if score != "sigmoid":
        raise ValueError(f"score={score!r}: expected 'sigmoid' or 'softmax'")
    if E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"{E} experts in {n_group} groups, keeping {topk_group}: not a valid grouping")
    s = torch.sigmoid(logits)
    biased = s if bias is None else s + bias.float()
    if n_group > 1:
        per = E // n_group
        group_score = biased.view(N, n_group, per).topk(min(2, per), -1).values.sum(-1)
        keep = group_score.topk(topk_group, -1).indices
        group_mask = torch.zeros(N, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        biased = biased.masked_fill(~group_mask[:, :, None].expand(N, n_group, per).reshape(N, E), float("-inf"))
    ids = biased.topk(top_k, -1).indices
    weights = s.gather(1, ids)
    if normalize and top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs of ``ids`` [N, k] sorted by expert, each expert's run padded to a multiple of
    ``block_m``: (pair index per slot [L], ``N * k`` for padding; expert per block of ``block_m`` slots [L /
    block_m], -1 past the last run). Pairs keep their order within an expert; experts without pairs get no
    block. ``L`` is the static bound ``ceil((N * k + min(E, N * k) * (block_m - 1)) / block_m) * block_m``."""
    flat = ids.reshape(-1).long()
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    expert = flat.index_select(0, order)
    first = counts.cumsum(0) - counts  # each expert's first index in ``order``
    dest = starts.index_select(0, expert) + torch.arange(pairs, device=flat.device) - first.index_select(0, expert)
    length = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    sorted_pairs = torch.full((length,), pairs, dtype=torch.int64, device=flat.device)
    sorted_pairs.scatter_(0, dest, order)
    block_start = torch.arange(0, length, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_start < ends[-1], block_expert, torch.full_like(block_expert, -1))
    return sorted_pairs, block_expert


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor, shared: torch.Tensor | None = None,
              shared_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None,
              shared_scales: tuple[torch.Tensor, torch.Tensor] | None = None, a8: bool = False,
              xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts of a mixture-of-experts MLP: for each token x [N, D] and each of its experts
    ``ids`` [N, k], down(silu(gate(x)) * up(x)) with expert e's ``w_gate_up[e]`` = cat(gate, up) [2I, D] and
    ``w_down[e]`` [D, I], each product rounded to x's dtype (as separate linear layers do); the k outputs
    weighted by ``weights`` [N, k] in fp32, summed in order (expert slot 0 first), rounded to x's dtype; plus
    ``shared`` [N, D] (the shared expert's output) added in x's dtype. ``shared_weights`` (gate|up [2I, D], down
    [D, I]) gives the shared expert instead of its output: the same gated MLP over every token. ``scales``
    (gate|up [E, 2I], down [E, D]): e4m3 weights with these channel scales, each product ``linear_fp8``'s
    (``shared_scales`` [2I], [D] for e4m3 shared weights); ``a8``: ``linear_w8a8``'s, each row of x (``xq``: as
    ``quantize_rows_fp8(x)`` gives them) and of the SiLU product quantized to e4m3."""
    def lin(h: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, hq: tuple | None = None) -> torch.Tensor:
        if s is None:
            return linear(h, w)
        return linear_w8a8(h, w, s, hq) if a8 else linear_fp8(h, w, s)

    if a8 and xq is None:
        xq = quantize_rows_fp8(x)
    if shared_weights is not None:
        ss = shared_scales or (None, None)
        gu = lin(x, shared_weights[0], ss[0], xq)
        shared = lin(silu_mul(*gu.chunk(2, -1)), shared_weights[1], ss[1])
    N, D = x.shape
    k = ids.shape[1]
    inter = w_down.shape[2]
    out = torch.zeros(N, k, D, dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        slot = (flat == e).nonzero().squeeze(1)
        h = x.index_select(0, slot // k)
        hq = None if xq is None else (xq[0].index_select(0, slot // k), xq[1].reshape(-1).index_select(0, slot // k))
        gate_up = lin(h, w_gate_up[e], None if scales is None else scales[0][e], hq)
        act = silu_mul(gate_up[:, :inter], gate_up[:, inter:])
        out.view(N * k, D)[slot] = lin(act, w_down[e], None if scales is None else scales[1][e]).float()
    out = out * weights.float()[..., None]
    acc = out[:, 0]
    for j in range(1, k):  # in order: the sum's rounding does not depend on a reduction's tree
        acc = acc + out[:, j]
    routed = acc.to(x.dtype)
    return routed if shared is None else routed + shared



def edit_tokens(canvas: torch.Tensor, token: torch.Tensor, prob: torch.Tensor, cols: torch.Tensor, threshold: float,
                mask_id: int, rows: torch.Tensor | None = None, width: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA 2.1's token editing over the block ``canvas[:, cols]`` (``cols`` [L], a device tensor, so a captured
    graph can serve every block): every decided (non-mask) position whose current guess ``token`` [B, L] differs
    from the canvas with probability ``prob`` > ``threshold`` takes the guess. Updates ``canvas``; returns the
    positions rewritten per row (int64 [B]). Plain tensor ops: the kernel path runs this too (graph-safe).
    Per row (the engine): ``rows`` [B] the canvas rows, ``cols`` [B, L] each row's block, ``width`` [B] how many
    of its L positions belong to the block (the rest are left alone)."""
    if rows is None:
        current = canvas.index_select(1, cols)
    else:
        current = canvas[rows[:, None], cols]
    change = (current != mask_id) & (token != current) & (prob > threshold)
    if width is not None:
        change &= torch.arange(token.shape[1], device=token.device)[None] < width[:, None]
    if rows is None:
        canvas.index_copy_(1, cols, torch.where(change, token, current))
    else:
        canvas[rows[:, None], cols] = torch.where(change, token, current)
    return change.sum(-1)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight [N, K], fp32 scale [N]): each output channel scaled so its largest magnitude is 448, then
    rounded to nearest; an all-zero channel gets scale 1."""
    wf = w.detach().float()
    amax = wf.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def linear_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (w * scale[:, None]).T + bias`` in fp32 (the e4m3 weight widened exactly, products accumulated in
    fp32, the channel scale applied to the sum, then the bias), rounded to x's dtype."""
    y = (x.float() @ w.float().T) * scale
    return (y if bias is None else y + bias.float()).to(x.dtype)


def linear_gate_up_silu_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, a8: bool = False,
                            xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``linear_gate_up_silu`` for a packed e4m3 ``w = cat([gate, up])`` with its scales: both halves from
    ``linear_fp8`` (``a8``: ``linear_w8a8``, with ``xq``), each rounded to x's dtype, then ``silu_mul``."""
    both = linear_w8a8(x, w, scale, xq) if a8 else linear_fp8(x, w, scale)
    gate, up = both.chunk(2, -1)
    return silu_mul(gate, up)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 x [M, K], fp32 scales [M]) for x [..., K] as rows: each row divided by its largest magnitude over
    448 (scale 1 for an all-zero row), rounded to nearest."""
    xf = x.reshape(-1, x.shape[-1]).float()
    amax = xf.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def linear_w8a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                xq: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_fp8`` with x first quantized per row (``quantize_rows_fp8``; ``xq``: that quantization, already
    made): the e4m3 products summed in fp32, then the row and channel scales and the bias, rounded to x's
    dtype."""
    q, qs = quantize_rows_fp8(x) if xq is None else xq
    y = (q.float() @ w.float().T) * qs[:, None] * scale
    y = y if bias is None else y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])

