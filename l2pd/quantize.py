"""FP8 weights: ``l2pd.quantize(model, "fp8")`` stores the decoder's linear layers as e4m3 with one fp32 scale
per output channel, in place; ``"w8a8"`` also quantizes their inputs, one e4m3 scale per token computed on the
fly, so the products run on FP8 tensor cores with nothing widened (``l2pd_kernels.linear_w8a8``).

Which layers: q/k/v (or the fused q/k/v), the attention output, gate/up/down of the dense MLP (and of a shared
expert) and the LM head (``head=False`` keeps it bf16). What stays bf16 and why: the embedding (a gather of a
few rows per step: no weight read to save), the norms (a few KB), and a mixture of experts' router and routed
experts (the fused MoE kernel reads bf16; FP8 experts are not done). Each quantized module's ``weight`` becomes
a float8_e4m3fn buffer beside a ``weight_scale`` buffer: the decoder multiplies through
``l2pd_kernels.linear_fp8`` (the few-row kernel reads the FP8 bytes and widens them in registers), and
``state_dict`` holds both. Quantizing drops the bf16 copies (and the packed q/k/v and gate/up buffers), so the
model's weight bytes halve; the next decode packs the e4m3 q/k/v and gate/up again, with their scales (one
row quantization and one product for q/k/v, one for gate/up with the SiLU gate in its epilogue).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from l2pd_kernels.fp8 import check_fp8_device
from l2pd_kernels.reference import quantize_fp8

from .decode import release
from .models import adapter_for
from .models.decoder import unpack_layers

KINDS = ("fp8", "w8a8")


def quantize(model: Any, kind: str = "fp8", head: bool = True) -> Any:
    """Quantize ``model``'s decoder linear layers in place (see the module docstring); returns the model."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    from .filter import model_fingerprint

    adapter = adapter_for(model)
    dec = adapter.decoder
    check_fp8_device(dec.embed.weight.device)  # before anything changes
    fingerprint = model_fingerprint(model)  # of the weights as given: the filters trained for them still apply
    unpack_layers(dec.layers)  # the packed buffers would keep bf16 copies alive
    release(model)  # kept CUDA graphs point at the old weights
    modules: list[nn.Module] = []
    for layer in dec.layers:
        modules += [m for m in (layer.qkv, layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
                    if m is not None]
    if head and dec.head is not dec.embed:
        modules.append(dec.head)
    for m in modules:
        _quantize_linear(m)
        m.l2pd_w8a8 = kind == "w8a8"
    model._l2pd_fingerprint, model._l2pd_quantized = fingerprint, kind
    return model


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
