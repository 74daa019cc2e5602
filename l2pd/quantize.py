"""FP8 weights: ``l2pd.quantize(model, "fp8")`` stores the decoder's linear layers as e4m3 with one fp32 scale
per output channel, in place; ``"w8a8"`` also quantizes their inputs, one e4m3 scale per token computed on the
fly, so the products run on FP8 tensor cores with nothing widened (``l2pd_kernels.linear_w8a8``).

Which layers: q/k/v (or the fused q/k/v), the attention output, gate/up/down of the dense MLP (and of a shared
expert), a mixture of experts' routed experts (``experts=False`` keeps them bf16) and the LM head (``head=False``
keeps it bf16). ``l2pd_kernels.fused_moe`` runs the routed experts (and the shared expert beside them where it
runs it): under ``"fp8"`` it widens their e4m3 weights in registers, under ``"w8a8"`` it multiplies e4m3 rows
(the norm's, and the SiLU product's quantized between its two kernels) on FP8 tensor cores. What stays bf16
and why: the embedding (a gather of a few rows per step: no weight read to save), the norms (a few KB), and a
mixture of experts' router (1 MB a layer; its scores pick the experts). Each quantized module's ``weight`` becomes
a float8_e4m3fn buffer beside a ``weight_scale`` buffer: the decoder multiplies through
``l2pd_kernels.linear_fp8`` (the few-row kernel reads the FP8 bytes and widens them in registers), and
``state_dict`` holds both. Quantizing drops the bf16 copies (and the packed q/k/v and gate/up buffers), so the
model's weight bytes halve; the next decode packs the e4m3 q/k/v and gate/up again, with their scales (one
row quantization and one product for q/k/v, one for gate/up with the SiLU gate in its epilogue).

``kv_cache="fp8"`` (with any ``kind``, or ``kind="native"`` to leave the weights as they are) makes the decode's
K/V cache e4m3 (``l2pd.cache.BlockKVCache``): each cached key and value head scaled so its largest magnitude is
448, with its fp32 scale beside it, quantized where ``rope_qkv`` writes it and widened in registers where the
attention reads it. It halves the K/V memory (an engine's pool of rows x positions), not the time: widening the
tiles costs the attention more than the bytes it saves (on an H200 a forward is 6% to 13% slower than over a
bf16 cache; benchmarks/RESULTS.md, "An e4m3 K/V cache"). ``kv_cache="native"`` goes back to the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from l2pd_kernels.fp8 import check_fp8_device
from l2pd_kernels.reference import quantize_fp8

from .decode import release
from .models import adapter_for
from .models.decoder import expert_weights, unpack_layers

KINDS = ("fp8", "w8a8")
KV_CACHES = ("native", "fp8")


def kv_cache_dtype(model: Any, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the K/V cache a decode of ``model`` keeps: e4m3 after ``quantize(model, kv_cache="fp8")``,
    else the activations' ``dtype``."""
    return torch.float8_e4m3fn if vars(model).get("_l2pd_kv_cache") == "fp8" else dtype


def quantize(model: Any, kind: str = "fp8", head: bool = True, experts: bool = True,
             kv_cache: str | None = None) -> Any:
    """Quantize ``model``'s decoder linear layers in place (see the module docstring; ``kind="native"``: not
    them) and, with ``kv_cache``, set the decode's K/V cache dtype; returns the model."""
    if kind not in (*KINDS, "native"):
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}, or 'native' to leave the weights")
    if kv_cache not in (None, *KV_CACHES):
        raise ValueError(f"kv_cache={kv_cache!r}: expected one of {KV_CACHES} (or None: as it is)")
    adapter = adapter_for(model)
    dec = adapter.decoder
    if kind != "native":
        check_fp8_device(dec.embed.weight.device)  # before anything changes
    if kv_cache == "fp8":
        check_fp8_device(dec.embed.weight.device, "kv_cache")
    if kv_cache is not None:
        release(model)  # the kept engine holds a cache of the old dtype
        model._l2pd_kv_cache = kv_cache
    if kind == "native":
        return model
    from .filter import model_fingerprint

    fingerprint = model_fingerprint(model)  # of the weights as given: the filters trained for them still apply
    unpack_layers(dec.layers)  # the packed buffers would keep bf16 copies alive
    release(model)  # kept CUDA graphs point at the old weights
    modules: list[nn.Module] = []
    for layer in dec.layers:
        if experts and layer.moe is not None:
            _quantize_experts(layer.moe, kind == "w8a8")
        modules += [m for m in (layer.qkv, layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
                    if m is not None]
    if head and dec.head is not dec.embed:
        modules.append(dec.head)
    for m in modules:
        _quantize_linear(m)
        m.l2pd_w8a8 = kind == "w8a8"
    model._l2pd_fingerprint, model._l2pd_quantized = fingerprint, kind
    return model


@torch.no_grad()
def _quantize_experts(moe: Any, a8: bool) -> None:
    """A mixture of experts' routed experts as e4m3 with channel scales, a layer at a time from their stacked
    weights (each expert's gate/up/down gets the bits ``_quantize_linear`` would give it). On CUDA the experts'
    buffers are views of the stacks the MoE kernels read (``expert_weights``, ``expert_scales``). ``a8``: they
    multiply e4m3 activations (w8a8)."""
    from .models.decoder import _keeps_views

    mods = list(moe.experts)
    for m in mods:
        for lin in (m.gate_proj, m.up_proj, m.down_proj):
            lin.l2pd_w8a8 = a8
    if mods[0].down_proj.weight.dtype == torch.float8_e4m3fn:
        return
    w13, w2 = expert_weights(moe)
    n, two_i, d = w13.shape
    inter = two_i // 2
    q13, s13 = quantize_fp8(w13.reshape(-1, d))
    q2, s2 = quantize_fp8(w2.reshape(-1, inter))
    q13, s13, q2, s2 = q13.view(n, two_i, d), s13.view(n, two_i), q2.view(n, d, inter), s2.view(n, d)
    del w13, w2
    vars(moe.owner).pop("_l2pd_experts", None)
    views = _keeps_views(q13.device)  # elsewhere each expert its own tensors (safetensors refuses shared storage)
    for i, m in enumerate(mods):
        for lin, w, sc in ((m.gate_proj, q13[i, :inter], s13[i, :inter]), (m.up_proj, q13[i, inter:], s13[i, inter:]),
                           (m.down_proj, q2[i], s2[i])):
            del lin.weight
            lin.register_buffer("weight", w if views else w.clone())
            lin.register_buffer("weight_scale", sc if views else sc.clone())
    if views:
        object.__setattr__(moe.owner, "_l2pd_experts", (q13, q2))
        object.__setattr__(moe.owner, "_l2pd_expert_scales", (s13, s2))


def _quantize_linear(module: nn.Module) -> None:
    w = module.weight
    if w.dtype == torch.float8_e4m3fn:
        return
    if w.dim() != 2:
        raise ValueError(f"{type(module).__name__}.weight {tuple(w.shape)} is not a matrix")
    w8, scale = quantize_fp8(w)
    del module.weight  # the parameter goes; the FP8 bytes and their scales are buffers
    module.register_buffer("weight", w8)
    module.register_buffer("weight_scale", scale)
