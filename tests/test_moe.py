"""The mixture-of-experts ops: the router against a plain loop, the fused Triton experts against the reference.

Fresh random inputs, odd sizes, fp32/bf16/fp16, experts with no tokens, every token on one expert. The kernel
runs on the CPU under TRITON_INTERPRET=1 or on a GPU.
"""

import pytest
import torch

from l2pd_kernels import reference as ref
from tests.conftest import needs_kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _route_loop(logits, top_k, bias, n_group, topk_group, scale):
    """LLaDA 2.x's router spelled out one token at a time."""
    ids, weights = [], []
    for row in logits.float():
        s = torch.sigmoid(row)
        b = s + bias
        per = len(row) // n_group
        best2 = [float(b[g * per:(g + 1) * per].sort(descending=True).values[:2].sum()) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -best2[g])
        allowed = [e for g in groups[:topk_group] for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: -float(b[e]))[:top_k]
        w = s[chosen]
        ids.append(chosen)
        weights.append(w / (w.sum() + 1e-20) * scale)
    return torch.tensor(ids), torch.stack(weights)


@pytest.mark.parametrize("n,e,groups,keep,k", [(5, 16, 4, 2, 3), (9, 24, 8, 4, 8), (3, 8, 1, 1, 2)])
def test_sigmoid_group_router_matches_a_plain_loop(n, e, groups, keep, k):
    logits = torch.randn(n, e) * 2
    bias = torch.randn(e) * 0.1
    ids, w = ref.moe_route(logits, k, "sigmoid", bias, groups, keep, 2.5)
    ids_loop, w_loop = _route_loop(logits, k, bias, groups, keep, 2.5)
    assert torch.equal(ids.sort(-1).values, ids_loop.sort(-1).values)
    order, order_loop = ids.argsort(-1), ids_loop.argsort(-1)
    torch.testing.assert_close(w.gather(1, order), w_loop.gather(1, order_loop))
    assert ids.dtype == torch.int64 and w.dtype == torch.float32


def test_softmax_router_keeps_unnormalised_probabilities():
    logits = torch.randn(4, 10)
    ids, w = ref.moe_route(logits, 3, "softmax", normalize=False)
    p = logits.softmax(-1)
    torch.testing.assert_close(w, p.gather(1, ids))
    assert float(w.sum(-1).max()) < 1
    with pytest.raises(ValueError, match="groups"):
        ref.moe_route(logits, 3, "sigmoid", n_group=3, topk_group=1)


def _experts(e, d, inter, dtype):
    w13 = (torch.randn(e, 2 * inter, d, device=DEV) / d**0.5).to(dtype)
    w2 = (torch.randn(e, d, inter, device=DEV) / inter**0.5).to(dtype)
    return w13, w2


