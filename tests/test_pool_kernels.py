"""The engine's kernels against the PyTorch reference: pool attention (packed requests over a slot pool),
rope_qkv writing into per-token cache rows, and decide with per-row params and canvas rows.

Run on the CPU under TRITON_INTERPRET=1 (the README's test command) or on a GPU; fresh random inputs, odd
sizes, fp32/bf16/fp16.
"""

import pytest
import torch

from l2pd_kernels import reference as ref
from tests.conftest import needs_kernels

pytestmark = needs_kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}


def _segments(lengths, rows, k_lens):
    seg, start = [], 0
    for q_len, row, k_len in zip(lengths, rows, k_lens):
        seg.append((start, q_len, row, k_len))
        start += q_len
    return torch.tensor(seg, dtype=torch.int64, device=DEV), start


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H, HKV, D", [(4, 4, 16), (6, 2, 32)])
def test_pool_attention_matches_reference(dtype, H, HKV, D):
    from l2pd_kernels import pool_attention

    R, T = 5, 77
    # odd query lengths (one spans several tiles), rows out of order, a zero-length segment, k_len not a tile
    seg, N = _segments([7, 40, 0, 1, 33], [3, 0, 2, 4, 1], [50, 77, 10, 1, 41])
    q = torch.randn(1, N, H, D, device=DEV).to(dtype).transpose(1, 2)  # the rope kernel's layout
    k = torch.randn(R, HKV, T, D, device=DEV).to(dtype)
    v = torch.randn(R, HKV, T, D, device=DEV).to(dtype)
    got = pool_attention(q, k, v, seg, block_m=16)
    want = ref.pool_attention(q, k, v, seg)
    assert got.shape == (1, H, N, D)
    torch.testing.assert_close(got, want, **TOL[dtype])
    # the output projection reads [1, N, H * D] as a view
    assert got.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gq", [2, 4])
@pytest.mark.parametrize("splits", [1, 3])
def test_pool_attention_takes_a_kv_heads_query_heads_together(dtype, gq, splits):
    """Grouped-query heads in one program (each K/V tile it loads serves them all) give the reference's result
    and, within rounding, the one-head-per-program kernel's; with the keys split too."""
    from l2pd_kernels import pool_attention

    H, HKV, D, R, T = 8, 2, 32, 4, 90
    # odd query lengths (one spans several tiles), rows out of order, one key only, k_len not a tile
    seg, N = _segments([5, 33, 1, 16], [1, 3, 0, 2], [90, 41, 1, 64])
    q = torch.randn(1, N, H, D, device=DEV).to(dtype).transpose(1, 2)
    k = torch.randn(R, HKV, T, D, device=DEV).to(dtype)
    v = torch.randn(R, HKV, T, D, device=DEV).to(dtype)
    kw = dict(block_m=16, block_n=16) | (dict(key_chunk=32, splits=splits) if splits > 1 else {})
    got = pool_attention(q, k, v, seg, heads_per_program=gq, **kw)
    torch.testing.assert_close(got, ref.pool_attention(q, k, v, seg), **TOL[dtype])
    torch.testing.assert_close(got, pool_attention(q, k, v, seg, heads_per_program=1, **kw), **TOL[dtype])
    assert got.transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="heads per program"):
        pool_attention(q, k, v, seg, heads_per_program=8, **kw)  # more than the 4 heads of a K/V head
    with pytest.raises(ValueError, match="heads per program"):
        pool_attention(q, k, v, seg, heads_per_program=3, **kw)


