"""Dream through the model adapters: our Dream against an independent float64 implementation (full and
cached), the official layout, patch on the official module tree, and decoding (every strategy and cache)."""

import math

import pytest
import torch
from torch import nn

import l2pd
from l2pd.decode import generate
from l2pd.models import DreamConfig, DreamModel, adapter_for
from tests.conftest import needs_kernels

MASK, EOS = 61, 60


def tiny_dream(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=64, max_position_embeddings=256, rope_theta=10000.0,
               mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS)
    cfg.update(kw)
    model = DreamModel(DreamConfig(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def reference_logits(model, ids, mask=None):
    """Dream's forward written out in float64: Qwen2 RMSNorm, rotate-half RoPE over positions that skip left
    padding, bidirectional grouped-query attention, SiLU MLP, untied head, logits shifted one to the right."""
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, S = ids.shape
    H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    mask = torch.ones(B, S, dtype=torch.long) if mask is None else mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0).double()
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos[..., None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat([-x[..., h:], x[..., :h]], -1) * sin + x * cos

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        def proj(name, heads, h=h, p=p):
            y = h @ sd[p + f"self_attn.{name}.weight"].T + sd[p + f"self_attn.{name}.bias"]
            return y.view(B, S, heads, D).transpose(1, 2)

        q, k, v = proj("q_proj", H), proj("k_proj", KV), proj("v_proj", KV)
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = att.masked_fill(mask[:, None, None, :] == 0, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, S, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        x = x + o
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        g, u = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    logits = norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
    return torch.cat([logits[:, :1], logits[:, :-1]], 1)


def test_logits_match_a_float64_reimplementation_full_and_cached():
    from l2pd.cache import BlockKVCache

    model = tiny_dream(1)
    ids = torch.randint(0, 58, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    want = reference_logits(model, ids, mask)
    got = model(ids, mask).logits
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # cached: fill the cache with a full forward, then feed the block [6, 11) and the position before it
    ad = adapter_for(model)
    dec = ad.decoder
    cache = BlockKVCache(len(dec.layers), 2, dec.n_kv, 11, dec.head_dim, "dual")
    ad.forward(ids, mask, cache=cache, start=0)
    part = ad.forward(ids[:, 5:11], mask, cache=cache, start=5)  # hidden states 5..10 -> tokens 6..11
    torch.testing.assert_close(part[:, :5].double(), want[:, 6:11], rtol=1e-5, atol=1e-5)


def test_official_layout_round_trip(tmp_path):
    model = tiny_dream(2)
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.1.mlp.down_proj.weight", "model.layers.0.post_attention_layernorm.weight"} <= names
    ids = torch.randint(0, 58, (1, 9))
    for shard in (None, 20_000):
        folder = tmp_path / f"m{shard}"
        model.save_pretrained(folder, max_shard_bytes=shard)
        again = DreamModel.from_pretrained(folder)
        assert again.config.to_dict() == {**model.config.to_dict(), "torch_dtype": "float32"}
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


class OfficialLikeDream(nn.Module):
    """The official remote-code class's module tree (``model.embed_tokens``, ``model.layers``, ``model.norm``,
    ``lm_head``) and config, with a forward that must never be called."""

    def __init__(self, ours):
        super().__init__()
        self.config = ours.config
        self.model, self.lm_head = ours.model, ours.lm_head

    def forward(self, *a, **k):
        raise AssertionError("l2pd must not call the official forward")


def _prompts():
    torch.manual_seed(5)
    lengths = [6, 3, 5]
    P = max(lengths)
    prompts = [torch.randint(0, 58, (n,)) for n in lengths]
    ids = torch.full((3, P), EOS)
    mask = torch.zeros(3, P, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = p
        mask[r, P - len(p):] = 1
    return prompts, ids, mask


@pytest.mark.parametrize("strategy", ["steps", "threshold", "learn2pd"])
@pytest.mark.parametrize("cache,refresh", [("none", "full"), ("prefix", "full"), ("dual", "full"),
                                           ("dual", "window"), ("prefix", "tail")])
def test_patch_on_the_official_tree_and_batch_rows_alone(strategy, cache, refresh):
    ours = tiny_dream(3)
    official = l2pd.patch(OfficialLikeDream(ours))
    prompts, ids, mask = _prompts()
    kw = dict(max_new_tokens=10, block_length=4, strategy=strategy, cache=cache, refresh=refresh, threshold=0.2,
              eotp="accepted", return_dict_in_generate=True)
    if strategy == "learn2pd":
        torch.manual_seed(0)
        kw["filter"] = l2pd.Filter(block_length=4, hidden=8)
    a = generate(ours, ids, mask, **kw)
    b = official.generate(ids, mask, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.nfe, b.nfe)
    P = ids.shape[1]
    assert not bool((a.sequences[:, P:] == MASK).any())
    for r, p in enumerate(prompts):
        alone = generate(ours, p[None], **kw)
        assert torch.equal(a.sequences[r, P:], alone.sequences[0, len(p):]), r


def reference_dream_steps(model, prompt, gen_length, block_length):
    """Dream's low-confidence remasking, one token per step, written plainly: the model's (shifted) logits
    over the whole sequence, the mask id never chosen, the most confident masked position of the block."""
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    P = prompt.shape[1]
    for s in range(P, P + gen_length, block_length):
        e = min(s + block_length, P + gen_length)
        for _ in range(e - s):
            logits = model(x).logits[0].double()
            logits[:, MASK] = float("-inf")
            p = logits.softmax(-1)
            conf, tok = p.max(-1)
            conf[:s] = -1
            conf[e:] = -1
            conf[x[0] != MASK] = -1
            i = int(conf.argmax())
            x[0, i] = tok[i]
    return x


def test_steps_equals_a_plain_reference_loop():
    model = tiny_dream(4)
    prompt = torch.randint(0, 58, (1, 5))
    ours = generate(model, prompt, max_new_tokens=10, block_length=4, strategy="steps")
    assert torch.equal(ours, reference_dream_steps(model, prompt, 10, 4))


def test_dream_collect_and_filter_fingerprint(tmp_path):
    from l2pd.collect import collect
    from l2pd.filter import model_fingerprint

    model = tiny_dream(5)
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(4)]
    info = collect(model, prompts, str(tmp_path / "c"), gen_length=8, block_length=4, batch_size=2, shard_size=4,
                   progress=False)
    assert info["shards_done"] == 1
    assert model_fingerprint(model) != model_fingerprint(tiny_dream(6))


def test_not_a_known_model_is_a_clear_error():
    class Other(nn.Module):
        config = DreamConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=8, vocab_size=16)

    with pytest.raises(ValueError, match="neither model.transformer"):
        l2pd.patch(Other())


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cached_step_reads_the_same_hidden_states_as_the_full_forward(cache):
    """On an unchanged canvas, a cached step (which feeds the position before the block too) gives the
    block the same tokens and confidences as the full forward: the shift is handled alike in both paths."""
    from l2pd.cache import BlockKVCache
    from l2pd_kernels import reference

    model = tiny_dream(7)
    ad = adapter_for(model)
    dec = ad.decoder
    P, G, L = 5, 12, 4
    T, s = P + G, P + L
    canvas = torch.cat([torch.randint(0, 58, (2, P + L)), torch.full((2, G - L), MASK)], 1)  # a finished block
    kv = BlockKVCache(len(dec.layers), 2, dec.n_kv, T, dec.head_dim, cache, torch.float32, "cpu")

    def step(lo, hi):
        # the block's logits come from the hidden states one to the left: the fed range starts one earlier
        lo = lo - ad.shift if lo > 0 else lo
        idx = torch.arange(lo, hi)
        logits = ad.forward(canvas[:, lo:hi], None, cache=kv, position_ids=idx.repeat(2, 1), slots=idx,
                            logits_index=s - ad.shift - lo + torch.arange(L))
        return reference.confidence(logits, 0.0, None, suppress=MASK)

    tok_full, prob_full = step(0, T)  # the full forward writes every slot
    tok_cached, prob_cached = step(*kv.feed_range(s, s + L))
    assert torch.equal(tok_full, tok_cached)
    torch.testing.assert_close(prob_cached, prob_full, rtol=1e-5, atol=1e-6)
    want = reference_logits(model, canvas)[:, s : s + L]
    want[..., MASK] = float("-inf")
    assert torch.equal(tok_full, want.argmax(-1))


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_kernels)])
@pytest.mark.parametrize("kind", ["native", "fp8", "w8a8"])
def test_biased_qkv_packs_with_its_biases(kind, fused):
    """Dream's q/k/v carry biases: they pack with the weights (one product, the packed biases added after) and
    give the logits of the separate products, with the reference ops and the kernels; a bias no longer a view
    of the packed buffer unpacks the group, and ``unpack_layers`` gives every bias its own storage again."""
    from l2pd.models.decoder import _packed, _packed_bias, decoder_forward, pack_layers, unpack_layers

    dev = "cuda" if fused and torch.cuda.is_available() else "cpu"  # (the kernels on a GPU, else interpreted)
    model = tiny_dream(seed=4).to(dev)
    if kind != "native":
        l2pd.quantize(model, kind)
    dec = adapter_for(model).decoder
    blk = dec.layers[0]
    mods = [blk.q, blk.k, blk.v]
    ids = torch.randint(0, 58, (1, 10), device=dev)
    separate = decoder_forward(dec, ids, fused=fused)
    assert pack_layers(dec.layers, cpu=True)
    bias = _packed_bias(blk.owner, "_l2pd_qkv", mods)
    assert _packed(blk.owner, "_l2pd_qkv", mods) is not None
    assert torch.equal(bias, torch.cat([m.bias for m in mods])) and blk.k.bias.data_ptr() != bias.data_ptr()
    tol = dict(rtol=1e-5, atol=1e-5) if not fused else dict(rtol=2e-3, atol=2e-3)  # (the kernels' sum order)
    torch.testing.assert_close(decoder_forward(dec, ids, fused=fused), separate, **tol)
    blk.v.bias.data = blk.v.bias.clone()  # no longer a view: the group runs apart
    assert _packed(blk.owner, "_l2pd_qkv", mods) is None
    torch.testing.assert_close(decoder_forward(dec, ids, fused=fused), separate, **tol)
    unpack_layers(dec.layers)
    assert "_l2pd_qkv_bias" not in vars(blk.owner)
    other = dec.layers[1]
    assert other.q.bias.untyped_storage().data_ptr() != other.k.bias.untyped_storage().data_ptr()