def test_reference_matches_separate_expert_layers():
    x = torch.randn(6, 20)
    w13, w2 = _experts(5, 20, 12, torch.float32)
    w13, w2 = w13.cpu(), w2.cpu()
    ids, w = ref.moe_route(torch.randn(6, 5), 2, "softmax")
    out = ref.fused_moe(x, w13, w2, ids, w)
    for t in range(6):
        want = sum(float(w[t, j]) * (torch.nn.functional.silu(x[t] @ w13[e, :12].T) * (x[t] @ w13[e, 12:].T)) @ w2[e].T
                   for j, e in enumerate(ids[t].tolist()))
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,inter,e,k", [(1, 32, 16, 4, 2), (7, 45, 23, 9, 3), (33, 64, 40, 16, 4)])
def test_fused_moe_matches_reference(dtype, n, d, inter, e, k):
    from l2pd_kernels import fused_moe

    x = torch.randn(n, d, device=DEV).to(dtype)
    w13, w2 = _experts(e, d, inter, dtype)
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "sigmoid", torch.zeros(e, device=DEV), 1, 1, 2.5)
    want = ref.fused_moe(x, w13, w2, ids, w)
    for scan in (False, True):  # sorted pairs, and each expert scanning the ids for its own
        torch.testing.assert_close(fused_moe(x, w13, w2, ids, w, scan=scan), want, **TOL[dtype])
    shared = torch.randn(n, d, device=DEV).to(dtype)  # a shared expert's output, added in the combine
    got = fused_moe(x, w13, w2, ids, w, shared=shared)
    want = ref.fused_moe(x, w13, w2, ids, w, shared=shared)
    tol = dict(TOL[dtype])
    if dtype != torch.float32:  # two roundings (the routed sum, then the sum with shared): a few ulps of the largest
        tol["atol"] = max(tol["atol"], float(want.abs().max()) / 64)
    torch.testing.assert_close(got, want, **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,inter,e,k", [(1, 32, 16, 4, 2), (7, 45, 23, 9, 3), (70, 40, 24, 6, 2)])
def test_fused_moe_runs_the_shared_expert_as_the_reference(dtype, n, d, inter, e, k):
    """``shared_weights``: the shared expert (of the routed experts' width) run by the same kernels over every
    token, a block of tokens per program (70 tokens: more than one block), in the scan and in the sorted path."""
    from l2pd_kernels import fused_moe

    x = torch.randn(n, d, device=DEV).to(dtype)
    w13, w2 = _experts(e, d, inter, dtype)
    s13, s2 = (w[0] for w in _experts(1, d, inter, dtype))
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "sigmoid", torch.zeros(e, device=DEV), 1, 1, 2.5)
    want = ref.fused_moe(x, w13, w2, ids, w, shared_weights=(s13, s2))
    # the reference's shared expert is the gated MLP of those weights, its output added as ``shared`` is
    assert torch.equal(want, ref.fused_moe(x, w13, w2, ids, w, shared=ref.linear(ref.linear_gate_up_silu(x, s13), s2)))
    tol = dict(TOL[dtype])
    if dtype != torch.float32:  # two roundings (the routed sum, then the sum with shared): a few ulps of the largest
        tol["atol"] = max(tol["atol"], float(want.abs().max()) / 64)
    for scan in (False, True):
        torch.testing.assert_close(fused_moe(x, w13, w2, ids, w, scan=scan, shared_weights=(s13, s2)), want, **tol)
    with pytest.raises(ValueError, match="shared_weights"):
        fused_moe(x, w13, w2, ids, w, shared_weights=(s13[:, :-1], s2))
    with pytest.raises(ValueError, match="shared_weights"):
        fused_moe(x, w13, w2, ids, w, shared=x, shared_weights=(s13, s2))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", ["none", "output", "weights"])
@pytest.mark.parametrize("n,d,inter,e,k", [(1, 32, 16, 4, 2), (7, 45, 23, 9, 3), (70, 40, 24, 6, 2)])
def test_expert_rows_combine_later_as_in_the_kernel(dtype, shared, n, d, inter, e, k):
    """``fused_moe(..., combine=False)`` leaves each pair's row for a later combine: ``moe_combine`` and the
    reference's give ``fused_moe``'s output bit for bit, and ``rms_norm`` taking the rows as its ``delta``
    combines them in its own pass: its sum x + delta bit for bit, its normed rows as the norm of the combined
    delta (the sum of squares may round differently on a GPU, where that form runs without fp fusion)."""
    from l2pd_kernels import fused_moe, moe_combine, rms_norm

    x = torch.randn(n, d, device=DEV).to(dtype)
    w13, w2 = _experts(e, d, inter, dtype)
    s13, s2 = (w[0] for w in _experts(1, d, inter, dtype))
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "sigmoid", torch.zeros(e, device=DEV), 1, 1, 2.5)
    kw = {"none": {}, "output": {"shared": torch.randn(n, d, device=DEV).to(dtype)},
          "weights": {"shared_weights": (s13, s2)}}[shared]
    for scan in (False, True):
        want = fused_moe(x, w13, w2, ids, w, scan=scan, **kw)
        rows = fused_moe(x, w13, w2, ids, w, scan=scan, combine=False, **kw)
        assert isinstance(rows, ref.ExpertRows) and rows.shape == (n, d)
        assert torch.equal(moe_combine(rows), want)
        # the reference's rounding to the rows' dtype is the GPU kernel's (the interpreter may round otherwise)
        def near(t):  # a few ulps of the largest value (two roundings: the routed sum, then with the shared one)
            return dict(rtol=0, atol=0) if DEV == "cuda" else dict(
                TOL[dtype], atol=max(TOL[dtype]["atol"], float(t.abs().max()) / 64))

        torch.testing.assert_close(ref.moe_combine(rows), want, **near(want))
        resid = torch.randn(n, d, device=DEV).to(dtype)
        norm_w = (1 + 0.1 * torch.randn(d, device=DEV)).to(dtype)
        h, total = rms_norm(resid, norm_w, 1e-6, delta=rows)
        h_want, total_want = rms_norm(resid, norm_w, 1e-6, delta=want)
        assert torch.equal(total, total_want)
        if DEV == "cpu":
            assert torch.equal(h, h_want)
        else:  # one ulp of the normed value at most
            torch.testing.assert_close(h, h_want, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=0)
        h_ref, total_ref = ref.rms_norm(resid, norm_w, 1e-6, delta=rows)
        torch.testing.assert_close(total_ref, total_want, **near(total_want))
        torch.testing.assert_close(h, h_ref, **TOL[dtype])


