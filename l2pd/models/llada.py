"""LLaDA in the official checkpoint format.

The module tree and config keys match the official remote-code ``LLaDAModelLM`` so that state dicts move
between the two unchanged. The forward is a plain function over that module tree (``llada_forward``): it
runs on our class and, through ``l2pd.patch``, on the official class without calling any of its methods.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from l2pd_kernels import reference

# LLaDA-8B-Instruct values; a config.json overrides any of them.
_DEFAULTS: dict[str, Any] = {
    "d_model": 4096,
    "n_heads": 32,
    "n_kv_heads": None,  # None: same as n_heads
    "n_layers": 32,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "max_sequence_length": 4096,
    "rope": True,
    "rope_theta": 500000.0,
    "rope_full_precision": True,
    "layer_norm_type": "rms",
    "rms_norm_eps": 1e-5,
    "activation_type": "silu",
    "block_type": "llama",
    "vocab_size": 126464,
    "embedding_size": 126464,
    "weight_tying": False,
    "include_bias": False,
    "scale_logits": False,
    "alibi": False,
    "mask_token_id": 126336,
    "eos_token_id": 126081,
    "pad_token_id": 126081,
    "architectures": ["LLaDAModelLM"],
    "model_type": "llada",
}


class LLaDAConfig:
    """Config with the official keys as attributes; unknown keys are kept and written back."""

    def __init__(self, **kwargs: Any) -> None:
        merged = dict(_DEFAULTS)
        merged.update(kwargs)
        if merged["n_kv_heads"] is None:
            merged["n_kv_heads"] = merged["n_heads"]
        if merged["embedding_size"] is None:
            merged["embedding_size"] = merged["vocab_size"]
        for key, value in merged.items():
            setattr(self, key, value)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def from_json(cls, path: str) -> "LLaDAConfig":
        from ..files import read_json

        cfg = read_json(path, "config.json")
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
        missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size") if k not in cfg]
        if missing:  # the 8B defaults would load, then fail on every weight's shape
            raise ValueError(f"{path} lacks {missing}: not a LLaDA config.json (copy the model's own)")
        return cls(**cfg)


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
    return F.linear(x, module.weight, getattr(module, "bias", None))


def _lin(ops: Any, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A linear layer through the forward's ops (the few-row kernel on CUDA) when it has no bias."""
    if getattr(module, "bias", None) is not None:
        return _linear(x, module)
    return ops.linear(x, module.weight)


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


def _norm(ops: Any, x: torch.Tensor, norm: nn.Module, eps: float, delta: torch.Tensor | None):
    """(norm(x + delta), x + delta); the fused kernel where the norm has no bias and matches x's dtype."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if bias is not None or (weight is not None and weight.dtype != x.dtype):
        x = x if delta is None else x + delta
        return rms_norm(x, norm, eps), x
    return ops.rms_norm(x, weight, eps, delta=delta)


def pack_weights(transformer: nn.Module) -> bool:
    """Store each block's q/k/v and gate/up weights in one buffer each, the parameters becoming row views of
    it: one matmul instead of three and of two (about 5% less matmul time at 32 rows on an H100, where the
    small products do not reach the memory bandwidth). No extra memory; the module tree, the parameter
    names and ``load_state_dict`` (which copies into the views) are unchanged. Only on CUDA (safetensors
    refuses to save CPU tensors that share storage) and without biases. Returns whether the blocks are
    packed now."""
    return pack_layers([_llada_layer(b) for b in transformer.blocks])


def unpack_weights(transformer: nn.Module) -> None:
    """Undo ``pack_weights``: every weight gets its own storage again."""
    unpack_layers([_llada_layer(b) for b in transformer.blocks])


def _groups(layer: "Layer") -> tuple:
    return (("_l2pd_qkv", [layer.q, layer.k, layer.v]), ("_l2pd_gate_up", [layer.gate, layer.up]))


def pack_layers(layers: list["Layer"]) -> bool:
    """``pack_weights`` over any ``Decoder``'s layers."""
    done = True
    for layer in layers:
        for attr, mods in _groups(layer):
            if _packed(layer.owner, attr, mods) is not None:
                continue
            ws = [m.weight for m in mods]
            if ws[0].device.type != "cuda" or any(getattr(m, "bias", None) is not None for m in mods) or any(
                    w.dtype != ws[0].dtype for w in ws):
                done = False
                continue
            buf = torch.cat([w.detach() for w in ws])
            row = 0
            for m, w in zip(mods, ws):
                m.weight.data = buf[row : row + w.shape[0]]
                row += w.shape[0]
            object.__setattr__(layer.owner, attr, buf)  # a plain attribute: not a parameter, not in the state dict
    return done


def unpack_layers(layers: list["Layer"]) -> None:
    for layer in layers:
        for attr, mods in _groups(layer):
            if vars(layer.owner).pop(attr, None) is not None:
                for m in mods:
                    m.weight.data = m.weight.detach().clone()


