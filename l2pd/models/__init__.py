"""Model families behind one interface: what decoding, caching, patching, collection and evaluation need
from a model, chosen from the module tree and config of the object (ours or the official remote-code class).

``adapter_for(model)`` returns an ``Adapter``: the model as a ``Decoder`` (embedding, layers, final norm,
head, shapes), its forward, the logit shift (Dream predicts position i from hidden state i - 1), default
token ids, device and dtype. Adding a family is one file with its module tree and a branch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .decoder import Decoder, Layer, decoder_forward, pack_layers
from .dream import DreamConfig, DreamModel, dream_decoder
from .llada import LLaDAConfig, LLaDAModelLM, llada_decoder
from .llada2 import LLaDA2Config, LLaDA2MoeModelLM, llada2_decoder

__all__ = ["Adapter", "DreamConfig", "DreamModel", "LLaDA2Config", "LLaDA2MoeModelLM", "LLaDAConfig", "LLaDAModelLM",
           "adapter_for", "load_pretrained"]


def load_pretrained(folder: str, torch_dtype: Any = None, device: Any = "cpu", dtype: Any = None) -> Any:
    """Our LLaDA, Dream or LLaDA 2.x class for a checkpoint folder, chosen by its config.json (``model_type``)."""
    import os

    from ..files import read_json
    from .checkpoint import dtype_alias

    torch_dtype = dtype_alias(torch_dtype, dtype)

    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {os.fspath(folder)!r}")
    cfg = read_json(path, "config.json")
    kind = str(cfg.get("model_type", "")).lower() if isinstance(cfg, dict) else ""
    cls = DreamModel if kind == "dream" else LLaDA2MoeModelLM if kind in LLADA2_TYPES else LLaDAModelLM
    return cls.from_pretrained(folder, torch_dtype=torch_dtype, device=device)

_LLADA_BLOCK = ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
_LLADA_CONFIG = ("d_model", "n_heads", "n_layers", "rope_theta", "max_sequence_length")
_DREAM_CONFIG = ("hidden_size", "num_attention_heads", "num_hidden_layers", "rope_theta")
LLADA2_TYPES = ("llada2_moe", "llada2")


@dataclass
class Adapter:
    family: str  # "llada" | "dream" | "llada2" | "llada_moe"
    model: Any
    config: Any
    decoder: Decoder
    shift: int  # 1: the logits of position i come from hidden state i - 1
    mask_id: int
    eos_id: int
    pad_id: int
    max_length: int | None

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed.weight.dtype

    @property
    def block_causal(self) -> bool:
        """Attention causal across blocks (LLaDA 2.x): blocks align with multiples of the block length."""
        return self.decoder.block_causal > 0

    @property
    def vocab_rows(self) -> int:
        return self.decoder.embed.weight.shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.decoder.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """Unshifted logits (hidden state i -> logits i) over the fed positions; see ``decoder_forward``."""
        return decoder_forward(self.decoder, input_ids, attention_mask, **kw)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits over a whole sequence: token i predicted at position i (shift applied)."""
        out = self.forward(input_ids, attention_mask)
        return torch.cat([out[:, :1], out[:, :-1]], 1) if self.shift else out

    def pack(self) -> bool:
        return pack_layers(self.decoder.layers)

    def key(self) -> tuple:
        """What identifies these weights for kept CUDA graphs."""
        first = self.decoder.layers[0].o.weight.data_ptr() if self.decoder.layers else 0
        return (self.family, self.decoder.embed.weight.data_ptr(), first)

    def fingerprint_parts(self) -> tuple[dict, list[torch.Tensor]]:
        """Config values and weights that identify the model (the filter records it)."""
        c = self.config
        if self.family == "llada":  # unchanged since filters were first recorded
            keys = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size", "rope_theta")
            d = self.decoder
            return {k: getattr(c, k, None) for k in keys}, [d.embed.weight, d.head.weight, d.final_norm.weight]
        keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
                "vocab_size", "rope_theta")
        if self.family in ("llada2", "llada_moe"):
            keys += ("num_experts", "moe_intermediate_size", "num_experts_per_tok", "partial_rotary_factor")
        d = self.decoder
        return {"family": self.family, **{k: getattr(c, k, None) for k in keys}}, [d.embed.weight, d.head.weight,
                                                                             d.final_norm.weight]


