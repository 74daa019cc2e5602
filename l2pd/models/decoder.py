"""The decoder every supported family shares: a pre-norm stack of RMSNorm, RoPE attention (grouped-query
allowed) and a SiLU-gated MLP, described by a ``Decoder`` (which modules play which part) and run by
``decoder_forward`` with or without a block KV cache. Options a family may use: a fused q/k/v projection,
per-head q/k RMSNorm, RoPE on part of each head, block-causal attention, and a mixture-of-experts MLP (routed
experts beside the gated MLP, which then plays the shared expert). Family files (``llada.py``, ``dream.py``,
``llada2.py``) only map their module trees onto it. Elementwise work goes through ``forward_ops``: the fused Triton
kernels on CUDA without autograd, ``l2pd_kernels.reference`` elsewhere.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from l2pd_kernels import reference, skinny
from l2pd_kernels.device import early_launch
from l2pd_kernels.moe import scans
from l2pd_kernels.reference import ExpertRows

# cached forwards of at most this many queries per row attend through ``l2pd_kernels.cached_attention`` where
# it pays (``split_pays``), and always for a block-causal model (keys up to each query's block end, where SDPA
# would need a mask); ``L2PD_SPLIT_ATTENTION=0``: always SDPA (benchmarks flip the flag to compare)
SPLIT_ATTENTION = os.environ.get("L2PD_SPLIT_ATTENTION", "1") != "0"
SPLIT_MAX_QUERIES = 64


def rms_norm(x: torch.Tensor, norm: nn.Module, eps: float) -> torch.Tensor:
    # Same order of operations as the official RMSLayerNorm: normalise in fp32, cast back, then scale.
    out, _ = reference.rms_norm(x, getattr(norm, "weight", None), eps)
    bias = getattr(norm, "bias", None)
    return out if bias is None else out + bias


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, head_dim / 2] in fp32 for integer positions [B, S] (rotate-half layout: both halves
    of a head use the same angles)."""
    key = (positions.device, head_dim, float(theta))
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
        inv_freq = 1.0 / (theta**exponent)
        _INV_FREQ[key] = inv_freq
    freqs = positions.float()[..., None] * inv_freq  # [B, S, D/2]
    return freqs.cos(), freqs.sin()


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: each row counts from 0 at its first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    if module.weight.dtype == torch.float8_e4m3fn:  # l2pd.quantize: e4m3 weight, per-channel scale
        return _fp8_mm(reference, module, x, module.weight, module.weight_scale, None, bias)
    return F.linear(x, module.weight, bias)


def _proj(ops: Any, x: torch.Tensor, module: nn.Module, xq: tuple | None = None) -> torch.Tensor:
    """An unpacked projection: FP8 weights through the forward's ops (their few-row kernel), others as before."""
    return _lin(ops, x, module, xq) if module.weight.dtype == torch.float8_e4m3fn else _linear(x, module)


def _lin(ops: Any, x: torch.Tensor, module: nn.Module, xq: tuple | None = None) -> torch.Tensor:
    """A linear layer through the forward's ops (the few-row kernel on CUDA), its bias (Dream's q/k/v) added
    to the sums before they round; ``xq``: x already quantized for e4m3 activations (``rms_norm_fp8``)."""
    bias = getattr(module, "bias", None)
    if module.weight.dtype == torch.float8_e4m3fn:
        return _fp8_mm(ops, module, x, module.weight, module.weight_scale, xq, bias)
    return ops.linear(x, module.weight, bias)