def _packed(block: nn.Module, attr: str, mods: list[nn.Module]) -> torch.Tensor | None:
    """The packed buffer if every weight is still its view (a ``.to()`` or reassignment breaks the link)."""
    buf = vars(block).get(attr)
    if buf is None:
        return None
    row = 0
    for m in mods:
        w = m.weight
        if w.data_ptr() != buf[row].data_ptr() or w.dtype != buf.dtype:
            return None
        row += w.shape[0]
    return buf if row == buf.shape[0] else None


def llada_forward(
    transformer: nn.Module,
    config: Any,
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
) -> torch.Tensor:
    """Logits for ``input_ids`` [B, S], the positions ``start .. start + S`` of the sequence.

    Without a cache S is the whole sequence. With a cache (``l2pd.cache.BlockKVCache``) the K/V of these
    positions are written into its slots (``slots`` [S], a device tensor, default ``start + arange(S)``) and
    attention runs over all its ``T`` slots, so the positions not fed come from the cache. ``attention_mask``
    [B, T] covers every key position (1 = real token, 0 = pad); ``position_ids`` [B, S] default to positions
    that skip left padding. ``logits_slice=(a, b)`` or ``logits_index`` (a device tensor of fed positions)
    computes the LM head only there: the head over a large vocabulary is the costliest single matmul.
    Device-tensor slots and indices let one captured CUDA graph serve every block. ``fused``: see
    ``forward_ops``.
    """
    return decoder_forward(llada_decoder(transformer, config), input_ids, attention_mask, cache=cache, start=start,
                           position_ids=position_ids, logits_slice=logits_slice, slots=slots,
                           logits_index=logits_index, fused=fused)


def llada_decoder(transformer: nn.Module, config: Any) -> Decoder:
    """LLaDA's module tree (ours or the official class's) as a ``Decoder``."""
    layers = [_llada_layer(b) for b in transformer.blocks]
    head = transformer.wte if getattr(config, "weight_tying", False) else transformer.ff_out
    n_heads = config.n_heads
    return Decoder(transformer.wte, layers, transformer.ln_f, head, n_heads, config.n_kv_heads or n_heads,
                   config.d_model // n_heads, config.d_model, getattr(config, "rms_norm_eps", 1e-5), bool(config.rope),
                   float(config.rope_theta), bool(getattr(config, "scale_logits", False)))


def _llada_layer(b: nn.Module) -> "Layer":
    return Layer(b, b.attn_norm, b.q_proj, b.k_proj, b.v_proj, b.attn_out, b.ff_norm, b.ff_proj, b.up_proj, b.ff_out)


@dataclass
class Layer:
    """One pre-norm block's modules; ``owner`` holds the packed q/k/v and gate/up buffers."""

    owner: nn.Module
    attn_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    ff_norm: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module


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


def decoder_forward(
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
) -> torch.Tensor:
    """``llada_forward`` over any ``Decoder`` (same arguments, same result)."""
    bsz, seq = input_ids.shape
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
    # SDPA mask: True = may attend. Pass attention_mask=None when nothing is padded: that keeps the fused
    # flash kernels and avoids checking the mask on the host at every forward.
    sdpa_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]

    ops = forward_ops(device, fused)
    n_heads, n_kv, head_dim, eps = dec.n_heads, dec.n_kv, dec.head_dim, dec.eps
    if dec.rope:
        cos, sin = rope_cos_sin(position_ids, head_dim, dec.rope_theta)
    else:  # the identity rotation
        cos = torch.ones(bsz, seq, head_dim // 2, device=device)
        sin = torch.zeros_like(cos)
    fresh_slots = torch.arange(seq, device=device) if cache is None else None

    x = F.embedding(input_ids, dec.embed.weight)
    delta = None  # the last residual branch, added inside the next norm
    for layer, blk in enumerate(dec.layers):
        h, x = _norm(ops, x, blk.attn_norm, eps, delta)
        qkv = _packed(blk.owner, "_l2pd_qkv", [blk.q, blk.k, blk.v])
        if qkv is not None:  # one matmul; q, k, v are column slices (the rope kernel takes strides)
            q, k, v = ops.linear(h, qkv).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
        else:
            q, k, v = _linear(h, blk.q), _linear(h, blk.k), _linear(h, blk.v)
        q = q.view(bsz, seq, n_heads, head_dim)
        k = k.view(bsz, seq, n_kv, head_dim)
        v = v.view(bsz, seq, n_kv, head_dim)
        if cache is not None:  # keys are cached after RoPE, so cached positions are never rotated again
            k_all, v_all = cache.k[layer], cache.v[layer]
        else:
            k_all = torch.empty(bsz, n_kv, seq, head_dim, dtype=k.dtype, device=device)
            v_all = torch.empty_like(k_all)
        q = ops.rope_qkv(q, k, v, cos, sin, k_all, v_all, fresh_slots if cache is None else slots)
        att = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=sdpa_mask, enable_gqa=n_kv != n_heads)
        a = _lin(ops, att.transpose(1, 2).reshape(bsz, seq, n_heads * head_dim), blk.o)
        h, x = _norm(ops, x, blk.ff_norm, eps, a)
        gate_up = _packed(blk.owner, "_l2pd_gate_up", [blk.gate, blk.up])
        if gate_up is not None:  # silu(gate) * up straight from the packed matmul
            act = ops.linear_gate_up_silu(h, gate_up)
        else:
            act = ops.silu_mul(_linear(h, blk.gate), _linear(h, blk.up))
        delta = _lin(ops, act, blk.down)

    if delta is None:  # no blocks
        delta = torch.zeros_like(x)
    if logits_index is not None:
        x, delta = x.index_select(1, logits_index), delta.index_select(1, logits_index)
    elif logits_slice is not None:
        x, delta = x[:, logits_slice[0] : logits_slice[1]], delta[:, logits_slice[0] : logits_slice[1]]
    x, _ = _norm(ops, x, dec.final_norm, eps, delta)
    logits = _lin(ops, x, dec.head)
    if dec.scale_logits:
        logits = logits * (1.0 / math.sqrt(dec.d_model))
    return logits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self, self.eps)