@needs_kernels
def test_expert_rows_are_checked():
    from l2pd_kernels import fused_moe, moe_combine, rms_norm

    x = torch.randn(5, 32, device=DEV)
    w13, w2 = _experts(4, 32, 16, torch.float32)
    ids, w = ref.moe_route(torch.randn(5, 4, device=DEV), 2, "sigmoid", torch.zeros(4, device=DEV), 1, 1, 2.5)
    rows = fused_moe(x, w13, w2, ids, w, combine=False)
    with pytest.raises(ValueError, match="do not match"):
        rms_norm(torch.randn(6, 32, device=DEV), None, 1e-6, delta=rows)
    with pytest.raises(ValueError, match="do not match"):
        rms_norm(x.to(torch.bfloat16), None, 1e-6, delta=rows)
    with pytest.raises(ValueError, match="fp32 weights"):
        moe_combine(ref.ExpertRows(rows.rows, rows.weights.half(), None))
    with pytest.raises(ValueError, match="shared"):
        moe_combine(ref.ExpertRows(rows.rows, rows.weights, torch.zeros(4, 32, device=DEV)))
    with pytest.raises(TypeError, match="ExpertRows"):
        moe_combine(rows.rows)
    empty = fused_moe(x[:0], w13, w2, ids[:0], w[:0], combine=False)
    assert moe_combine(empty).shape == (0, 32)


@needs_kernels
@pytest.mark.parametrize("programs", [1, 3, 64])
def test_fused_moe_scan_programs_take_several_experts_each(monkeypatch, programs):
    """The scan path's programs per column tile (about four per SM in all on a GPU) can be fewer than the
    experts touched: program p takes touched experts p, p + programs, ...; with the shared expert's programs
    after them."""
    from l2pd_kernels import fused_moe, moe

    monkeypatch.setattr(moe, "scan_programs", lambda *a: programs)
    n, d, inter, e, k = 40, 32, 24, 200, 6
    x = torch.randn(n, d, device=DEV)
    w13, w2 = _experts(e, d, inter, torch.float32)
    s13, s2 = (w[0] for w in _experts(1, d, inter, torch.float32))
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "softmax")
    assert programs < ids.unique().numel() < e
    torch.testing.assert_close(fused_moe(x, w13, w2, ids, w, scan=True, shared_weights=(s13, s2)),
                               ref.fused_moe(x, w13, w2, ids, w, shared_weights=(s13, s2)), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_fused_moe_with_idle_experts_and_every_token_on_one_expert():
    from l2pd_kernels import fused_moe

    n, d, inter, e = 21, 40, 24, 12
    x = torch.randn(n, d, device=DEV)
    w13, w2 = _experts(e, d, inter, torch.float32)
    ids = torch.full((n, 1), 7, device=DEV, dtype=torch.int64)  # one expert takes every token, the rest none
    w = torch.rand(n, 1, device=DEV)
    for scan in (False, True):  # 21 pairs of one expert: two chunks of 16 when scanning
        torch.testing.assert_close(fused_moe(x, w13, w2, ids, w, scan=scan), ref.fused_moe(x, w13, w2, ids, w),
                                   rtol=1e-4, atol=1e-4)
    ids = torch.stack([torch.full((n,), 2), torch.full((n,), 11)], 1).to(DEV)  # two experts, ten idle
    w = torch.rand(n, 2, device=DEV)
    torch.testing.assert_close(fused_moe(x, w13, w2, ids, w), ref.fused_moe(x, w13, w2, ids, w), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_fused_moe_rows_do_not_depend_on_the_batch():
    from l2pd_kernels import fused_moe

    x = torch.randn(10, 32, device=DEV)
    w13, w2 = _experts(6, 32, 16, torch.float32)
    ids, w = ref.moe_route(torch.randn(10, 6, device=DEV), 2, "softmax")
    full = fused_moe(x, w13, w2, ids, w)
    part = fused_moe(x[3:5], w13, w2, ids[3:5], w[3:5])
    assert torch.equal(full[3:5], part)
    shared = torch.randn(10, 32, device=DEV)
    assert torch.equal(fused_moe(x, w13, w2, ids, w, shared=shared)[3:5],
                       fused_moe(x[3:5], w13, w2, ids[3:5], w[3:5], shared=shared[3:5]))


def test_align_pads_each_expert_to_whole_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])
    pairs, experts = ref.moe_align(ids, 5, 4)
    assert pairs.shape[0] % 4 == 0 and experts.shape[0] == pairs.shape[0] // 4
    used = experts[experts >= 0].tolist()
    assert used == [0, 1, 3]  # expert 2 and 4 get no block
    for b, ex in enumerate(experts.tolist()):
        chunk = pairs[4 * b: 4 * b + 4]
        real = chunk[chunk < 6]
        assert all(int(ids.view(-1)[p]) == ex for p in real)
        assert real.tolist() == sorted(real.tolist())  # pair order kept within an expert
    assert sorted(pairs[pairs < 6].tolist()) == list(range(6))


