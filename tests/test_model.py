import math

import pytest
import torch

from l2pd import BlockKVCache, LLaDAModelLM
from l2pd.models.decoder import positions_from_mask
from tests.conftest import tiny_model


def plain_llada(model, ids, positions, key_mask, stale=None, kv_out=None):
    """An independent reimplementation of the official LLaDA block math, written out in full.

    ``stale=(kvs, fresh)``: at every layer, key/value positions where ``fresh`` [T] is False take the K/V in
    ``kvs`` (what a cache built on an earlier canvas holds). ``kv_out``: a list that receives each layer's K/V.
    """
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    p = "model.transformer."
    H, Hk, D = c.n_heads, c.n_kv_heads, c.d_model // c.n_heads

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    inv = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = positions.double()[..., None] * inv  # [B, S, D/2]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [B, S, h, D], rotate-half
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        cs, sn = cos[:, :, None], sin[:, :, None]
        return torch.cat([x1 * cs - x2 * sn, x2 * cs + x1 * sn], -1)

    x = sd[p + "wte.weight"][ids]
    B, S, _ = x.shape
    for i in range(c.n_layers):
        b = f"{p}blocks.{i}."
        h = norm(x, sd[b + "attn_norm.weight"])
        q = rope((h @ sd[b + "q_proj.weight"].T).view(B, S, H, D))
        k = rope((h @ sd[b + "k_proj.weight"].T).view(B, S, Hk, D)).repeat_interleave(H // Hk, 2)
        v = (h @ sd[b + "v_proj.weight"].T).view(B, S, Hk, D).repeat_interleave(H // Hk, 2)
        if stale is not None:
            fresh = stale[1][None, :, None, None]
            k, v = torch.where(fresh, k, stale[0][i][0]), torch.where(fresh, v, stale[0][i][1])
        if kv_out is not None:
            kv_out.append((k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, -1)
        x = x + att @ sd[b + "attn_out.weight"].T
        h = norm(x, sd[b + "ff_norm.weight"])
        gate = h @ sd[b + "ff_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ sd[b + "up_proj.weight"].T)) @ sd[b + "ff_out.weight"].T
    return norm(x, sd[p + "ln_f.weight"]) @ sd[p + "ff_out.weight"].T


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_full_forward_matches_plain(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 60, (2, 13))
    pos = torch.arange(13).expand(2, 13)
    ref = plain_llada(model, ids, pos, torch.ones(2, 13, dtype=torch.bool))
    out = model(ids).logits
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_left_padded_forward_matches_plain(model):
    ids = torch.randint(0, 60, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    ids[1, :4] = 60
    ref = plain_llada(model, ids, positions_from_mask(mask), mask.bool())
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0].double(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:].double(), ref[1, 4:], atol=1e-5, rtol=1e-5)
    # the padded row equals the same prompt alone, unpadded
    alone = model(ids[1:, 4:]).logits
    torch.testing.assert_close(out[1:, 4:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_forward_matches_plain(model, mode):
    T, s, e = 20, 8, 12
    full_pos, all_keys = torch.arange(T).expand(2, T), torch.ones(2, T, dtype=torch.bool)
    ids = torch.randint(0, 60, (2, T))
    cache = BlockKVCache.for_model(model.config, 2, T, mode, torch.float32, "cpu")
    full = model(ids, cache=cache).logits  # refresh: fills every slot
    old_kv = []
    ref = plain_llada(model, ids, full_pos, all_keys, kv_out=old_kv)
    torch.testing.assert_close(full.double(), ref, atol=1e-5, rtol=1e-5)

    # a step on the canvas the cache was built from equals a full recompute
    lo, hi = cache.feed_range(s, e)
    assert (lo, hi) == ((s, T) if mode == "prefix" else (s, e))
    same = model(ids[:, lo:hi], cache=cache, start=lo, logits_slice=(s - lo, e - lo)).logits
    torch.testing.assert_close(same.double(), ref[:, s:e], atol=1e-5, rtol=1e-5)

    # after the block changed: fed positions are fresh, the others keep the refresh's K/V
    ids2 = ids.clone()
    ids2[:, s:e] = torch.randint(0, 60, (2, e - s))
    out = model(ids2[:, lo:hi], cache=cache, start=lo, logits_slice=(s - lo, e - lo)).logits
    fresh = torch.zeros(T, dtype=torch.bool)
    fresh[lo:hi] = True
    expect = plain_llada(model, ids2, full_pos, all_keys, stale=(old_kv, fresh))[:, s:e]
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)


def test_dual_cache_equals_prefix_when_suffix_unchanged(model):
    T, s, e = 16, 4, 8
    ids = torch.randint(0, 60, (1, T))
    outs = []
    for mode in ("prefix", "dual"):
        cache = BlockKVCache.for_model(model.config, 1, T, mode, torch.float32, "cpu")
        model(ids, cache=cache)
        lo, hi = cache.feed_range(s, e)
        outs.append(model(ids[:, lo:hi], cache=cache, start=lo, logits_slice=(s - lo, e - lo)).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_bit_identical(tmp_path, model):
    model.save_pretrained(tmp_path / "one")
    again = LLaDAModelLM.from_pretrained(tmp_path / "one")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2)
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = LLaDAModelLM.from_pretrained(tmp_path / "sharded")
    for p1, p2 in zip(model.state_dict().values(), sharded.state_dict().values()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load_and_forward(tmp_path, model, dtype):
    model.save_pretrained(tmp_path)
    low = LLaDAModelLM.from_pretrained(tmp_path, torch_dtype=dtype)
    assert low.dtype == dtype
    ids = torch.randint(0, 60, (1, 9))
    out = low(ids).logits
    ref = model(ids).logits
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_official_parameter_names(model):
    names = set(model.state_dict())
    for n in ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]:
        assert n in names
    for leaf in ["attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]:
        assert f"model.transformer.blocks.1.{leaf}.weight" in names
    assert len(names) == 3 + 9 * model.config.n_layers


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLaDAModelLM.from_pretrained(tmp_path)