class LLaDABlock(nn.Module):
    """Holds the weights of one official "llama" block; the math lives in ``llada_forward``."""

    def __init__(self, c: LLaDAConfig) -> None:
        super().__init__()
        kv_dim = c.n_kv_heads * c.head_dim
        bias = c.include_bias
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=bias)
        self.k_proj = nn.Linear(c.d_model, kv_dim, bias=bias)
        self.v_proj = nn.Linear(c.d_model, kv_dim, bias=bias)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=bias)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=bias)
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=bias)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=bias)


class LLaDAModel(nn.Module):
    def __init__(self, c: LLaDAConfig) -> None:
        super().__init__()
        modules = {
            "wte": nn.Embedding(c.embedding_size, c.d_model),
            "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers)),
            "ln_f": RMSNorm(c.d_model, c.rms_norm_eps),
        }
        if not c.weight_tying:
            modules["ff_out"] = nn.Linear(c.d_model, c.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)


@dataclass
class LLaDAOutput:
    logits: torch.Tensor


class LLaDAModelLM(nn.Module):
    """Our LLaDA: ``model.transformer.*`` parameters exactly as in the official checkpoints."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        if config.block_type != "llama" or config.layer_norm_type != "rms" or config.activation_type != "silu":
            raise ValueError(
                "only the LLaDA 'llama' block (rms norm, silu) is supported, got "
                f"block_type={config.block_type!r} layer_norm_type={config.layer_norm_type!r} "
                f"activation_type={config.activation_type!r}"
            )
        if config.alibi:
            raise ValueError("alibi=True is not supported (LLaDA uses RoPE)")
        self.config = config
        self.model = LLaDAModel(config)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        return LLaDAOutput(llada_forward(self.model.transformer, self.config, input_ids, attention_mask, **kwargs))

    # ---- checkpoint io -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
    ) -> "LLaDAModelLM":
        """Load ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``)."""
        from ..files import load_safetensors, read_json

        folder = os.fspath(folder)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {folder!r}")
        config = LLaDAConfig.from_json(cfg_path)
        dtype = _resolve_dtype(torch_dtype, config)
        single = os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            weight_map = read_json(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no \"weight_map\" object")
            files = [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder!r}")
        with torch.device("meta"):
            model = cls(config)
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(load_safetensors(path, device=str(device)))
        state = {k: v.to(dtype) for k, v in state.items()}
        if config.weight_tying:
            state.pop("model.transformer.ff_out.weight", None)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # torch lists every mismatch; the first few say enough
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4]
            raise ValueError(f"{folder}: the weights do not match config.json: {' '.join(lines)}") from None
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` and safetensors in the official layout (sharded above ``max_shard_bytes``)."""
        from ..files import save_safetensors

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": "pt"}
        if max_shard_bytes is None:
            save_safetensors(state, os.path.join(folder, "model.safetensors"), metadata=meta)
            return
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, os.path.join(folder, fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _resolve_dtype(torch_dtype: torch.dtype | str | None, config: LLaDAConfig) -> torch.dtype:
    if torch_dtype is None or torch_dtype == "auto":
        torch_dtype = getattr(config, "torch_dtype", None) or "float32"
    if isinstance(torch_dtype, str):
        name = torch_dtype.removeprefix("torch.")
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"torch_dtype={torch_dtype!r}: expected float32, bfloat16 or float16")
        torch_dtype = getattr(torch, name)
    return torch_dtype