@needs_kernels
@pytest.mark.parametrize("chunked,n,k,e,block_m", [
    (c, *case) for c in (False, True) for case in ((3, 2, 5, 4), (7, 3, 6, 16), (33, 8, 256, 32), (1, 1, 1, 16),
                                                   (9, 4, 7, 128), (300, 8, 24, 16), (140, 1, 3, 8))] + [
    (True, 600, 8, 256, 64)])
def test_align_kernel_matches_reference(monkeypatch, chunked, n, k, e, block_m):
    """Both forms (one program per expert; programs over chunks of the pairs), odd sizes, one expert to 256,
    pairs in one chunk to 75 (4,800 pairs: chunks of 64 over 256 experts, batch 64 of LLaDA2.0-mini in small)."""
    from l2pd_kernels import moe

    monkeypatch.setattr(moe, "ALIGN_CHUNKED_PAIRS", 0 if chunked else 1 << 40)
    ids = torch.randint(0, e, (n, k), device=DEV)
    ids[0, 0] = e - 1  # the last expert has pairs: its run ends the sorted list
    got, want = moe.align(ids, e, block_m), ref.moe_align(ids, e, block_m)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_kernels
@pytest.mark.parametrize("chunked", [False, True])
def test_align_kernel_every_pair_on_one_expert(monkeypatch, chunked):
    from l2pd_kernels import moe

    monkeypatch.setattr(moe, "ALIGN_CHUNKED_PAIRS", 0 if chunked else 1 << 40)
    ids = torch.full((130, 8), 2, device=DEV)  # 1,040 pairs: more than one scan chunk, 65 blocks of one expert
    got, want = moe.align(ids, 4, 16), ref.moe_align(ids, 4, 16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[1] == 2).sum() == 65 and (got[1][65:] == -1).all()


@needs_kernels
def test_fused_moe_checks_shapes():
    from l2pd_kernels import fused_moe

    x = torch.randn(3, 8, device=DEV)
    w13, w2 = _experts(2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="shapes"):
        fused_moe(x, w13, w2[:, :, :3], torch.zeros(3, 1, dtype=torch.int64, device=DEV), torch.ones(3, 1, device=DEV))


@needs_kernels
@pytest.mark.parametrize("n,e,groups,keep,k,score", [(5, 16, 4, 2, 3, "sigmoid"), (9, 24, 8, 4, 8, "sigmoid"),
                                                     (3, 8, 1, 1, 2, "sigmoid"), (7, 12, 1, 1, 4, "softmax"),
                                                     (4, 256, 8, 4, 8, "sigmoid")])
