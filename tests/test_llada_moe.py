"""LLaDA-MoE through the adapter: an object with the official module tree (Dream's names, per-head q/k norms, a
softmax-routed mixture of experts in every layer), its forward never called, against an independent float64
implementation, and decoding on it."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import l2pd
from l2pd.decode import generate
from l2pd.models import adapter_for
from l2pd.models.decoder import RMSNorm

MASK, EOS = 61, 60


class _Expert(nn.Module):
    def __init__(self, d, width):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, width, bias=False), nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)


class OfficialLikeLLaDAMoE(nn.Module):
    def __init__(self, seed=0, layers=2, d=48, heads=4, experts=6, top_k=2, width=16):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(hidden_size=d, num_attention_heads=heads, num_key_value_heads=heads,
                                      num_hidden_layers=layers, rope_theta=10000.0, rms_norm_eps=1e-6,
                                      num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                                      moe_intermediate_size=width, vocab_size=64, intermediate_size=width,
                                      max_position_embeddings=256, mask_token_id=MASK, eos_token_id=EOS,
                                      pad_token_id=EOS, tie_word_embeddings=False)
        hd = d // heads
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(64, d)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            lyr = nn.Module()
            lyr.self_attn = nn.Module()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(lyr.self_attn, n, nn.Linear(d, d, bias=False))
            lyr.self_attn.q_norm, lyr.self_attn.k_norm = RMSNorm(hd, 1e-6), RMSNorm(hd, 1e-6)
            lyr.mlp = nn.Module()
            lyr.mlp.gate = nn.Linear(d, experts, bias=False)
            lyr.mlp.experts = nn.ModuleList(_Expert(d, width) for _ in range(experts))
            lyr.input_layernorm, lyr.post_attention_layernorm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
            self.model.layers.append(lyr)
        self.model.norm = RMSNorm(d, 1e-6)
        self.lm_head = nn.Linear(d, 64, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0, 0.2)

    def forward(self, *a, **k):
        raise AssertionError("l2pd must not call the official forward")


def reference_logits(m, ids):
    c = m.config
    sd = {k: v.double() for k, v in m.state_dict().items()}
    B, S = ids.shape
    H, D = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    pos = torch.arange(S, dtype=torch.float64)
    ang = pos[:, None] * (1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)))
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    def rope(x):
        return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q, k, v = ((h @ sd[p + f"self_attn.{n}.weight"].T).view(B, S, H, D) for n in ("q_proj", "k_proj", "v_proj"))
        q = rope(norm(q, sd[p + "self_attn.q_norm.weight"])).transpose(1, 2)
        k = rope(norm(k, sd[p + "self_attn.k_norm.weight"])).transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(D)).softmax(-1)
        x = x + (att @ v.transpose(1, 2)).transpose(1, 2).reshape(B, S, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        probs = (h @ sd[p + "mlp.gate.weight"].T).softmax(-1)
        w, chosen = probs.topk(c.num_experts_per_tok, -1)  # no renormalisation
        out = torch.zeros_like(x)
        for b in range(B):
            for t in range(S):
                for j in range(c.num_experts_per_tok):
                    e = f"{p}mlp.experts.{int(chosen[b, t, j])}."
                    g, u = h[b, t] @ sd[e + "gate_proj.weight"].T, h[b, t] @ sd[e + "up_proj.weight"].T
                    out[b, t] += w[b, t, j] * ((torch.nn.functional.silu(g) * u) @ sd[e + "down_proj.weight"].T)
        x = x + out
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_logits_match_a_float64_reimplementation_full_and_cached():
    from l2pd.cache import BlockKVCache

    m = OfficialLikeLLaDAMoE(1)
    ad = adapter_for(m)
    assert ad.family == "llada_moe" and ad.shift == 0 and not ad.block_causal
    ids = torch.randint(0, 58, (2, 10))
    want = reference_logits(m, ids)
    torch.testing.assert_close(ad.forward(ids).double(), want, rtol=1e-5, atol=1e-5)
    dec = ad.decoder
    cache = BlockKVCache(len(dec.layers), 2, dec.n_kv, 10, dec.head_dim, "dual")
    ad.forward(ids, cache=cache, start=0)
    torch.testing.assert_close(ad.forward(ids[:, 4:8], cache=cache, start=4).double(), want[:, 4:8], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("strategy", ["steps", "threshold", "learn2pd"])
def test_patch_decodes_and_batch_rows_decode_as_alone(strategy):
    m = l2pd.patch(OfficialLikeLLaDAMoE(2))
    prompts = torch.randint(0, 58, (3, 6))
    kw = dict(max_new_tokens=8, block_length=4, strategy=strategy, threshold=0.3, eotp="accepted", cache="dual",
              refresh="window")
    if strategy == "learn2pd":
        torch.manual_seed(0)
        kw["filter"] = l2pd.Filter(block_length=4, hidden=8)
    both = m.generate(prompts, **kw)
    assert not bool((both[:, 6:] == MASK).any())
    for r in range(3):
        assert torch.equal(both[r], generate(m, prompts[r:r + 1], **kw)[0])