def _id(config: Any, name: str, default: int) -> int:
    value = getattr(config, name, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else int(value)


def adapter_for(model: Any) -> Adapter:
    """The adapter for a LLaDA or Dream model (ours or the official class); a ValueError naming what is
    missing otherwise."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{name} has no .config: not a LLaDA or Dream model")
    inner = getattr(model, "model", None)
    if getattr(inner, "transformer", None) is not None:
        return _llada(model, name, config)
    if getattr(inner, "layers", None) is not None and getattr(inner, "word_embeddings", None) is not None:
        return _llada2(model, name, config)
    if getattr(inner, "layers", None) is not None and getattr(inner, "embed_tokens", None) is not None:
        if len(inner.layers) and hasattr(getattr(inner.layers[0], "mlp", None), "experts"):
            return _llada_moe(model, name, config)
        return _dream(model, name, config)
    raise ValueError(f"{name} has neither model.transformer (LLaDA), model.layers + model.embed_tokens (Dream) nor "
                     "model.layers + model.word_embeddings (LLaDA 2.x)")


def _llada(model: Any, name: str, config: Any) -> Adapter:
    missing = [k for k in _LLADA_CONFIG if getattr(config, k, None) is None]
    if missing:
        raise ValueError(f"{name}.config lacks the LLaDA keys {missing}")
    tf = model.model.transformer
    need = ["wte", "blocks", "ln_f"] + ([] if getattr(config, "weight_tying", False) else ["ff_out"])
    absent = [k for k in need if not hasattr(tf, k)]
    if absent:
        raise ValueError(f"{name}.model.transformer lacks {absent}")
    if len(tf.blocks) != config.n_layers:
        raise ValueError(f"{name} has {len(tf.blocks)} blocks but config.n_layers={config.n_layers}")
    for i, block in enumerate(tf.blocks):
        absent = [m for m in _LLADA_BLOCK if not hasattr(block, m)]
        if absent:
            raise ValueError(f"{name} block {i} lacks {absent} (only the LLaDA 'llama' block is supported)")
    eos = _id(config, "eos_token_id", 126081)
    return Adapter("llada", model, config, llada_decoder(tf, config), 0, _id(config, "mask_token_id", 126336), eos,
                   _id(config, "pad_token_id", eos), getattr(config, "max_sequence_length", None))


def _check_tree(model: Any, name: str, config: Any, keys: tuple[str, ...], family: str) -> Any:
    """``model.model`` of a Hugging Face-style tree (``layers``, ``norm``, ``lm_head`` unless tied), with its
    config keys and layer count checked."""
    missing = [k for k in keys if getattr(config, k, None) is None]
    if missing:
        raise ValueError(f"{name}.config lacks the {family} keys {missing}")
    base = model.model
    if not hasattr(base, "norm") or (not getattr(config, "tie_word_embeddings", False)
                                     and not hasattr(model, "lm_head")):
        raise ValueError(f"{name} lacks model.norm or lm_head")
    if len(base.layers) != config.num_hidden_layers:
        raise ValueError(f"{name} has {len(base.layers)} layers but config.num_hidden_layers="
                         f"{config.num_hidden_layers}")
    return base


def _dream(model: Any, name: str, config: Any) -> Adapter:
    base = _check_tree(model, name, config, _DREAM_CONFIG, "Dream")
    for i, layer in enumerate(base.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        absent = [m for m in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, m)]
        absent += [m for m in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, m)]
        absent += [m for m in ("input_layernorm", "post_attention_layernorm") if not hasattr(layer, m)]
        if absent:
            raise ValueError(f"{name} layer {i} lacks {absent} (the Dream / Qwen2 layer)")
    eos = _id(config, "eos_token_id", 151643)
    return Adapter("dream", model, config, dream_decoder(model, config), 1, _id(config, "mask_token_id", 151666),
                   eos, _id(config, "pad_token_id", eos), getattr(config, "max_position_embeddings", None))


def _llada2(model: Any, name: str, config: Any) -> Adapter:
    base = _check_tree(model, name, config, _DREAM_CONFIG, "LLaDA 2.x")
    for i, layer in enumerate(base.layers):
        att, mlp = getattr(layer, "attention", None), getattr(layer, "mlp", None)
        absent = [m for m in ("query_key_value", "dense") if not hasattr(att, m)]
        absent += [m for m in ("input_layernorm", "post_attention_layernorm") if not hasattr(layer, m)]
        if hasattr(mlp, "experts"):
            absent += [m for m in ("gate",) if not hasattr(mlp, m)]
        else:
            absent += [m for m in ("gate_proj", "up_proj", "down_proj") if not hasattr(mlp, m)]
        if absent:
            raise ValueError(f"{name} layer {i} lacks {absent} (the LLaDA 2.x layer)")
    if getattr(config, "score_function", "sigmoid") not in ("sigmoid", "softmax"):
        raise ValueError(f"{name}.config.score_function={config.score_function!r}: expected sigmoid or softmax")
    eos = _id(config, "eos_token_id", 156892)
    return Adapter("llada2", model, config, llada2_decoder(model, config), 0, _id(config, "mask_token_id", 156895),
                   eos, _id(config, "pad_token_id", eos), getattr(config, "max_position_embeddings", None))


def _llada_moe(model: Any, name: str, config: Any) -> Adapter:
    """LLaDA-MoE (e.g. LLaDA-MoE-7B-A1B): Dream's module names with per-head q/k norms, and a mixture of
    experts in every layer routed by a softmax over all experts (top-k, renormalised only with
    ``norm_topk_prob``); bidirectional attention and unshifted logits, as LLaDA."""
    from .decoder import MoE

    base = _check_tree(model, name, config, _DREAM_CONFIG + ("num_experts_per_tok",), "LLaDA-MoE")
    layers = []
    for i, lyr in enumerate(base.layers):
        att, mlp = getattr(lyr, "self_attn", None), getattr(lyr, "mlp", None)
        absent = [m for m in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(att, m)]
        absent += [m for m in ("gate", "experts") if not hasattr(mlp, m)]
        if absent:
            raise ValueError(f"{name} layer {i} lacks {absent} (the LLaDA-MoE layer)")
        moe = MoE(mlp, mlp.gate, None, mlp.experts, int(config.num_experts_per_tok), "softmax",
                  normalize=bool(getattr(config, "norm_topk_prob", False)))
        shared = getattr(mlp, "shared_experts", None)
        layers.append(Layer(lyr, lyr.input_layernorm, att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                            lyr.post_attention_layernorm, getattr(shared, "gate_proj", None),
                            getattr(shared, "up_proj", None), getattr(shared, "down_proj", None),
                            q_norm=getattr(att, "q_norm", None), k_norm=getattr(att, "k_norm", None), moe=moe))
    head = base.embed_tokens if getattr(config, "tie_word_embeddings", False) else model.lm_head
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    dec = Decoder(base.embed_tokens, layers, base.norm, head, n_heads,
                  getattr(config, "num_key_value_heads", None) or n_heads, head_dim, config.hidden_size,
                  float(getattr(config, "rms_norm_eps", 1e-6)), True, float(config.rope_theta),
                  rotary_dim=int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)))
    eos = _id(config, "eos_token_id", 156892)
    return Adapter("llada_moe", model, config, dec, 0, _id(config, "mask_token_id", 156895), eos,
                   _id(config, "pad_token_id", eos), getattr(config, "max_position_embeddings", None))