def _fp8_mm(ops: Any, module: nn.Module, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
            xq: tuple | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 product of a quantized module: e4m3 activations too (``xq`` if the norm already made them) after
    ``l2pd.quantize(model, 'w8a8')``."""
    if getattr(module, "l2pd_w8a8", False):
        return ops.linear_w8a8(x, w, scale, xq, bias)
    return ops.linear_fp8(x, w, scale, bias)


def _a8(module: nn.Module | None) -> bool:
    """Whether ``module`` multiplies e4m3 activations: its input norm then quantizes in the same kernel."""
    return module is not None and module.weight.dtype == torch.float8_e4m3fn and getattr(module, "l2pd_w8a8", False)


def forward_ops(device: torch.device, fused: bool | None = None) -> Any:
    """The forward's elementwise ops: the fused Triton kernels or ``l2pd_kernels.reference``.

    ``fused=None``: the kernels on CUDA without autograd (``L2PD_FUSED=0`` turns them off), the reference
    elsewhere (the interpreter would make a CPU forward slow; tests compare the two directly).
    """
    if fused is None:  # the kernels have no backward: training (grad enabled) runs the reference ops
        fused = device.type == "cuda" and os.environ.get("L2PD_FUSED", "1") != "0" and not torch.is_grad_enabled()
    if not fused:
        return reference
    import l2pd_kernels

    return l2pd_kernels


def _split_pays(batch: int, queries: int, heads: int, keys: int, device: torch.device) -> bool:
    from l2pd_kernels.attention import split_pays

    return split_pays(batch, queries, heads, keys, device)


def _norm(ops: Any, x: torch.Tensor, norm: nn.Module, eps: float, delta: torch.Tensor | ExpertRows | None,
          quant: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(norm(x + delta), x + delta, the normed rows as e4m3 and their scales with ``quant``, else None); the
    fused kernel where the norm has no bias and matches x's dtype. ``delta`` may be a mixture of experts' rows
    before their combine (``_moe``), which the fused kernel combines in its own pass."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if bias is not None or (weight is not None and weight.dtype != x.dtype):
        delta = _combined(ops, delta, x)
        x = x if delta is None else x + delta
        return rms_norm(x, norm, eps), x, None
    if quant:
        return ops.rms_norm_fp8(x, weight, eps, delta=delta)
    return (*ops.rms_norm(x, weight, eps, delta=delta), None)


def _combined(ops: Any, delta: torch.Tensor | ExpertRows | None, x: torch.Tensor) -> torch.Tensor | None:
    """``delta`` as a tensor shaped like x: a mixture of experts' rows combined (``moe_combine``)."""
    return ops.moe_combine(delta).view(x.shape) if isinstance(delta, ExpertRows) else delta


def _groups(layer: "Layer") -> tuple:
    groups = (("_l2pd_qkv", [layer.q, layer.k, layer.v]), ("_l2pd_gate_up", [layer.gate, layer.up]))
    return tuple(g for g in groups if all(m is not None for m in g[1]))  # a fused q/k/v, a MoE without shared expert


def pack_layers(layers: list["Layer"], cpu: bool = False) -> bool:
    """``pack_weights`` over any ``Decoder``'s layers; e4m3 weights (``l2pd.quantize``) pack with their scales,
    biases (Dream's q/k/v: all of a group's modules or none) with the weights.
    ``cpu``: pack CPU weights too (tests; safetensors refuses to save CPU tensors that share storage)."""
    done = True
    for layer in layers:
        for attr, mods in _groups(layer):
            if _packed(layer.owner, attr, mods) is not None:
                continue
            ws = [m.weight for m in mods]
            fp8 = ws[0].dtype == torch.float8_e4m3fn
            biases = [getattr(m, "bias", None) for m in mods]
            biased = biases[0] is not None
            if (ws[0].device.type != "cuda" and not cpu) or any((b is not None) != biased for b in biases) \
                    or any(w.dtype != ws[0].dtype for w in ws) \
                    or (biased and any(b.dtype != biases[0].dtype for b in biases)) \
                    or (fp8 and any(getattr(m, "weight_scale", None) is None for m in mods)):
                done = False
                continue
            object.__setattr__(layer.owner, attr, _share(mods, "weight"))  # plain attributes: not in the state dict
            if fp8:  # one fp32 scale per output channel, packed the same way
                object.__setattr__(layer.owner, attr + "_scale", _share(mods, "weight_scale"))
            if biased:
                object.__setattr__(layer.owner, attr + "_bias", _share(mods, "bias"))
    return done


def _share(mods: list[nn.Module], name: str) -> torch.Tensor:
    """One buffer of the modules' tensors ``name`` stacked by rows, each module's tensor becoming its view."""
    buf = torch.cat([getattr(m, name).detach() for m in mods])
    row = 0
    for m in mods:
        t = getattr(m, name)
        t.data = buf[row : row + t.shape[0]]
        row += t.shape[0]
    return buf


def unpack_layers(layers: list["Layer"]) -> None:
    for layer in layers:
        for attr, mods in _groups(layer):
            if vars(layer.owner).pop(attr, None) is not None:
                for m in mods:
                    m.weight.data = m.weight.detach().clone()
            if vars(layer.owner).pop(attr + "_scale", None) is not None:
                for m in mods:
                    m.weight_scale.data = m.weight_scale.detach().clone()
            if vars(layer.owner).pop(attr + "_bias", None) is not None:
                for m in mods:
                    m.bias.data = m.bias.detach().clone()


def _packed(block: nn.Module, attr: str, mods: list[nn.Module]) -> torch.Tensor | None:
    """The packed buffer if every weight (and, for e4m3 weights, every scale; where the modules have biases,
    every bias) is still its view (a ``.to()``, a reassignment or ``l2pd.quantize`` breaks the link)."""
    buf = vars(block).get(attr)
    if buf is None or (buf.dtype == torch.float8_e4m3fn and _packed_scale(block, attr, mods) is None):
        return None
    if getattr(mods[0], "bias", None) is not None and (not PACKED_BIASES or _packed_bias(block, attr, mods) is None):
        return None
    return buf if _views(buf, [m.weight for m in mods]) else None


# a group of biased modules (Dream's q/k/v) multiplies packed, its packed biases added in the product's epilogue
# (L2PD_PACKED_BIASES=0: each module apart with its own bias, as before 2026-12-03)
PACKED_BIASES = os.environ.get("L2PD_PACKED_BIASES", "1") != "0"


def _packed_bias(block: nn.Module, attr: str, mods: list[nn.Module]) -> torch.Tensor | None:
    """The packed biases of packed weights, if every module has one and it is still their view."""
    buf = vars(block).get(attr + "_bias")
    if buf is None or any(getattr(m, "bias", None) is None for m in mods):
        return None
    return buf if _views(buf, [m.bias for m in mods]) else None


def _packed_scale(block: nn.Module, attr: str, mods: list[nn.Module]) -> torch.Tensor | None:
    """The packed per-channel scales of packed e4m3 weights, if every module's scale is still their view."""
    buf = vars(block).get(attr + "_scale")
    if buf is None or any(getattr(m, "weight_scale", None) is None for m in mods):
        return None
    return buf if _views(buf, [m.weight_scale for m in mods]) else None


def _views(buf: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    row = 0
    for t in parts:
        if row >= buf.shape[0] or t.data_ptr() != buf[row].data_ptr() or t.dtype != buf.dtype:
            return False
        row += t.shape[0]
    return row == buf.shape[0]


@dataclass
class Pack:
    """The fed tokens of many requests as one sequence [1, N] (the engine's forward): token t is position
    ``slots[t]`` of cache row ``rows[t]``; ``seg`` [G, 4] holds each request's (q_start, q_len, row, k_len), its
    queries and the keys they attend to (``l2pd_kernels.reference.pool_attention``); ``tiles`` the attention
    kernel's programs (``l2pd_kernels.attention.pool_tiles``) of ``tile_m`` queries each; ``plan_tiles`` the
    query tiles its key split is planned for (0: ``tiles``' count), which the engine keeps the same for an
    iteration graphed or not."""

    rows: torch.Tensor
    slots: torch.Tensor
    seg: torch.Tensor
    tiles: torch.Tensor | None = None
    plan_tiles: int = 0
    tile_m: int = 64  # l2pd_kernels.attention.POOL_TILE_M (pool_tile_m: the engine's)


@dataclass
class MoE:
    """A mixture-of-experts MLP: ``router.weight`` [E, D] gives the logits (fp32) that
    ``l2pd_kernels.reference.moe_route`` turns into experts and weights; each expert has ``gate_proj``,
    ``up_proj`` and ``down_proj``; ``owner`` holds their stacked weights."""

    owner: nn.Module
    router: nn.Module
    bias: torch.Tensor | None
    experts: Any
    top_k: int
    score: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    normalize: bool = True


@dataclass
class Layer:
    """One pre-norm block's modules; ``owner`` holds the packed q/k/v and gate/up buffers. ``qkv`` (rows
    q | k | v) replaces q, k and v; ``q_norm``/``k_norm`` normalise each head; with ``moe`` the gate/up/down
    MLP is the shared expert (None: no shared expert)."""

    owner: nn.Module
    attn_norm: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    ff_norm: nn.Module
    gate: nn.Module | None
    up: nn.Module | None
    down: nn.Module | None
    qkv: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    moe: MoE | None = None


@dataclass
class Decoder:
    """A bidirectional pre-norm RMSNorm / RoPE / SiLU-gated decoder, whatever its module names (LLaDA,
    Dream): what ``decoder_forward`` runs."""

    embed: nn.Module
    layers: list[Layer]
    final_norm: nn.Module
    head: nn.Module
    n_heads: int
    n_kv: int
    head_dim: int
    d_model: int
    eps: float
    rope: bool
    rope_theta: float
    scale_logits: bool = False
    rotary_dim: int | None = None  # RoPE on the first rotary_dim of each head (None: all of it)
    block_causal: int = 0  # > 0: a query at position i sees keys at positions j with j // L <= i // L


def decoder_forward(dec: Decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **kw: Any) -> torch.Tensor:
    """``llada_forward`` over any ``Decoder`` (``_decoder_forward`` has the arguments), its kernels letting the
    next launch early where ``_early_launch`` says."""
    with early_launch(_early_launch(dec)):
        return _decoder_forward(dec, input_ids, attention_mask, **kw)


def _early_launch(dec: Decoder) -> bool:
    """Whether the forward's kernels let the next kernel launch as soon as their own programs have all started
    (``l2pd_kernels.device.early_launch``; H200, ``benchmarks/studies/step_rules.py``; ``benchmarks/RESULTS.md``,
    "Early launches on the TMA tiles"): yes, but where the few-row products' TMA tiles are off
    (``L2PD_SKINNY_TMA=0``) in a dense model. A mixture-of-experts model's many small kernels gain (LLaDA2.0-mini's
    step 4.1% faster); since the bf16 products take TMA tiles that fill an SM's shared memory (so that programs
    launched early cannot crowd two to an SM), so do dense models: LLaDA-8B's `generate` 1.2% to 1.4% faster,
    Dream-7B's 0.7%, LLaDA-8B's with e4m3 weights and activations 1.8%. With the pointer path's tiles of then,
    LLaDA-8B's step was 8.6% slower launched early."""
    return skinny.TMA != "0" or any(blk.moe is not None for blk in dec.layers)


def _decoder_forward(
    dec: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cache: Any = None,
    start: int = 0,
    position_ids: torch.Tensor | None = None,
    logits_slice: tuple[int, int] | None = None,
    slots: torch.Tensor | None = None,
    logits_index: torch.Tensor | None = None,
    fused: bool | None = None,
    pack: Pack | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``llada_forward``'s arguments and result, over any ``Decoder``. With ``pack`` (and ``cache``
    the engine's slot pool, ``position_ids`` given) ``input_ids`` [1, N] are many requests' fed tokens.
    ``attn_mask`` (bool [B, 1, S, S], True = may attend; no cache) replaces the mask the decoder would build:
    block-diffusion training (``l2pd.demo.train_model``) attends across a clean and a noised copy."""
    bsz, seq = input_ids.shape
    if pack is not None:
        if cache is None or attention_mask is not None or position_ids is None or bsz != 1:
            raise ValueError("a packed forward takes [1, N] ids with position_ids and a cache, and no mask")
        slots = pack.slots
    device = input_ids.device
    total = cache.length if cache is not None else seq
    if attention_mask is not None and attention_mask.shape != (bsz, total):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(bsz, total)}")
    if position_ids is None:
        if attention_mask is None:
            position_ids = torch.arange(start, start + seq, device=device).expand(bsz, seq)
        else:
            position_ids = positions_from_mask(attention_mask)[:, start : start + seq]
    if cache is not None and slots is None:
        if start + seq > cache.length:
            raise ValueError(f"positions {start}..{start + seq} exceed the cache length {cache.length}")
        slots = torch.arange(start, start + seq, device=device)
    ops = forward_ops(device, fused)
    split, key_limit, sdpa_mask = _attention_path(dec, ops, attention_mask, attn_mask, position_ids, total, cache,
                                                  pack, bsz, seq)
    n_heads, n_kv, head_dim, eps = dec.n_heads, dec.n_kv, dec.head_dim, dec.eps
    if dec.rope:  # partial RoPE (rotary_dim < head_dim): angles for the rotated dims only
        cos, sin = rope_cos_sin(position_ids, dec.rotary_dim or head_dim, dec.rope_theta)
    else:  # the identity rotation
        cos = torch.ones(bsz, seq, head_dim // 2, device=device)
        sin = torch.zeros_like(cos)
    fresh_slots = torch.arange(seq, device=device) if cache is None else None
    pool_split = {}
    if pack is not None:
        pool_split = _pool_split(ops, pack, n_heads, n_kv, cache.k[0].shape[2], device,
                                 getattr(cache, "k_scale", None) is not None)

    x = F.embedding(input_ids, dec.embed.weight)
    delta = None  # the last residual branch, added inside the next norm
    for layer, blk in enumerate(dec.layers):
        h, x, hq = _norm(ops, x, blk.attn_norm, eps, delta, _a8(blk.q if blk.qkv is None else blk.qkv))
        scales = {}  # an e4m3 cache's per-head scales (``BlockKVCache``)
        if cache is not None:  # keys are cached after RoPE, so cached positions are never rotated again
            k_all, v_all = cache.k[layer], cache.v[layer]
            if getattr(cache, "k_scale", None) is not None:
                scales = {"k_scale": cache.k_scale[layer], "v_scale": cache.v_scale[layer]}
        else:
            k_all = torch.empty(bsz, n_kv, seq, head_dim, dtype=h.dtype, device=device)
            v_all = torch.empty_like(k_all)
        rows = pack.rows if pack is not None else None
        rope = (cos, sin, k_all, v_all, fresh_slots if cache is None else slots, rows, scales)
        q = _qkv_rope(ops, h, hq, blk, n_heads, n_kv, eps, rope)
        if pack is not None:  # each request attends to its own pool row
            att = ops.pool_attention(q, k_all, v_all, pack.seg, pack.tiles, **pool_split, **scales)
        elif split:
            att = ops.cached_attention(q, k_all, v_all, key_limit=key_limit, **scales)
        else:  # (an e4m3 cache widened for SDPA: this path's forwards are not the decode's)
            k_att, v_att = k_all, v_all
            if scales:
                k_att = reference.dequantize_kv(k_all, scales["k_scale"], h.dtype)
                v_att = reference.dequantize_kv(v_all, scales["v_scale"], h.dtype)
            att = F.scaled_dot_product_attention(q, k_att, v_att, attn_mask=sdpa_mask, enable_gqa=n_kv != n_heads)
        a = _lin(ops, att.transpose(1, 2).reshape(bsz, seq, n_heads * head_dim), blk.o)
        h, x, hq = _norm(ops, x, blk.ff_norm, eps, a, _a8(blk.gate) or _moe_a8(blk.moe))
        inside = _shared_in_moe(ops, blk, h)  # the shared expert run by the MoE kernels, beside the routed ones
        delta = None if blk.gate is None or inside is not None else _mlp(ops, h, blk, hq)
        if blk.moe is not None:  # the routed experts, plus the shared expert's output (delta) in the same kernel
            delta = _moe(ops, h, blk.moe, delta, inside, hq)

    if delta is None:  # no blocks
        delta = torch.zeros_like(x)
    if logits_index is not None or logits_slice is not None:
        delta = _combined(ops, delta, x)
    if logits_index is not None:
        x, delta = x.index_select(1, logits_index), delta.index_select(1, logits_index)
    elif logits_slice is not None:
        x, delta = x[:, logits_slice[0] : logits_slice[1]], delta[:, logits_slice[0] : logits_slice[1]]
    x, _, xq = _norm(ops, x, dec.final_norm, eps, delta, _a8(dec.head))
    logits = _lin(ops, x, dec.head, xq)
    if dec.scale_logits:
        logits = logits * (1.0 / math.sqrt(dec.d_model))
    return logits


# L2PD_FUSED_ROPE: a few-row q/k/v product does rope_qkv's work in the same launch (linear_rope_qkv), one kernel
# less per layer. "1" wherever it applies, "0" never; unset: where it paid on an H200 (``_rope_fuses``)
FUSED_ROPE = {"1": True, "0": False}.get(os.environ.get("L2PD_FUSED_ROPE", ""))


def _qkv_rope(ops: Any, h: torch.Tensor, hq: tuple | None, blk: Layer, n_heads: int, n_kv: int, eps: float,
              rope: tuple) -> torch.Tensor:
    """The layer's rotated q [B, H, S, D], with its k and v written into the cache (``rope``: cos, sin, the
    K/V buffers, the slots, the pool rows or None, and an e4m3 cache's scales as keyword arguments or {}): the
    q/k/v product, then ``rope_qkv``; or both in one launch (``FUSED_ROPE``)."""
    cos, sin, k_all, v_all, slots, rows, scales = rope
    bsz, seq = h.shape[:2]
    head_dim = k_all.shape[3]
    qk_norm = _qk_norm(blk, h.dtype, eps)  # per head, before RoPE: inside rope_qkv where it can be
    if FUSED_ROPE is not False and ops is not reference:
        q = _fused_qkv_rope(ops, h, hq, blk, n_heads, n_kv, qk_norm, rope)
        if q is not None:
            return q
    widths = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
    if blk.qkv is not None:  # a fused projection (LLaDA 2.x); q, k, v are column slices
        q, k, v = _lin(ops, h, blk.qkv, hq).split(widths, -1)
    elif (qkv := _packed(blk.owner, "_l2pd_qkv", [blk.q, blk.k, blk.v])) is not None:  # one matmul
        q, k, v = _packed_linear(ops, h, qkv, blk, "_l2pd_qkv", [blk.q, blk.k, blk.v], hq).split(widths, -1)
    else:
        q, k, v = _proj(ops, h, blk.q, hq), _proj(ops, h, blk.k, hq), _proj(ops, h, blk.v, hq)
    q = q.view(bsz, seq, n_heads, head_dim)
    k = k.view(bsz, seq, n_kv, head_dim)
    v = v.view(bsz, seq, n_kv, head_dim)
    if blk.q_norm is not None and qk_norm is None:
        q, k = _norm(ops, q, blk.q_norm, eps, None)[0], _norm(ops, k, blk.k_norm, eps, None)[0]
    return ops.rope_qkv(q, k, v, cos, sin, k_all, v_all, slots, rows=rows, **qk_norm or {}, **scales)


def _fused_qkv_rope(ops: Any, h: torch.Tensor, hq: tuple | None, blk: Layer, n_heads: int, n_kv: int,
                    qk_norm: dict | None, rope: tuple) -> torch.Tensor | None:
    """``linear_rope_qkv`` where it applies: a few rows on CUDA (or the interpreter), one bias-free q/k/v
    weight (LLaDA 2.x's fused one, or the packed buffer) in the activations' dtype or e4m3, per-head norms
    (if any) inside, contiguous cos/sin and caches; None elsewhere."""
    from l2pd_kernels.qkv_rope import MAX_HEAD_DIM
    from l2pd_kernels.skinny import _INTERPRET, MAX_ROWS

    cos, sin, k_all, v_all, slots, rows, scales = rope
    head_dim = k_all.shape[3]
    if (not (h.is_cuda or _INTERPRET) or not 0 < h.shape[0] * h.shape[1] <= MAX_ROWS
            or (blk.q_norm is not None and qk_norm is None)
            or head_dim & (head_dim - 1) or not 16 <= head_dim <= MAX_HEAD_DIM
            or not all(t.is_contiguous() for t in (cos, sin, k_all, v_all, *scales.values()))):
        return None
    if blk.qkv is not None:
        if getattr(blk.qkv, "bias", None) is not None:
            return None
        w, mod = blk.qkv.weight, blk.qkv
        scale = getattr(mod, "weight_scale", None)
    else:
        mods = [blk.q, blk.k, blk.v]
        w, mod = _packed(blk.owner, "_l2pd_qkv", mods), mods[0]
        if w is None or getattr(mod, "bias", None) is not None:  # (the kernel adds no bias)
            return None
        scale = _packed_scale(blk.owner, "_l2pd_qkv", mods) if w.dtype == torch.float8_e4m3fn else None
    fp8 = w.dtype == torch.float8_e4m3fn
    a8 = fp8 and getattr(mod, "l2pd_w8a8", False)
    if (fp8 and scale is None) or (not fp8 and w.dtype != h.dtype):
        return None
    if not _rope_fuses(w, h, n_heads + 2 * n_kv, a8):
        return None
    return ops.linear_rope_qkv(h, w, n_heads, n_kv, cos, sin, k_all, v_all, slots, rows=rows, **qk_norm or {},
                               scale=scale, a8=a8, xq=hq if a8 else None, **scales)


def _rope_fuses(w: torch.Tensor, h: torch.Tensor, heads: int, a8: bool = False) -> bool:
    """``FUSED_ROPE``, or unset: weights in the activations' dtype, or e4m3 weights against e4m3 activations
    (``a8``), and heads for half the SMs or more (one program per head). On an H200
    (``benchmarks/studies/step_rules.py``) LLaDA-8B's bf16 step was 1.6% to 2.0% faster fused (96 heads); its
    w8a8 ``generate`` 0.9% faster with the head's tile in 256-byte K steps (2.4% slower in 128-byte ones);
    widened e4m3 weights not measured; LLaDA2.0-mini's 24 heads, K split among 4 programs each, tied in
    ``generate`` and lost 9% in the engine's replays."""
    if FUSED_ROPE is not None:
        return FUSED_ROPE
    from l2pd_kernels.device import sm_count

    return (w.dtype == h.dtype or a8) and 2 * heads >= sm_count(h.device)


def _pool_split(ops: Any, pack: Pack, heads: int, kv_heads: int, keys: int, device: torch.device,
                kv8: bool = False) -> dict:
    """The pool attention's key split (``l2pd_kernels.attention.pool_split_plan``) and grouped-query heads per
    program for the fused kernels, the same for every layer: a batch-1 step's few programs over the canvas
    take every SM. Fixed by shapes, so a captured graph keeps it. Over an e4m3 cache (``kv8``) split keys go
    in loops of ``KV8_BLOCK_N``."""
    if ops is reference:
        return {}
    from l2pd_kernels import attention

    block_n = attention.KV8_BLOCK_N if kv8 else 64
    splits, chunk = attention.pool_split_plan(pack.plan_tiles or pack.tiles.shape[0], heads, keys, device, block_n,
                                              kv_heads=kv_heads, block_m=pack.tile_m)
    kw = {"block_m": pack.tile_m,
          "heads_per_program": attention.pool_heads_per_program(heads, kv_heads, pack.tile_m, split=splits > 1)}
    if kv8 and splits > 1:
        kw["block_n"] = block_n
    return kw | ({"splits": splits, "key_chunk": chunk, "merge_rows": attention.POOL_MERGE_ROWS} if splits > 1 else {})


def _qk_norm(blk: Layer, dtype: torch.dtype, eps: float) -> dict | None:
    """``rope_qkv``'s arguments for the layer's per-head q/k norms (weights in the activations' dtype, no
    bias), or None where there are none or they run apart."""
    norms = (blk.q_norm, blk.k_norm)
    ws = [getattr(n, "weight", None) for n in norms]
    if any(n is None or getattr(n, "bias", None) is not None for n in norms) or any(
            w is None or w.dtype != dtype for w in ws):
        return None
    return {"q_norm": ws[0], "k_norm": ws[1], "eps": eps}


def _packed_linear(ops: Any, h: torch.Tensor, buf: torch.Tensor, blk: Layer, attr: str,
                   mods: list[nn.Module], hq: tuple | None = None) -> torch.Tensor:
    """The product with a packed weight: e4m3 ones with their packed scales, as their modules multiply; the
    packed biases, where the modules have them, added to the sums before they round (as ``F.linear`` adds)."""
    # (``_packed`` gave buf only with the modules' biases still views of this buffer)
    bias = vars(blk.owner).get(attr + "_bias") if getattr(mods[0], "bias", None) is not None else None
    if buf.dtype == torch.float8_e4m3fn:
        return _fp8_mm(ops, mods[0], h, buf, _packed_scale(blk.owner, attr, mods), hq, bias)
    return ops.linear(h, buf, bias)


def _mlp(ops: Any, h: torch.Tensor, blk: Layer, hq: tuple | None = None) -> torch.Tensor:
    """The gated MLP (a dense layer's, or a MoE's shared expert); ``hq``: h as e4m3 rows for w8a8 weights."""
    mods = [blk.gate, blk.up]
    gate_up = _packed(blk.owner, "_l2pd_gate_up", mods)
    if gate_up is not None and gate_up.dtype == torch.float8_e4m3fn:
        act = ops.linear_gate_up_silu_fp8(h, gate_up, _packed_scale(blk.owner, "_l2pd_gate_up", mods),
                                          a8=getattr(blk.gate, "l2pd_w8a8", False), xq=hq)
    elif gate_up is not None:  # silu(gate) * up straight from the packed matmul
        act = ops.linear_gate_up_silu(h, gate_up)
    else:
        act = ops.silu_mul(_proj(ops, h, blk.gate, hq), _proj(ops, h, blk.up, hq))
    return _lin(ops, act, blk.down)


def _moe_a8(moe: MoE | None) -> bool:
    """Whether a mixture of experts' routed experts multiply e4m3 activations (``l2pd.quantize(..., "w8a8")``)."""
    return moe is not None and _a8(moe.experts[0].gate_proj)


def _moe(ops: Any, h: torch.Tensor, moe: MoE, shared: torch.Tensor | None = None,
         shared_weights: tuple | None = None, hq: tuple | None = None) -> torch.Tensor | ExpertRows:
    """The routed experts' output for h [B, S, D] (plus ``shared``, the shared expert's, added in the experts'
    combine; or the shared expert itself, ``shared_weights`` = ``_shared_in_moe``'s (gate|up, down, scales),
    run by the same kernels): router logits in fp32, then ``ops.fused_moe`` (e4m3 experts with their scales;
    against e4m3 rows, ``hq`` the norm's, for w8a8 experts); with ``MOE_NORM`` the rows before their combine,
    for the next norm."""
    flat = h.reshape(-1, h.shape[-1])
    logits = _router_logits(ops, flat, moe)
    ids, weights = ops.moe_route(logits, moe.top_k, moe.score, moe.bias, moe.n_group, moe.topk_group, moe.scale,
                                 moe.normalize)
    w13, w2 = expert_weights(moe)
    scales = expert_scales(moe) if w13.dtype == torch.float8_e4m3fn else None  # e4m3 experts' channel scales
    shared = None if shared is None else shared.reshape(flat.shape)
    kw = dict(shared=shared, shared_weights=None if shared_weights is None else shared_weights[:2],
              scales=scales, shared_scales=None if shared_weights is None else shared_weights[2])
    if scales is not None and _moe_a8(moe):
        kw.update(a8=True, xq=None if hq is None else (hq[0].reshape(flat.shape), hq[1].reshape(-1)))
    if MOE_NORM and ops is not reference:  # the next norm combines the experts' rows in its own pass
        return ops.fused_moe(flat, w13, w2, ids, weights, combine=False, **kw)
    return ops.fused_moe(flat, w13, w2, ids, weights, **kw).view(h.shape)


# a mixture of experts' output is combined inside the next RMSNorm's kernel (one launch fewer per layer;
# l2pd_kernels.rms_norm) instead of by its own kernel: LLaDA2.0-mini shapes on an H200, `generate` 0.4% faster
# at batch 1, 0.5% to 1.9% at batch 64 (benchmarks/RESULTS.md); L2PD_MOE_NORM=0 combines apart
MOE_NORM = os.environ.get("L2PD_MOE_NORM", "1") == "1"


def _shared_in_moe(ops: Any, blk: Layer, h: torch.Tensor) -> tuple | None:
    """The shared expert's (gate|up, down, their scales or None) where the MoE kernels run it beside the routed
    experts (two launches fewer per layer): the kernels, few (token, expert) pairs (the scan path: where it was
    faster, at 32 and 128 tokens; at 2,048 it tied), a bias-free expert of the routed experts' width and weight
    dtype (the activations', or e4m3 with channel scales when the routed experts are e4m3 too: the kernels run
    both alike), its gate|up packed on CUDA. None elsewhere, or with ``L2PD_SHARED_IN_MOE=0``."""
    if blk.moe is None or ops is reference or blk.gate is None or blk.up is None or blk.down is None \
            or os.environ.get("L2PD_SHARED_IN_MOE", "1") == "0":
        return None
    if not scans(h.numel() // h.shape[-1] * blk.moe.top_k):
        return None
    mods = [blk.gate, blk.up, blk.down]
    routed = blk.moe.experts[0].down_proj.weight  # [D, I]: the shared expert must have the same width and dtype
    wdt = routed.dtype if routed.dtype == torch.float8_e4m3fn else h.dtype
    if any(getattr(m, "bias", None) is not None or m.weight.dtype != wdt for m in mods):
        return None
    fp8 = wdt == torch.float8_e4m3fn
    if fp8 and (expert_scales(blk.moe) is None or any(getattr(m, "weight_scale", None) is None for m in mods)):
        return None
    gate_up = _packed(blk.owner, "_l2pd_gate_up", mods[:2])
    scale = _packed_scale(blk.owner, "_l2pd_gate_up", mods[:2]) if fp8 else None
    if gate_up is None:  # on CUDA the weights are packed (a copy per forward would cost what this saves)
        if h.is_cuda:
            return None
        gate_up = torch.cat([blk.gate.weight, blk.up.weight])
        scale = torch.cat([blk.gate.weight_scale, blk.up.weight_scale]) if fp8 else None
    if blk.down.weight.shape != routed.shape or gate_up.shape[0] != 2 * routed.shape[1]:
        return None
    return gate_up, blk.down.weight, (scale, blk.down.weight_scale) if fp8 else None


# the fused forward's router product in the few-row kernel with fp32 output (``l2pd_kernels.linear_f32``); False:
# torch's matmul with fp32 output, as before (a cuBLAS launch breaks the chain of early launches)
_ROUTER_KERNEL = True


def _router_logits(ops: Any, flat: torch.Tensor, moe: MoE) -> torch.Tensor:
    """The router's logits in fp32. Half-precision rows and weight on CUDA: products of two half-precision
    values are exact in fp32, so a tensor-core product with fp32 output (``ops.linear_f32``: the few-row kernel
    for a decode step's rows, else torch's matmul) differs from the fp32 matmul only in the order of the fp32
    sum (an fp32 matmul runs on the CUDA cores, 5 to 10 times slower). ``L2PD_ROUTER_FP32=1`` keeps the fp32
    matmul: the official code's sums, so routing near-ties as it does."""
    w = moe.router.weight
    if (flat.is_cuda and flat.dtype in (torch.bfloat16, torch.float16) and w.dtype == flat.dtype
            and os.environ.get("L2PD_ROUTER_FP32", "0") != "1"):
        if ops is not reference and _ROUTER_KERNEL:
            return ops.linear_f32(flat, w)
        if skinny.MM_OUT_DTYPE:
            return torch.mm(flat, w.t(), out_dtype=torch.float32)
    return F.linear(flat.float(), _router_weight(moe))


def _router_weight(moe: MoE) -> torch.Tensor:
    """The router's weight in fp32 (the router runs in fp32); a half-precision weight's copy is kept on
    ``moe.owner`` while the weight's storage stays the same."""
    w = moe.router.weight
    if w.dtype == torch.float32:
        return w
    kept = vars(moe.owner).get("_l2pd_router32")
    if kept is None or kept[0] != w.data_ptr() or kept[1]._version != kept[2]:
        kept = (w.data_ptr(), w, w._version, w.detach().float())
        object.__setattr__(moe.owner, "_l2pd_router32", kept)
    return kept[3]


# The experts' linear modules whose weights are views of their owner's kept buffers (``expert_weights``) ->
# that owner. A new Parameter assigned to any of them drops the buffers: checking every expert's pointers at
# each forward would cost an eager step milliseconds of host time (256 experts x 3 weights per layer).
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_KEPT_HOOK: list = []


def _expert_param_assigned(module: nn.Module, name: str, param: Any) -> None:
    owner = _KEPT.get(module)
    if owner is not None:
        vars(owner).pop("_l2pd_experts", None)


def _keeps_views(device: torch.device) -> bool:
    """Whether the experts become views of their stacked buffers (on CUDA; safetensors cannot save CPU tensors
    that share storage)."""
    return device.type == "cuda"


def expert_weights(moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate|up [E, 2I, D], down [E, D, I]) of the experts. On CUDA the experts' parameters become views of
    these two buffers (kept on ``moe.owner``, no extra memory, state dict unchanged), as ``pack_layers`` does;
    elsewhere they are stacked anew at each call (safetensors cannot save CPU tensors that share storage).
    With autograd on and trainable experts, a fresh differentiable stack (training). The kept buffers are
    dropped when a new parameter is assigned to any expert, or the first or last expert's weights move (a
    ``.to()``); writing into the weights (``load_state_dict``, ``copy_``) keeps them, as it should. Replacing
    one middle expert's ``.data`` is not seen: assign a parameter instead."""
    mods = list(moe.experts)
    if torch.is_grad_enabled() and mods[0].gate_proj.weight.requires_grad:
        return (torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in mods]),
                torch.stack([m.down_proj.weight for m in mods]))
    w13, w2, made = _stacked(moe, "weight", "_l2pd_experts")
    if made:
        if not _KEPT_HOOK:
            _KEPT_HOOK.append(torch.nn.modules.module.register_module_parameter_registration_hook(
                _expert_param_assigned))
        for m in mods:
            for lin in (m.gate_proj, m.up_proj, m.down_proj):
                _KEPT[lin] = moe.owner
    return w13, w2


def expert_scales(moe: MoE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gate|up [E, 2I], down [E, D]) fp32 channel scales of e4m3 experts (``l2pd.quantize``), else None. Kept
    on ``moe.owner`` as ``expert_weights`` keeps the weights (on CUDA the experts' scales become their views);
    rebuilt when the first expert's scale is no longer the kept one's view."""
    if getattr(moe.experts[0].gate_proj, "weight_scale", None) is None:
        return None
    return _stacked(moe, "weight_scale", "_l2pd_expert_scales")[:2]


def _stacked(moe: MoE, attr: str, key: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The experts' ``attr`` tensors stacked as (gate|up [E, 2I, ...], down [E, D, ...]): the pair kept on
    ``moe.owner`` as ``key`` while the first and last experts' tensors are still its views (and of its dtype),
    else stacked anew, and on CUDA kept, each expert's tensors becoming views of the stacks (third: True then)."""
    mods = list(moe.experts)
    first, last = getattr(mods[0].gate_proj, attr), getattr(mods[-1].down_proj, attr)
    kept = vars(moe.owner).get(key)
    if kept is not None and (first.data_ptr() == kept[0].data_ptr() and last.data_ptr() == kept[1][-1].data_ptr()
                             and first.dtype == kept[0].dtype):
        return *kept, False
    gate_up = torch.stack([torch.cat([getattr(m.gate_proj, attr).detach(), getattr(m.up_proj, attr).detach()])
                           for m in mods])
    down = torch.stack([getattr(m.down_proj, attr).detach() for m in mods])
    if not _keeps_views(gate_up.device):
        return gate_up, down, False
    inter = first.shape[0]
    for i, m in enumerate(mods):
        getattr(m.gate_proj, attr).data, getattr(m.up_proj, attr).data = gate_up[i, :inter], gate_up[i, inter:]
        getattr(m.down_proj, attr).data = down[i]
    object.__setattr__(moe.owner, key, (gate_up, down))
    return gate_up, down, True


def _attention_path(dec: Decoder, ops: Any, attention_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                    position_ids: torch.Tensor, total: int, cache: Any, pack: Any, bsz: int, seq: int):
    """(whether a cached forward attends through ``cached_attention``, its per-query key limits or None, SDPA's
    mask or None). A block-causal cached step (unpadded, at most ``SPLIT_MAX_QUERIES`` queries per row) reads
    the keys up to each query's block end through the kernel, with no mask; a cached step's few queries over a
    long unmasked canvas take the split-key kernel where it pays (SDPA leaves SMs idle there)."""
    kernel = (cache is not None and pack is None and seq <= SPLIT_MAX_QUERIES and ops is not reference
              and SPLIT_ATTENTION)
    if kernel and dec.block_causal and attention_mask is None and attn_mask is None:
        L = dec.block_causal
        return True, ((position_ids // L + 1) * L).clamp(max=total).expand(bsz, seq).contiguous(), None
    sdpa_mask = _sdpa_mask(dec, attention_mask, attn_mask, position_ids, total, cache, pack, bsz, seq)
    split = kernel and sdpa_mask is None and _split_pays(bsz, seq, dec.n_heads, total, position_ids.device)
    return split, None, sdpa_mask


def _sdpa_mask(dec: Decoder, attention_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
               position_ids: torch.Tensor, total: int, cache: Any, pack: Any, bsz: int, seq: int):
    """SDPA's mask (True = may attend): ``attn_mask`` as given, the block-causal one, the padding one, or None.
    None when nothing is padded keeps the fused flash kernels and avoids checking the mask on the host."""
    if attn_mask is not None:
        if cache is not None or attn_mask.shape != (bsz, 1, seq, seq) or attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be bool [{bsz}, 1, {seq}, {seq}] without a cache, got "
                             f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        return attn_mask
    if pack is not None:  # the pack's segments say which keys each query sees (block-causal ones included)
        return None
    if dec.block_causal:
        return _block_causal_mask(dec.block_causal, position_ids, attention_mask, total)
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def _block_causal_mask(block: int, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       total: int) -> torch.Tensor:
    """SDPA's boolean mask [B, 1, S, total]: query i sees key j when j's block (position // block) is not after
    i's and j is not padding; key positions skip the left padding as query positions do."""
    if attention_mask is not None:
        key_pos = positions_from_mask(attention_mask)
    else:
        key_pos = torch.arange(total, device=position_ids.device)[None]
    allowed = (key_pos[:, None, :] // block) <= (position_ids[:, :, None] // block)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self, self.eps)