@pytest.mark.parametrize("normalize", [True, False])
def test_router_kernel_matches_reference(n, e, groups, keep, k, score, normalize):
    from l2pd_kernels import moe_route

    logits = torch.randn(n, e, device=DEV) * 2
    bias = torch.randn(e, device=DEV) * 0.1
    ids, w = moe_route(logits, k, score, bias, groups, keep, 2.5, normalize)
    ids_ref, w_ref = ref.moe_route(logits, k, score, bias, groups, keep, 2.5, normalize)
    assert torch.equal(ids, ids_ref)  # best first in both
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, e + 1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,inter,e,k", [(1, 32, 16, 4, 2), (7, 48, 40, 9, 3), (33, 64, 24, 16, 4),
                                           (5, 45, 23, 6, 2)])
def test_fused_moe_tma_loads_match_pointer_loads(monkeypatch, dtype, n, d, inter, e, k):
    """The routed experts' weight tiles loaded by TMA (descriptors over the experts stacked by rows: rows past
    an expert's columns read the next expert's and are not stored; K past the end reads zeros), in the scan
    and the sorted path, with a shared expert (its weights by pointers): the pointer loads' bits, which a
    graphed step (TMA) and the same step run eagerly (pointers) rely on. d = 45 leaves rows 90 bytes apart,
    which no descriptor covers: pointer loads, still correct."""
    from l2pd_kernels import fused_moe, moe

    x = torch.randn(n, d, device=DEV).to(dtype)
    w13, w2 = _experts(e, d, inter, dtype)
    s13, s2 = (w[0] for w in _experts(1, d, inter, dtype))
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "sigmoid", torch.zeros(e, device=DEV), 1, 1, 2.5)
    want = ref.fused_moe(x, w13, w2, ids, w, shared_weights=(s13, s2))
    tol = dict(TOL[dtype], atol=max(TOL[dtype]["atol"], float(want.abs().max()) / 64))
    for scan in (False, True):  # "auto": on Hopper (the sorted path; the scan path while a graph is captured)
        assert moe._moe_tma(x, w13, w2, scan) is False
    for scan in (False, True):
        outs = []
        for mode in ("0", "1"):
            monkeypatch.setattr(moe, "TMA", mode)
            outs.append(fused_moe(x, w13, w2, ids, w, scan=scan, shared_weights=(s13, s2)))
        assert moe._moe_tma(x, w13, w2, scan) is (d % 8 == 0 and inter % 8 == 0)
        torch.testing.assert_close(outs[1], want, **tol)
        assert torch.equal(outs[0], outs[1])
        monkeypatch.setattr(moe, "TMA", "auto")


@needs_kernels
def test_tile_heights_follow_the_pairs_per_expert(monkeypatch):
    """``pick_config``: short tiles where an expert has few pairs; the tile study's down override
    (``L2PD_MOE_DOWN``) reaches the sorted path's 64-row tiles only, never the scan path or taller tiles."""
    from l2pd_kernels import moe

    monkeypatch.setattr(moe, "_DOWN_ENV", None)
    assert moe.pick_config(32, 8, 256)[0] == 32  # a batch-1 step: 1 pair an expert
    assert moe.pick_config(2048, 8, 256)[0] == 64  # batch 64: 64 pairs an expert
    assert moe.pick_config(34816, 8, 256)[0] == 128  # batch 64's prefill
    monkeypatch.setattr(moe, "_DOWN_ENV", (256, 64, 8, 5))
    assert moe.pick_config(2048, 8, 256)[2] == (256, 64, 8, 5)
    assert moe.pick_config(34816, 8, 256)[2] == moe.CONFIGS[-1][3]
    assert moe.pick_config(32, 8, 256)[2] == moe.CONFIGS[0][3]


