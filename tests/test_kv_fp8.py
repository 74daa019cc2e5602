"""An e4m3 K/V cache: the per-head quantization's error bound, the kernels that write it (``rope_qkv``,
``linear_rope_qkv``) and read it (``pool_attention``, ``cached_attention``) against their references (odd sizes,
partial RoPE, per-head norms, key splits; on the CPU under TRITON_INTERPRET=1), and a model decoding with it
through the engine."""

import pytest
import torch

import l2pd
from l2pd_kernels import reference as ref
from tests.conftest import MASK, needs_kernels, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn


def _e4m3_cache(R, HKV, T, D, seed=0):
    """A random e4m3 cache and its scales (``quantize_kv`` of normal K/V scaled per head), and the values it
    stands for in fp32."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, R, HKV, T, D, generator=g) * (torch.rand(2, R, HKV, T, 1, generator=g) + 0.25)
    q8, scale = ref.quantize_kv(kv)
    return q8.to(DEV), scale.to(DEV), ref.dequantize_kv(q8, scale, torch.float32).to(DEV)


def test_quantize_kv_error_is_within_half_an_e4m3_step():
    x = torch.randn(3, 5, 37, 64) * torch.logspace(-3, 3, 37)[None, None, :, None]
    x[0, 0, 0] = 0  # an all-zero head: scale 1, values 0
    q8, scale = ref.quantize_kv(x)
    assert q8.dtype == E4M3 and q8.shape == x.shape and scale.shape == x.shape[:-1]
    assert float(scale[0, 0, 0]) == 1.0 and not q8[0, 0, 0].float().any()
    back = ref.dequantize_kv(q8, scale, torch.float32)
    # half a step: 2^-4 of the value for normal e4m3 values, 2^-10 of the scale below them (subnormals)
    bound = torch.maximum(x.abs() * 2.0**-4, scale[..., None] * 2.0**-10) * (1 + 1e-6)
    assert bool(((back - x).abs() <= bound).all())
    torch.testing.assert_close(back.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)  # the largest: 448


def _same_cache(got, want, got_scale, want_scale, dtype):
    """Two e4m3 caches hold the same values: from fp32 inputs the same bytes but at a few places one e4m3 step
    apart (the fp32 values they rounded differ in a last bit); from bf16 ones (whose per-head norms round
    apart, as in a bf16 cache) within a step of each value plus a bf16 step of the head's largest."""
    if dtype == torch.float32:
        a, b = got.view(torch.uint8).to(torch.int16), want.view(torch.uint8).to(torch.int16)
        off = a != b
        assert float(off.float().mean()) <= 0.01 and bool(((a - b).abs()[off] <= 1).all())
        return
    g, w = ref.dequantize_kv(got, got_scale, torch.float32), ref.dequantize_kv(want, want_scale, torch.float32)
    bound = w.abs() * 2.0**-3 + (want_scale.abs() * 448 * 2.0**-6)[..., None]  # (unwritten slots: -1)
    assert bool(((g - w).abs() <= bound).all())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, partial, norm", [(True, False, False), (False, True, True)])
def test_rope_qkv_writes_an_e4m3_cache_as_the_reference(dtype, rows, partial, norm):
    from l2pd_kernels import rope_qkv

    B, S, H, HKV, D, R, T = (1, 11, 4, 2, 32, 3, 19) if rows else (2, 5, 6, 3, 32, 2, 9)
    q = torch.randn(B, S, H, D, device=DEV).to(dtype)
    k = (torch.randn(B, S, HKV, D, device=DEV) * 5).to(dtype)
    v = torch.randn(B, S, HKV, D, device=DEV).to(dtype)
    half = D // 4 if partial else D // 2
    ang = torch.rand(B, S, half, device=DEV) * 6
    cos, sin = ang.cos(), ang.sin()
    kw = {"rows": torch.randint(0, R, (S,), device=DEV)} if rows else {}
    slots = torch.randperm(T, device=DEV)[:S]
    if norm:
        kw |= {"q_norm": torch.rand(D, device=DEV).to(dtype) + 0.5, "k_norm": torch.rand(D, device=DEV).to(dtype) + 0.5}
    outs = []
    for fn in (rope_qkv, ref.rope_qkv):
        caches = [torch.zeros(R if rows else B, HKV, T, D, device=DEV, dtype=E4M3) for _ in range(2)]
        scales = [torch.full((R if rows else B, HKV, T), -1.0, device=DEV) for _ in range(2)]
        qo = fn(q, k, v, cos, sin, *caches, slots, **kw, k_scale=scales[0], v_scale=scales[1])
        outs.append((qo, caches, scales))
    (qk, ck, sk), (qr, cr, sr) = outs
    torch.testing.assert_close(qk, qr, rtol=2e-2, atol=4e-2)  # (bf16: normed values a step or two apart)
    for got, want, got_scale, want_scale in zip(ck, cr, sk, sr):
        _same_cache(got, want, got_scale, want_scale, dtype)
        torch.testing.assert_close(got_scale, want_scale, **({"rtol": 1e-6, "atol": 0} if dtype == torch.float32
                                                             else {"rtol": 2e-2, "atol": 0}))
    written = (sk[0] != -1).any(1)  # [rows, T]: only the fed slots (distinct ones)
    assert int(written.sum()) == (S if rows else B * S)
    with pytest.raises(ValueError, match="e4m3"):
        rope_qkv(q, k, v, cos, sin, *ck, slots, **kw)  # an e4m3 cache without its scales
    with pytest.raises(ValueError, match="k_scale"):
        rope_qkv(q, k, v, cos, sin, *ck, slots, **kw, k_scale=sk[0][..., :-1], v_scale=sk[1][..., :-1])


