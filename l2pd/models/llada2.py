"""LLaDA 2.x (``LLaDA2MoeModelLM``) in the official checkpoint format: a mixture-of-experts diffusion LM with
block-causal attention.

The module tree and config keys match the official remote code, so state dicts move between the two
unchanged: fused ``query_key_value`` with per-head RMSNorm on q and k (before RoPE), RoPE on the first
``partial_rotary_factor`` of each head, grouped-query attention, a dense SwiGLU MLP in the first
``first_k_dense_replace`` layers and in the others ``num_experts`` routed experts (sigmoid scores, group-limited
top-k with an expert bias; ``l2pd_kernels.reference.moe_route``) plus shared experts, an untied head.
Attention is bidirectional inside a block of positions and causal across blocks: a query at position i sees
the keys at positions j with j // L <= i // L, L the decoding block length (32 by default; ``generate``
sets it). So the K/V of a finished block never changes, and a prefix cache is exact. The forward is
``decoder_forward`` over ``llada2_decoder``'s mapping of this tree, on our class and, through ``l2pd.patch``,
on the official one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, ConfigFile
from .decoder import Decoder, Layer, MoE, RMSNorm, decoder_forward

BLOCK_LENGTH = 32  # the official generate's default block: what the attention mask uses unless told otherwise

# LLaDA2.0-mini values; a config.json overrides any of them.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 157184,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_bias": False,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 16384,
    "rope_theta": 600000.0,
    "rope_scaling": None,
    "partial_rotary_factor": 0.5,
    "use_qk_norm": True,
    "num_experts": 256,
    "num_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "moe_intermediate_size": 512,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True,
    "mask_token_id": 156895,
    "eos_token_id": 156892,
    "pad_token_id": 156892,
    "architectures": ["LLaDA2MoeModelLM"],
    "model_type": "llada2_moe",
}
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


class LLaDA2Config(ConfigFile):
    """Config with the official keys as attributes; unknown keys are kept and written back."""

    REQUIRED = _REQUIRED
    FAMILY = "LLaDA 2.x"

    def __init__(self, **kwargs: Any) -> None:
        merged = dict(_DEFAULTS)
        merged.update(kwargs)
        if merged.get("head_dim") is None:
            merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
        if merged.get("num_key_value_heads") is None:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        for key, value in merged.items():
            setattr(self, key, value)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        rot = self.rotary_dim
        if rot % 2 or not 0 < rot <= self.head_dim:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} gives {rot} rotary dims of "
                             f"head_dim={self.head_dim}: expected an even number in [2, head_dim]")
        if self.num_experts and (self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group):
            raise ValueError(f"num_experts={self.num_experts}, n_group={self.n_group}, topk_group={self.topk_group}: "
                             "the experts must split evenly into n_group groups, topk_group of them kept")
        if self.hidden_act != "silu" or self.use_qkv_bias or self.use_bias:
            raise ValueError("only the silu MLP without biases is supported (hidden_act='silu', use_qkv_bias and "
                             "use_bias False)")
        if self.rope_scaling not in (None, {}):
            raise ValueError(f"rope_scaling={self.rope_scaling!r} is not supported (plain RoPE only)")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * float(self.partial_rotary_factor))

    @property
    def max_sequence_length(self) -> int:  # the name generate checks
        return self.max_position_embeddings



class LLaDA2MLP(nn.Module):
    def __init__(self, c: LLaDA2Config, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, c.hidden_size, bias=False)


class LLaDA2Gate(nn.Module):
    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear (a no-op on the meta device)
        self.register_buffer("expert_bias", torch.zeros(c.num_experts))


class LLaDA2SparseMoeBlock(nn.Module):
    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        self.gate = LLaDA2Gate(c)
        self.experts = nn.ModuleList(LLaDA2MLP(c, c.moe_intermediate_size) for _ in range(c.num_experts))
        if c.num_shared_experts:
            self.shared_experts = LLaDA2MLP(c, c.moe_intermediate_size * c.num_shared_experts)


class LLaDA2Attention(nn.Module):
    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        d = c.head_dim
        self.query_key_value = nn.Linear(c.hidden_size, (c.num_attention_heads + 2 * c.num_key_value_heads) * d,
                                         bias=False)
        if c.use_qk_norm:
            self.query_layernorm = RMSNorm(d, c.rms_norm_eps)
            self.key_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.dense = nn.Linear(c.num_attention_heads * d, c.hidden_size, bias=False)


class LLaDA2DecoderLayer(nn.Module):
    def __init__(self, c: LLaDA2Config, index: int) -> None:
        super().__init__()
        self.attention = LLaDA2Attention(c)
        moe = c.num_experts and index >= c.first_k_dense_replace
        self.mlp = LLaDA2SparseMoeBlock(c) if moe else LLaDA2MLP(c, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LLaDA2Model(nn.Module):
    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LLaDA2DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def _moe(mlp: nn.Module, c: Any) -> MoE | None:
    if not hasattr(mlp, "experts"):
        return None
    bias = getattr(mlp.gate, "expert_bias", None) if getattr(c, "moe_router_enable_expert_bias", True) else None
    return MoE(mlp, mlp.gate, bias, mlp.experts, int(c.num_experts_per_tok), str(getattr(c, "score_function",
               "sigmoid")), int(getattr(c, "n_group", 1) or 1), int(getattr(c, "topk_group", 1) or 1),
               float(getattr(c, "routed_scaling_factor", 1.0)), bool(getattr(c, "norm_topk_prob", True)))


def llada2_decoder(model: nn.Module, config: Any, block_length: int = BLOCK_LENGTH) -> Decoder:
    """LLaDA 2.x's module tree (ours or the official class's) as a ``Decoder`` whose attention is block-causal
    over blocks of ``block_length`` positions."""
    base = model.model
    layers = []
    for lyr in base.layers:
        att, mlp = lyr.attention, lyr.mlp
        ffn = getattr(mlp, "shared_experts", None) if hasattr(mlp, "experts") else mlp
        layers.append(Layer(lyr, lyr.input_layernorm, None, None, None, att.dense, lyr.post_attention_layernorm,
                            getattr(ffn, "gate_proj", None), getattr(ffn, "up_proj", None),
                            getattr(ffn, "down_proj", None), qkv=att.query_key_value,
                            q_norm=getattr(att, "query_layernorm", None), k_norm=getattr(att, "key_layernorm", None),
                            moe=_moe(mlp, config)))
    head = base.word_embeddings if getattr(config, "tie_word_embeddings", False) else model.lm_head
    n_heads = config.num_attention_heads
    head_dim = config.head_dim or config.hidden_size // n_heads
    return Decoder(base.word_embeddings, layers, base.norm, head, n_heads, config.num_key_value_heads or n_heads,
                   head_dim, config.hidden_size, float(getattr(config, "rms_norm_eps", 1e-6)), True,
                   float(config.rope_theta), rotary_dim=int(head_dim * float(getattr(config, "partial_rotary_factor",
                                                                                    1.0))),
                   block_causal=block_length)


@dataclass
class LLaDA2Output:
    logits: torch.Tensor


class LLaDA2MoeModelLM(Checkpoint, nn.Module):
    """Our LLaDA 2.x: ``model.*`` and ``lm_head`` parameters exactly as in the official checkpoints."""

    config_class = LLaDA2Config

    @staticmethod
    def tied_head(config: Any) -> str | None:
        return "lm_head.weight" if config.tie_word_embeddings else None

    def __init__(self, config: LLaDA2Config) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDA2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.word_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                block_length: int = BLOCK_LENGTH, **kwargs: Any) -> LLaDA2Output:
        """Logits over ``input_ids`` [B, S] (positions from 0, or ``position_ids``), block-causal over blocks of
        ``block_length`` positions; ``attention_mask`` [B, S] marks padding (1 = token)."""
        dec = llada2_decoder(self, self.config, block_length)
        return LLaDA2Output(decoder_forward(dec, input_ids, attention_mask, **kwargs))