@needs_kernels
@pytest.mark.parametrize("cols", [2, 3])
def test_down_kernel_programs_over_several_column_tiles(monkeypatch, cols):
    """``moe.DOWN_COLS`` (``L2PD_MOE_DOWN_COLS``): each down program of the sorted path takes ``cols`` column
    tiles in one loop, the last group fewer (96 columns: 3 tiles of 32 on the CPU), the shared expert's
    programs too, by pointers and by TMA: the bits of one tile a program, and the reference."""
    from l2pd_kernels import fused_moe, moe

    n, d, inter, e, k, dtype = 37, 96, 40, 6, 2, torch.bfloat16
    x = torch.randn(n, d, device=DEV).to(dtype)
    w13, w2 = _experts(e, d, inter, dtype)
    shared = tuple(w[0] for w in _experts(1, d, inter, dtype))
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "softmax")
    want = ref.fused_moe(x, w13, w2, ids, w, shared_weights=shared)
    monkeypatch.setattr(moe, "DOWN_COLS_PAIRS", 0)
    for mode in ("0", "1"):  # pointer loads, TMA loads
        monkeypatch.setattr(moe, "TMA", mode)
        monkeypatch.setattr(moe, "DOWN_COLS", 1)
        one = fused_moe(x, w13, w2, ids, w, shared_weights=shared, scan=False)
        monkeypatch.setattr(moe, "DOWN_COLS", cols)
        got = fused_moe(x, w13, w2, ids, w, shared_weights=shared, scan=False)
        assert torch.equal(got, one)
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_down_programs_take_several_column_tiles_from_many_pairs(monkeypatch):
    """The default: one column tile a down program below ``DOWN_COLS_PAIRS`` pairs and in the scan path, 4 (at
    most the tiles there are) from it; ``L2PD_MOE_DOWN_COLS`` forces its count at any number of pairs."""
    import os

    from l2pd_kernels import moe

    assert moe._down_cols_setting(None) == (4, 8192) == moe._down_cols_setting("")
    if "L2PD_MOE_DOWN_COLS" not in os.environ:
        assert (moe.DOWN_COLS, moe.DOWN_COLS_PAIRS) == (4, 8192)
    monkeypatch.setattr(moe, "DOWN_COLS", 4)
    monkeypatch.setattr(moe, "DOWN_COLS_PAIRS", 8192)
    assert moe.down_cols(8191, 16, scan=False) == 1
    assert moe.down_cols(8192, 16, scan=False) == 4
    assert moe.down_cols(16384, 3, scan=False) == 3
    assert moe.down_cols(16384, 16, scan=True) == 1
    cols, pairs = moe._down_cols_setting("2")  # forced: at any count
    monkeypatch.setattr(moe, "DOWN_COLS", cols)
    monkeypatch.setattr(moe, "DOWN_COLS_PAIRS", pairs)
    assert moe.down_cols(64, 16, scan=False) == 2 and moe.down_cols(64, 16, scan=True) == 1


def _fp8_experts(e, d, inter):
    """e4m3 experts with channel scales, as ``l2pd.quantize`` stores them, and the widened weights they hold."""
    w13, w2 = _experts(e, d, inter, torch.float32)
    q13, s13 = ref.quantize_fp8(w13.reshape(-1, d))
    q2, s2 = ref.quantize_fp8(w2.reshape(-1, inter))
    return q13.view(e, 2 * inter, d), q2.view(e, d, inter), (s13.view(e, 2 * inter), s2.view(e, d))


@needs_kernels
@pytest.mark.parametrize("a8,dtype,n,d,inter,e,k", [
    (False, torch.bfloat16, 1, 32, 16, 4, 2), (False, torch.bfloat16, 7, 48, 40, 9, 3),
    (False, torch.bfloat16, 5, 45, 23, 6, 2), (False, torch.float16, 33, 64, 24, 16, 4),
    (False, torch.float32, 7, 48, 40, 9, 3), (True, torch.bfloat16, 1, 32, 16, 4, 2),
    (True, torch.bfloat16, 5, 45, 23, 6, 2), (True, torch.float16, 7, 48, 40, 9, 3),
    (True, torch.float32, 7, 48, 40, 9, 3)])