def test_the_heads_a_program_takes(monkeypatch):
    import l2pd_kernels.attention as att

    monkeypatch.setattr(att, "POOL_GQ", 0)
    monkeypatch.setattr(att, "_TILE_M_ENV", 0)
    assert att.pool_tile_m(16, 4) == 32  # LLaDA2.0-mini: 4 heads a K/V head
    assert att.pool_tile_m(32, 32) == att.POOL_TILE_M == 64  # LLaDA-8B
    assert att.pool_tile_m(28, 4) == 64  # Dream-7B: 7 heads a K/V head
    monkeypatch.setattr(att, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert att.pool_tile_m(16, 4, 8, cuda) == 64  # 8 tiles x 16 heads fit on 132 SMs: the keys split
    assert att.pool_tile_m(16, 4, 9, cuda) == 32  # one head per program fills them: 4 heads a program
    assert att.pool_tile_m(32, 32, 64, cuda) == 64
    monkeypatch.setattr(att, "_TILE_M_ENV", 16)  # L2PD_POOL_TILE_M
    assert att.pool_tile_m(16, 4, 8, cuda) == att.pool_tile_m(32, 32) == 16
    monkeypatch.setattr(att, "_TILE_M_ENV", 0)
    assert att.pool_heads_per_program(16, 4, 32) == 4  # LLaDA2.0-mini in its 32-query tiles: 128 rows
    assert att.pool_heads_per_program(16, 4, 32, split=True) == 2  # few programs, keys split: 64 rows
    assert att.pool_heads_per_program(16, 4, 64) == 2
    assert att.pool_heads_per_program(16, 4, 128) == 1
    assert att.pool_heads_per_program(32, 32, 64) == 1  # LLaDA-8B: one head per K/V head
    assert att.pool_heads_per_program(28, 4, 64) == 1  # Dream-7B: 7 heads a K/V head, no power of two divides
    assert att.pool_heads_per_program(12, 2, 16) == 2  # 6 a K/V head: 2 divides, 4 does not
    monkeypatch.setattr(att, "POOL_GQ", 1)  # L2PD_POOL_GQ=1: one head per program
    assert att.pool_heads_per_program(16, 4, 64) == 1
    monkeypatch.setattr(att, "POOL_GQ", 4)
    assert att.pool_heads_per_program(16, 4, 64) == 4
    assert att.pool_heads_per_program(16, 8, 64) == 2  # never more than a K/V head's


def test_pool_attention_keys_past_k_len_are_ignored():
    from l2pd_kernels import pool_attention

    seg, N = _segments([9], [1], [20])
    q = torch.randn(1, 2, N, 16, device=DEV)
    k = torch.randn(2, 2, 40, 16, device=DEV)
    v = torch.randn(2, 2, 40, 16, device=DEV)
    a = pool_attention(q, k, v, seg)
    k[:, :, 20:], v[:, :, 20:] = 1e4, float("nan")  # poison: must never be read
    k[0], v[0] = float("nan"), float("nan")  # another row: never read
    b = pool_attention(q, k, v, seg)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pool_attention_rejects_bad_shapes():
    from l2pd_kernels import pool_attention

    q = torch.randn(1, 4, 5, 16, device=DEV)
    k = torch.randn(2, 3, 8, 16, device=DEV)  # 4 heads over 3 K/V heads
    with pytest.raises(ValueError, match="heads"):
        pool_attention(q, k, k, torch.zeros(1, 4, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="seg"):
        pool_attention(q, k[:, :2], k[:, :2], torch.zeros(1, 3, dtype=torch.int64, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_qkv_rows_match_reference(dtype):
    from l2pd_kernels import rope_qkv

    S, H, HKV, D, R, T = 11, 4, 2, 16, 3, 19
    q = torch.randn(1, S, H, D, device=DEV).to(dtype)
    k = torch.randn(1, S, HKV, D, device=DEV).to(dtype)
    v = torch.randn(1, S, HKV, D, device=DEV).to(dtype)
    ang = torch.rand(1, S, D // 2, device=DEV) * 6
    cos, sin = ang.cos(), ang.sin()
    rows = torch.randint(0, R, (S,), device=DEV)
    slots = torch.randperm(T, device=DEV)[:S]  # distinct slots, so no two tokens write one place
    outs = []
    for fn in (rope_qkv, ref.rope_qkv):
        k_out = torch.full((R, HKV, T, D), 7.0, device=DEV).to(dtype)
        v_out = k_out.clone()
        outs.append((fn(q, k, v, cos, sin, k_out, v_out, slots, rows=rows), k_out, v_out))
    (qk, kk, vk), (qr, kr, vr) = outs
    torch.testing.assert_close(qk, qr, **TOL[dtype])
    torch.testing.assert_close(kk, kr, **TOL[dtype])
    torch.testing.assert_close(vk, vr, rtol=0, atol=0)
    written = torch.zeros(R, T, dtype=torch.bool, device=DEV)
    written[rows, slots] = True
    assert (kk.permute(0, 2, 1, 3)[~written] == 7).all()  # nothing else touched
    with pytest.raises(ValueError, match="rows"):
        rope_qkv(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cos.expand(2, -1, -1),
                 sin.expand(2, -1, -1), k_out, v_out, slots, rows=rows)


@pytest.mark.parametrize("eotp", ["off", "accepted", "predicted"])
@pytest.mark.parametrize("with_filter", [False, True])
def test_decide_per_row_params_match_reference(eotp, with_filter):
    from l2pd_kernels import decide

    MASK, EOS, L, T, R = 9, 8, 7, 40, 6
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    canvas = torch.randint(0, 8, (R, T), device=DEV)
    starts = [3, 12, 20, 5]
    rows = torch.tensor([4, 0, 2, 5], device=DEV)  # the canvas rows decided, out of order; rows 1 and 3 untouched
    for r, s in zip(rows.tolist(), starts):
        canvas[r, s:] = MASK
        canvas[r, s + 2] = 3  # a decided position inside the block
    B = len(starts)
    token = torch.randint(0, 9, (B, L), device=DEV)
    token[1, 4] = EOS
    prob = torch.rand(B, L, device=DEV)
    ks, steps = [1, 2, 0, 3], [0, 1, 2, 3]
    widths = [0, 4, L, 2]  # bits 40-59: a row's block width when shorter than L (0: L)
    params = torch.tensor([[(w << 40) | (s << 20) | k, st] for s, k, st, w in zip(starts, ks, steps, widths)],
                          device=DEV)
    kw = dict(threshold=0.6, mask_id=MASK, eos_id=EOS, eotp=eotp)
    if with_filter:
        H = 5
        kw.update(filter_weights=[(torch.randn(H, L + 1, device=DEV), torch.randn(H, device=DEV)),
                                  (torch.randn(L, H, device=DEV), torch.randn(L, device=DEV))],
                  filter_block=L, filter_inputs=("confidence", "step"))
    a, b = canvas.clone(), canvas.clone()
    got = decide(a, token, prob, block_start=0, k=0, params=params, rows=rows, **kw)
    want = ref.decide(b, token, prob, block_start=0, k=0, params=params, rows=rows, **kw)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the per-row reference is the shared-offset decide applied row by row, on each row's width
    c = canvas.clone()
    for i, (r, s) in enumerate(zip(rows.tolist(), starts)):
        w = widths[i] or L
        ref.decide(c[r : r + 1], token[i : i + 1, :w], prob[i : i + 1, :w], block_start=s, k=ks[i], step=steps[i],
                   **kw)
    torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert torch.equal(a[1], canvas[1]) and torch.equal(a[3], canvas[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, HKV, L, T, D, splits", [
    (2, 4, 4, 5, 77, 16, None),  # the plan's split count; T not a multiple of the key loop
    (3, 6, 2, 33, 130, 32, 3),  # grouped-query heads, L spanning two query tiles, forced splits
    (1, 2, 2, 1, 1, 16, None),  # one query, one key
    (2, 4, 2, 7, 200, 16, 1),  # no split: the one-pass form
])
@pytest.mark.parametrize("limited", [False, True])
def test_cached_attention_matches_reference(dtype, B, H, HKV, L, T, D, splits, limited):
    from l2pd_kernels import cached_attention

    q = torch.randn(B, L, H, D, device=DEV).to(dtype).transpose(1, 2)  # rope_qkv's layout
    k = torch.randn(B, HKV, T, D, device=DEV).to(dtype)
    v = torch.randn(B, HKV, T, D, device=DEV).to(dtype)
    # per-query key counts (a block-causal step's block ends), 1 to T, some past whole chunks of keys
    limit = torch.randint(1, T + 1, (B, L), device=DEV) if limited else None
    got = cached_attention(q, k, v, block_m=16, block_n=16, splits=splits, key_limit=limit)
    torch.testing.assert_close(got, ref.cached_attention(q, k, v, key_limit=limit), **TOL[dtype])
    assert got.shape == (B, H, L, D) and got.transpose(1, 2).is_contiguous()  # o-projection input as a view
    if limited:  # keys past a query's limit are never read: changing them changes nothing
        k2, v2 = k.clone(), v.clone()
        past = torch.arange(T, device=DEV) >= int(limit.max())
        k2[:, :, past], v2[:, :, past] = 1e4, 1e4
        assert torch.equal(cached_attention(q, k2, v2, block_m=16, block_n=16, splits=splits, key_limit=limit), got)


def test_split_plan_fills_the_gpu_in_whole_key_loops():
    from l2pd_kernels.attention import split_plan

    assert split_plan(32, 4096, 132) == (16, 256)  # batch 1, 32 heads: 16 chunks of 256 keys
    assert split_plan(2048, 4096, 132) == (1, 4096)  # a full grid: one pass
    assert split_plan(32, 100, 132) == (2, 64)  # never a chunk shorter than one key loop
    splits, chunk = split_plan(7, 777, 5)
    assert chunk % 64 == 0 and (splits - 1) * chunk < 777 <= splits * chunk


def test_pool_attention_splits_keep_each_segment_on_its_own():
    """With split keys, each segment still matches the reference, and its result (bit for bit) does not
    depend on the other segments: the chunks follow from its own k_len."""
    from l2pd_kernels import pool_attention

    H, D, R, T = 4, 16, 4, 150
    seg, N = _segments([6, 20, 3], [2, 0, 3], [150, 37, 90])
    q = torch.randn(1, N, H, D, device=DEV).transpose(1, 2)
    k, v = torch.randn(2, R, H, T, D, device=DEV).unbind(0)
    got = pool_attention(q, k, v, seg, block_m=16, block_n=16, key_chunk=32, splits=5)
    torch.testing.assert_close(got, ref.pool_attention(q, k, v, seg), rtol=2e-5, atol=2e-5)
    alone = pool_attention(q[:, :, :6], k, v, seg[:1], block_m=16, block_n=16, key_chunk=32, splits=5)
    assert torch.equal(alone, got[:, :, :6])
    with pytest.raises(ValueError, match="key_chunk"):
        pool_attention(q, k, v, seg, block_n=16, key_chunk=40, splits=2)
    # fewer (token, head) pairs per merging program: the same merge, bit for bit
    rows4 = pool_attention(q, k, v, seg, block_m=16, block_n=16, key_chunk=32, splits=5, merge_rows=4)
    assert torch.equal(rows4, got)
    with pytest.raises(ValueError, match="merge_rows"):
        pool_attention(q, k, v, seg, key_chunk=64, splits=2, merge_rows=3)


def test_the_engine_splits_the_keys_only_for_few_programs(monkeypatch):
    import l2pd_kernels.attention as att

    cuda = torch.device("cuda")
    monkeypatch.setattr(att, "sm_count", lambda device: 132)
    monkeypatch.delenv("L2PD_POOL_SPLIT", raising=False)
    monkeypatch.setattr(att, "POOL_SPLITS", 0)
    assert att.pool_split_plan(2, 32, 768, cuda) == (4, 192)  # batch 1 at LLaDA-8B shapes: 64 programs
    assert att.pool_split_plan(2, 32, 4096, cuda) == (4, 1024)
    assert att.pool_split_plan(2, 16, 4096, cuda) == (8, 512)  # LLaDA2.0-mini's 16 heads: 8 chunks
    assert att.pool_split_plan(2, 16, 768, cuda) == (6, 128)  # (8 asked: whole key loops leave 6)
    assert att.pool_split_plan(4, 16, 100, cuda) == (2, 64)  # never a chunk shorter than one key loop
    assert att.pool_split_plan(6, 32, 768, cuda) == (1, 0)  # 192 programs: a full grid in one pass
    assert att.pool_split_plan(2, 32, 64, cuda) == (1, 0)  # one key loop: nothing to split
    assert att.pool_split_plan(1, 80, 4096, cuda) == (1, 0)  # about one program per SM already (132 // 80 = 1)
    assert att.pool_split_plan(2, 32, 768, torch.device("cpu")) == (1, 0)
    monkeypatch.setattr(att, "POOL_GQ", 0)  # grouped-query heads: programs of 2 heads count once
    assert att.pool_split_plan(2, 16, 4096, cuda, kv_heads=4) == (8, 512)
    assert att.pool_split_plan(12, 16, 768, cuda) == (1, 0)  # 192 programs of one head
    assert att.pool_split_plan(12, 16, 768, cuda, kv_heads=4) == (6, 128)  # 96 of two; split: one head each
    # 32-query tiles (the engine's for grouped-query models): 4 heads a program in one pass, 2 with split keys
    assert att.pool_split_plan(64, 16, 768, cuda, kv_heads=4, block_m=32) == (1, 0)  # 256 programs of 4 heads
    assert att.pool_split_plan(2, 16, 4096, cuda, kv_heads=4, block_m=32) == (16, 256)  # 8 groups: 16 chunks
    assert att.pool_split_plan(2, 16, 768, cuda, kv_heads=4, block_m=32) == (12, 64)
    monkeypatch.setattr(att, "POOL_SPLITS", 2)  # L2PD_POOL_SPLITS
    assert att.pool_split_plan(2, 32, 4096, cuda) == (2, 2048)
    monkeypatch.setenv("L2PD_POOL_SPLIT", "0")
    assert att.pool_split_plan(2, 32, 768, cuda) == (1, 0)


def test_cached_step_through_the_split_kernel_matches_sdpa(monkeypatch):
    """A dual-cache step of a small model through the fused forward (the split-key attention, forced: the
    canvas is short) gives the reference forward's logits (SDPA)."""
    import l2pd.models.decoder as decoder
    import l2pd_kernels
    from l2pd.cache import BlockKVCache
    from tests.conftest import tiny_model

    calls = []
    monkeypatch.setattr(decoder, "_split_pays", lambda *a: True)
    kernel = l2pd_kernels.cached_attention
    monkeypatch.setattr(l2pd_kernels, "cached_attention",
                        lambda *a, **kw: calls.append(1) or kernel(*a, block_n=16, **kw))

    model = tiny_model(seed=5, n_kv_heads=2).to(DEV)
    B, T = 2, 41
    ids = torch.randint(0, 60, (B, T), device=DEV)
    logits = []
    for fused in (False, True):
        cache = BlockKVCache.for_model(model.config, B, T, "dual", torch.float32, DEV)
        with torch.no_grad():
            model(ids, cache=cache, start=0, fused=fused)  # the refresh fills the cache
            logits.append(model(ids[:, 16:24], cache=cache, start=16, fused=fused).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * model.config.n_layers  # both forwards (the refresh's 41 queries count as few)


def test_split_pays_only_for_long_canvases_and_small_grids():
    from l2pd_kernels.attention import split_pays

    dev = torch.device("cpu")  # counted as 4 SMs
    assert not split_pays(1, 32, 4, 1024, dev)  # short canvas
    assert split_pays(1, 32, 1, 4096, dev)  # one program per key-less grid: many chunks
    assert not split_pays(8, 32, 32, 4096, dev)  # a full grid