@needs_kernels
@pytest.mark.parametrize("a8", [False, True])
def test_linear_rope_qkv_writes_an_e4m3_cache_as_its_two_launches(a8, monkeypatch):
    """The fused product + RoPE writes the e4m3 cache that ``rope_qkv`` writes from the product's output (one
    tile shape and no K split in both, so the products' sums run in one order)."""
    from l2pd_kernels import linear_fp8, linear_rope_qkv, linear_w8a8, rope_qkv, skinny

    B, S, H, HKV, D, K, T = 1, 3, 4, 2, 32, 48, 7
    monkeypatch.setattr(skinny, "pick_config_fp8", lambda *a, **k: (D, 32, 4, 2))
    monkeypatch.setattr(skinny, "SPLIT_K", 1)
    x = torch.randn(B, S, K, device=DEV).to(torch.bfloat16)
    w8, scale = ref.quantize_fp8(torch.randn((H + 2 * HKV) * D, K))
    w8, scale = w8.to(DEV), scale.to(DEV)
    ang = torch.rand(B, S, D // 2, device=DEV) * 6
    cos, sin = ang.cos(), ang.sin()
    slots = torch.tensor([4, 0, 6], device=DEV)
    outs = []
    for fused in (True, False):
        caches = [torch.zeros(B, HKV, T, D, device=DEV, dtype=E4M3) for _ in range(2)]
        scales = [torch.ones(B, HKV, T, device=DEV) for _ in range(2)]
        kv = dict(k_scale=scales[0], v_scale=scales[1])
        if fused:
            q = linear_rope_qkv(x, w8, H, HKV, cos, sin, *caches, slots, scale=scale, a8=a8, **kv)
        else:
            y = (linear_w8a8 if a8 else linear_fp8)(x.view(S, K), w8, scale)
            qq, kk, vv = y.view(B, S, -1).split([H * D, HKV * D, HKV * D], -1)
            q = rope_qkv(qq.view(B, S, H, D), kk.view(B, S, HKV, D), vv.view(B, S, HKV, D), cos, sin, *caches,
                         slots, **kv)
        outs.append((q, caches, scales))
    (qf, cf, sf), (qu, cu, su) = outs
    torch.testing.assert_close(qf, qu, rtol=0, atol=0)
    for got, want in zip(cf + sf, cu + su):
        assert torch.equal(got.view(torch.uint8) if got.dtype == E4M3 else got,
                           want.view(torch.uint8) if want.dtype == E4M3 else want)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gq, splits", [(1, 1), (2, 3)])
def test_pool_attention_reads_an_e4m3_cache_as_the_reference(dtype, gq, splits):
    from l2pd_kernels import pool_attention

    H, HKV, D, R, T = 4, 2, 32, 4, 90
    seg = torch.tensor([(0, 5, 1, 90), (5, 33, 3, 41), (38, 1, 0, 1), (39, 16, 2, 64)], dtype=torch.int64,
                       device=DEV)
    N = 55
    q = torch.randn(1, N, H, D, device=DEV).to(dtype).transpose(1, 2)
    q8, scale, values = _e4m3_cache(R, HKV, T, D)
    kw = dict(block_m=16, block_n=16) | (dict(key_chunk=32, splits=splits) if splits > 1 else {})
    got = pool_attention(q, q8[0], q8[1], seg, heads_per_program=gq, k_scale=scale[0], v_scale=scale[1], **kw)
    want = ref.pool_attention(q, q8[0], q8[1], seg, k_scale=scale[0], v_scale=scale[1])
    # (fp32: the GPU's exp2 is approximate, a few units in the last place of each weight)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    # the reference is attention over the values the cache stands for
    torch.testing.assert_close(want.float(), ref.pool_attention(q.float(), values[0], values[1], seg), **tol)
    with pytest.raises(ValueError, match="e4m3"):
        pool_attention(q, q8[0], q8[1], seg, **kw)


@needs_kernels
@pytest.mark.parametrize("limited", [False, True])
def test_cached_attention_reads_an_e4m3_cache_as_the_reference(limited):
    from l2pd_kernels import cached_attention

    B, H, HKV, L, T, D = 2, 4, 4, 5, 70, 16
    q = torch.randn(B, L, H, D, device=DEV).to(torch.bfloat16).transpose(1, 2)
    q8, scale, _ = _e4m3_cache(B, HKV, T, D, seed=3)
    lim = torch.randint(1, T + 1, (B, L), device=DEV) if limited else None
    got = cached_attention(q, q8[0], q8[1], splits=3, key_limit=lim, k_scale=scale[0], v_scale=scale[1])
    want = ref.cached_attention(q, q8[0], q8[1], key_limit=lim, k_scale=scale[0], v_scale=scale[1])
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@torch.no_grad()
def test_a_model_decodes_with_an_e4m3_cache_close_to_its_own():
    """``quantize(model, kv_cache="fp8")``: the engine keeps an e4m3 cache; a cached forward's logits stay
    close to those over the model's own cache, and generate decodes with it."""
    from l2pd.cache import BlockKVCache

    model = l2pd.patch(tiny_model(seed=4))
    ids = torch.randint(0, 58, (2, 12))
    logits = {}
    for dtype in (torch.float32, E4M3):
        dec = l2pd.models.adapter_for(model).decoder
        cache = BlockKVCache(len(dec.layers), 2, dec.n_kv, 12, dec.head_dim, "dual", dtype)
        model(ids, cache=cache)  # the first forward writes every slot
        assert (cache.k_scale is not None) == (dtype == E4M3)
        logits[dtype] = model(ids[:, 4:8], cache=cache, start=4).logits  # a step over the cached K/V
    rel = float((logits[E4M3] - logits[torch.float32]).norm() / logits[torch.float32].norm())
    assert 0 < rel < 0.05, rel
    l2pd.quantize(model, "native", kv_cache="fp8")
    out = model.generate(ids[:, :9], max_new_tokens=16, block_length=8, eotp="accepted")
    assert not bool((out[:, 9:] == MASK).any())
    engine = model._l2pd_engine[1]
    assert engine.kv.k.dtype == E4M3 and engine.kv.k_scale is not None
    l2pd.quantize(model, "native", kv_cache="native")
    assert "_l2pd_engine" not in vars(model)  # the engine with the e4m3 cache went
    with pytest.raises(ValueError, match="kv_cache"):
        l2pd.quantize(model, "native", kv_cache="int8")


def test_the_attention_launch_over_an_e4m3_cache(monkeypatch):
    """Over an e4m3 cache the engine's split keys go in loops of 128 (the split planned in those loops); one pass
    and a bf16 cache keep their launch."""
    import l2pd_kernels
    import l2pd_kernels.attention as att
    from l2pd.models import decoder
    from l2pd.models.decoder import Pack

    cuda = torch.device("cuda")
    monkeypatch.setattr(att, "sm_count", lambda device: 132)
    monkeypatch.setattr(att, "POOL_SPLITS", 0)
    monkeypatch.delenv("L2PD_POOL_SPLIT", raising=False)
    one = torch.zeros(1, 2, dtype=torch.int64)

    def split(tiles, kv8):
        pack = Pack(slots=one, rows=one, seg=one, tiles=one.expand(tiles, 2), plan_tiles=tiles, tile_m=64)
        return decoder._pool_split(l2pd_kernels, pack, 32, 32, 768, cuda, kv8)

    assert split(2, True) == {"block_m": 64, "heads_per_program": 1, "block_n": 128, "splits": 3, "key_chunk": 256,
                              "merge_rows": att.POOL_MERGE_ROWS}
    assert split(2, False) == {"block_m": 64, "heads_per_program": 1, "splits": 4, "key_chunk": 192,
                               "merge_rows": att.POOL_MERGE_ROWS}
    assert split(128, True) == split(128, False) == {"block_m": 64, "heads_per_program": 1}