def test_fused_moe_fp8_experts_match_reference(monkeypatch, a8, dtype, n, d, inter, e, k):
    """e4m3 experts (routed and shared) with channel scales, widened in registers (``a8``: against e4m3 rows of
    x and of the SiLU product, e4m3 products): the reference's ``linear_fp8`` (``linear_w8a8``) products, in the
    scan and the sorted path, by pointer and TMA loads (equal bits; d = 45: rows no descriptor covers, pointer
    loads); widened, the widened weights' product within rounding; ``a8`` with x's rows given (``xq``) as
    without."""
    from l2pd_kernels import fused_moe, moe

    x = torch.randn(n, d, device=DEV).to(dtype)
    q13, q2, scales = _fp8_experts(e, d, inter)
    sq13, sq2, (ss13, ss2) = _fp8_experts(1, d, inter)
    shared, shared_scales = (sq13[0], sq2[0]), (ss13[0], ss2[0])
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "sigmoid", torch.zeros(e, device=DEV), 1, 1, 2.5)
    want = ref.fused_moe(x, q13, q2, ids, w, scales=scales, a8=a8)
    if not a8:  # the reference: the experts' weights widened and scaled, as dense weights of x's dtype would run
        wide = ref.fused_moe(x.float(), q13.float() * scales[0][..., None], q2.float() * scales[1][..., None], ids, w)
        torch.testing.assert_close(want.float(), wide, **TOL[dtype])
    want_sh = ref.fused_moe(x, q13, q2, ids, w, shared_weights=shared, scales=scales, shared_scales=shared_scales,
                            a8=a8)
    # an intermediate (gate, up, their product) rounded the other way moves the output by a few ulps of the largest
    # (with a8, a SiLU product on the other side of an e4m3 step: one e4m3 step of it, 1/16)
    tol = dict(TOL[dtype], atol=max(TOL[dtype]["atol"], float(want_sh.abs().max()) / (16 if a8 else 64)))
    for scan in (False, True):
        got = fused_moe(x, q13, q2, ids, w, scan=scan, scales=scales, a8=a8)
        torch.testing.assert_close(got, want, **tol)
        if a8:
            assert torch.equal(fused_moe(x, q13, q2, ids, w, scan=scan, scales=scales, a8=True,
                                         xq=ref.quantize_rows_fp8(x)), got)
        outs = []
        for mode in ("0", "1"):
            monkeypatch.setattr(moe, "TMA", mode)
            outs.append(fused_moe(x, q13, q2, ids, w, scan=scan, shared_weights=shared, scales=scales,
                                  shared_scales=shared_scales, a8=a8))
        monkeypatch.setattr(moe, "TMA", "auto")
        torch.testing.assert_close(outs[1], want_sh, **tol)
        assert torch.equal(outs[0], outs[1])


@needs_kernels
def test_fused_moe_fp8_arguments_are_checked():
    from l2pd_kernels import fused_moe

    n, d, inter, e, k = 3, 32, 16, 4, 2
    x = torch.randn(n, d, device=DEV).to(torch.bfloat16)
    q13, q2, (s13, s2) = _fp8_experts(e, d, inter)
    ids, w = ref.moe_route(torch.randn(n, e, device=DEV), k, "sigmoid", torch.zeros(e, device=DEV), 1, 1, 2.5)
    with pytest.raises(ValueError, match="e4m3 with scales"):
        fused_moe(x, q13, q2, ids, w)  # e4m3 weights without their scales
    with pytest.raises(ValueError, match="e4m3 with scales"):
        fused_moe(x, *_experts(e, d, inter, torch.bfloat16), ids, w, scales=(s13, s2))
    with pytest.raises(ValueError, match="scales must be"):
        fused_moe(x, q13, q2, ids, w, scales=(s13, s2[:, :-1]))
    with pytest.raises(ValueError, match="scales must be"):
        fused_moe(x, q13, q2, ids, w, scales=(s13.half(), s2))
    with pytest.raises(ValueError, match="shared_scales must be"):
        fused_moe(x, q13, q2, ids, w, scales=(s13, s2), shared_weights=(q13[0], q2[0]))
    with pytest.raises(ValueError, match="shared_scales go with"):
        fused_moe(x, q13, q2, ids, w, scales=(s13, s2), shared_scales=(s13[0], s2[0]))
    with pytest.raises(ValueError, match="a8"):
        fused_moe(x, *_experts(e, d, inter, torch.bfloat16), ids, w, a8=True)
    with pytest.raises(ValueError, match="xq must be"):
        fused_moe(x, q13, q2, ids, w, scales=(s13, s2), a8=True, xq=(x, s13[0, :n]))
