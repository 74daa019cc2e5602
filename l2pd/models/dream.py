"""Dream in the official checkpoint format (Qwen2.5-style bidirectional decoder, remote-code ``DreamModel``).

Parameter names, config keys and the logit shift match the official checkpoints, so state dicts move between
this class and the official one unchanged. The forward is ``decoder_forward`` over the module tree
(``dream_decoder``), the same function LLaDA runs: q/k/v with bias, grouped-query attention, an untied LM
head. **Logits are shifted**: the token at position i is predicted from the hidden state at i - 1. A decode
step therefore reads the hidden states one position to the left of the block; a cached step feeds the
position just before the block too (its K/V is recomputed with the rest), so the block's first position is
predicted from the same hidden position as in the uncached forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, ConfigFile
from .decoder import Decoder, Layer, RMSNorm, decoder_forward

# Dream-v0-Instruct-7B values; a config.json overrides any of them.
_DEFAULTS: dict[str, Any] = {
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "mask_token_id": 151666,
    "pad_token_id": 151643,
    "eos_token_id": 151643,
    "bos_token_id": 151643,
    "architectures": ["DreamModel"],
    "model_type": "Dream",
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class DreamConfig(ConfigFile):
    """Config with the official keys as attributes; unknown keys are kept and written back."""

    REQUIRED = _REQUIRED
    FAMILY = "Dream"

    def __init__(self, **kwargs: Any) -> None:
        merged = dict(_DEFAULTS)
        merged.update(kwargs)
        if merged.get("num_key_value_heads") is None:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        for k, v in merged.items():
            setattr(self, k, v)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, {self.num_attention_heads} heads and "
                             f"{self.num_key_value_heads} key/value heads do not divide")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:  # the name generate checks
        return self.max_position_embeddings



class DreamAttention(nn.Module):
    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        kv = c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, kv, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, kv, bias=True)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class DreamLayer(nn.Module):
    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        self.self_attn = DreamAttention(c)
        self.mlp = DreamMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DreamBaseModel(nn.Module):
    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


@dataclass
class DreamOutput:
    logits: torch.Tensor


def dream_decoder(model: nn.Module, config: Any) -> Decoder:
    """Dream's module tree (ours or the official ``DreamModel``'s) as a ``Decoder``."""
    base = model.model
    layers = [Layer(lyr, lyr.input_layernorm, lyr.self_attn.q_proj, lyr.self_attn.k_proj, lyr.self_attn.v_proj,
                    lyr.self_attn.o_proj, lyr.post_attention_layernorm, lyr.mlp.gate_proj, lyr.mlp.up_proj,
                    lyr.mlp.down_proj) for lyr in base.layers]
    head = base.embed_tokens if getattr(config, "tie_word_embeddings", False) else model.lm_head
    n_heads = config.num_attention_heads
    return Decoder(base.embed_tokens, layers, base.norm, head, n_heads, config.num_key_value_heads or n_heads,
                   config.hidden_size // n_heads, config.hidden_size, float(getattr(config, "rms_norm_eps", 1e-6)),
                   True, float(config.rope_theta))


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream's convention over a whole sequence: position i gets the logits of hidden state i - 1 (the first
    position keeps its own)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], 1)


class DreamModel(Checkpoint, nn.Module):
    """Our Dream: ``model.*`` and ``lm_head`` parameters exactly as in the official checkpoints."""

    config_class = DreamConfig

    @staticmethod
    def tied_head(config: Any) -> str | None:
        return "lm_head.weight" if config.tie_word_embeddings else None

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r}: only silu is supported")
        self.config = config
        self.model = DreamBaseModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_slice: tuple[int, int] | None = None, **kwargs: Any):
        """Shifted logits (token i predicted at position i), as the official model returns them; over the
        whole sequence, or over positions ``logits_slice=(a, b)`` (read from hidden states a - 1 .. b - 2)."""
        if "logits_index" in kwargs:
            raise ValueError("DreamModel.forward takes logits_slice, not logits_index")
        dec = dream_decoder(self, self.config)
        if logits_slice is not None and logits_slice[0] > 0:
            a, b = logits_slice
            return DreamOutput(decoder_forward(dec, input_ids, attention_mask, logits_slice=(a - 1, b - 1), **kwargs))
        logits = shift_logits(decoder_forward(dec, input_ids, attention_mask, **kwargs))
        return DreamOutput(logits if logits_slice is None else logits[:, logits_slice[0] : logits_slice[1]])
