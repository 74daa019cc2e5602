"""LLaDA in the official checkpoint format.

The module tree and config keys match the official remote-code ``LLaDAModelLM`` so that state dicts move
between the two unchanged. The forward is ``decoder_forward`` (``decoder.py``) over that module tree, mapped
by ``llada_decoder`` (``llada_forward`` is the shorthand): it runs on our class and, through ``l2pd.patch``, on
the official class without calling any of its methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, ConfigFile
from .decoder import (
    Decoder,
    Layer,
    RMSNorm,
    decoder_forward,
    pack_layers,
    unpack_layers,
)

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


class LLaDAConfig(ConfigFile):
    """Config with the official keys as attributes; unknown keys are kept and written back."""

    REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size")
    FAMILY = "LLaDA"

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



def pack_weights(transformer: nn.Module) -> bool:
    """Store each block's q/k/v and gate/up weights in one buffer each, the parameters becoming row views of
    it: one matmul instead of three and of two (about 5% less matmul time at 32 rows on an H100, where the
    small products do not reach the memory bandwidth). No extra memory; the module tree, the parameter
    names and ``load_state_dict`` (which copies into the views) are unchanged. Only on CUDA (safetensors
    refuses to save CPU tensors that share storage); biases, where every module of a group has one, pack the
    same way. Returns whether the blocks are packed now."""
    return pack_layers([_llada_layer(b) for b in transformer.blocks])


def unpack_weights(transformer: nn.Module) -> None:
    """Undo ``pack_weights``: every weight gets its own storage again."""
    unpack_layers([_llada_layer(b) for b in transformer.blocks])


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


class LLaDAModelLM(Checkpoint, nn.Module):
    """Our LLaDA: ``model.transformer.*`` parameters exactly as in the official checkpoints."""

    config_class = LLaDAConfig

    @staticmethod
    def tied_head(config: Any) -> str | None:
        return "model.transformer.ff_out.weight" if config.weight_tying else None

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

