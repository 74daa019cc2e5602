"""e4m3 products that quantize their input as they load it, from the row maxima the kernel that made the input
recorded (``amax`` / ``x_amax``; ``decoder.ROW_MAXIMA``): the recorded maxima, the products' bits against a
``quantize_rows`` launch and against the reference, the attention's maxima, and a w8a8 model decoding the same
tokens with fewer launches (on the CPU under TRITON_INTERPRET=1)."""

import pytest
import torch

from l2pd_kernels import reference as ref
from tests.conftest import needs_kernels, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _no_quantize_launch(monkeypatch):
    """Make ``quantize_rows`` fail, so a path that still launches it shows."""
    from l2pd_kernels import fp8

    def refuse(x):
        raise AssertionError("quantize_rows launched")

    monkeypatch.setattr(fp8, "quantize_rows", refuse)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,f,k,n,split", [(1, 40, 64, 24, 1), (5, 72, 96, 40, 1), (33, 136, 128, 72, 2)])
def test_down_product_quantizes_from_the_gated_products_maxima(dtype, rows, f, k, n, split, monkeypatch):
    """The gated product max-es each output row's largest magnitude into ``amax`` (over earlier values), and
    the next product quantizing from them as it loads gives the bits it gives after a ``quantize_rows`` launch,
    and the reference's values; K split across programs too."""
    from l2pd_kernels import linear_gate_up_silu_fp8, linear_w8a8, skinny

    monkeypatch.setattr(skinny, "SPLIT_K", split)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(DEV, dtype)
    gu, sgu = ref.quantize_fp8(torch.randn(2 * f, k, generator=g).to(DEV) * 2 / k**0.5)
    wd, sd = ref.quantize_fp8(torch.randn(n, f, generator=g).to(DEV) * 2 / f**0.5)
    earlier = torch.zeros(rows, device=DEV)
    earlier[0] = 1e4  # a row whose slot already holds a larger value keeps it
    amax = earlier.clone()
    act = linear_gate_up_silu_fp8(x, gu, sgu, a8=True, amax=amax)
    assert torch.equal(act, linear_gate_up_silu_fp8(x, gu, sgu, a8=True))  # the output does not change
    assert torch.equal(amax, torch.maximum(earlier, act.float().abs().amax(-1)))
    amax[0] = act[0].float().abs().max()  # the true maxima from here on
    want = linear_w8a8(act, wd, sd)
    _no_quantize_launch(monkeypatch)
    got = linear_w8a8(act, wd, sd, x_amax=amax)
    assert got.dtype == dtype and got.shape == (rows, n)
    assert torch.equal(got, want)
    # the reference quantizing from the given maxima: the same values as from its own
    torch.testing.assert_close(ref.linear_w8a8(act, wd, sd, x_amax=amax), ref.linear_w8a8(act, wd, sd), rtol=0,
                               atol=0)
    # the scales applied in another order: a rounding of the output apart (and the FP8 tensor cores' sums)
    torch.testing.assert_close(got.float(), ref.linear_w8a8(act, wd, sd).float(), rtol=2e-2, atol=2e-2)


@needs_kernels
def test_an_all_zero_row_and_rows_past_the_few_row_kernel(monkeypatch):
    """An all-zero row (maximum 0: scale 1) quantizes to zeros; past ``MAX_ROWS`` the gated product still
    records the maxima (from its output) and the next product quantizes as it always did."""
    from l2pd_kernels import fp8, linear_gate_up_silu_fp8, linear_w8a8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g).to(DEV, torch.bfloat16)
    x[2] = 0
    gu, sgu = ref.quantize_fp8(torch.randn(80, 64, generator=g).to(DEV) / 4)
    wd, sd = ref.quantize_fp8(torch.randn(24, 40, generator=g).to(DEV) / 4)
    amax = torch.zeros(6, device=DEV)
    act = linear_gate_up_silu_fp8(x, gu, sgu, a8=True, amax=amax)
    assert float(amax[2]) == 0.0 and bool((amax[[0, 1, 3, 4, 5]] > 0).all())
    y = linear_w8a8(act, wd, sd, x_amax=amax)
    assert bool((y[2] == 0).all()) and torch.equal(y, linear_w8a8(act, wd, sd))
    monkeypatch.setattr(fp8, "MAX_ROWS", 4)  # six rows: the many-row path
    many = torch.zeros(6, device=DEV)
    act_many = linear_gate_up_silu_fp8(x, gu, sgu, a8=True, amax=many)
    assert torch.equal(many, act_many.float().abs().amax(-1))
    torch.testing.assert_close(linear_w8a8(act_many, wd, sd, x_amax=many), linear_w8a8(act_many, wd, sd),
                               rtol=0, atol=0)


@needs_kernels
def test_bad_maxima_are_refused():
    from l2pd_kernels import linear_gate_up_silu_fp8, linear_w8a8, pool_attention

    x = torch.randn(3, 32, device=DEV, dtype=torch.bfloat16)
    gu, sgu = ref.quantize_fp8(torch.randn(16, 32, device=DEV))
    w, s = ref.quantize_fp8(torch.randn(8, 32, device=DEV))
    for bad in (torch.zeros(4, device=DEV), torch.zeros(3, device=DEV, dtype=torch.float16),
                torch.zeros(3, 2, device=DEV)[:, 0]):
        with pytest.raises(ValueError, match="amax must be a contiguous fp32"):
            linear_gate_up_silu_fp8(x, gu, sgu, a8=True, amax=bad)
        with pytest.raises(ValueError, match="amax must be a contiguous fp32"):
            linear_w8a8(x, w, s, x_amax=bad)
    q = torch.randn(1, 2, 3, 16, device=DEV)
    kv = torch.randn(1, 2, 8, 16, device=DEV)
    seg = torch.tensor([[0, 3, 0, 8]], device=DEV)
    with pytest.raises(ValueError, match="amax must be a contiguous fp32"):
        pool_attention(q, kv, kv, seg, amax=torch.zeros(2, device=DEV))


@needs_kernels
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_records_each_tokens_maximum_over_its_heads(splits, dtype):
    """``pool_attention`` (keys in one pass, or split and merged) and ``cached_attention``: the same output
    with ``amax``, which takes each token's largest magnitude over all its heads."""
    from l2pd_kernels import cached_attention, pool_attention

    g = torch.Generator().manual_seed(splits)
    H, HKV, D, T = 4, 2, 32, 80
    seg = torch.tensor([[0, 5, 1, 70], [5, 9, 0, 33]], device=DEV)
    q = torch.randn(1, 14, H, D, generator=g).to(DEV, dtype).transpose(1, 2)
    k = torch.randn(2, HKV, T, D, generator=g).to(DEV, dtype)
    v = torch.randn(2, HKV, T, D, generator=g).to(DEV, dtype)
    kw = dict(splits=splits, key_chunk=64) if splits > 1 else {}
    want = pool_attention(q, k, v, seg, **kw)
    amax = torch.zeros(14, device=DEV)
    got = pool_attention(q, k, v, seg, amax=amax, **kw)
    assert torch.equal(got, want)
    assert torch.equal(amax, want.transpose(1, 2).reshape(14, H * D).float().abs().amax(-1))
    qc = torch.randn(2, 7, H, D, generator=g).to(DEV, dtype).transpose(1, 2)
    want = cached_attention(qc, k, v, splits=splits)
    amax = torch.zeros(14, device=DEV)
    assert torch.equal(cached_attention(qc, k, v, splits=splits, amax=amax), want)
    assert torch.equal(amax, want.transpose(1, 2).reshape(14, H * D).float().abs().amax(-1))


@needs_kernels
@torch.no_grad()
def test_w8a8_model_decodes_the_same_tokens_with_fewer_quantize_launches(monkeypatch):
    """The engine's packed forward on a w8a8 model through the kernels: with the row maxima (the default) the
    same tokens as with a ``quantize_rows`` launch before the output and down projections, and those launches
    gone (the norms quantize their own rows either way)."""
    import l2pd
    import l2pd_kernels.attention as att
    from l2pd.engine import Engine
    from l2pd.models import adapter_for, decoder
    from l2pd_kernels import fp8

    monkeypatch.setattr(att, "pool_split_plan", lambda *a, **k: (2, 64))  # keys split and merged, as at batch 1
    model = tiny_model(seed=4, n_kv_heads=2, d_model=64, n_heads=4).to(DEV)
    l2pd.quantize(model, "w8a8")
    decoder.pack_layers(adapter_for(model).decoder.layers, cpu=True)
    real, launches = fp8.quantize_rows, []
    monkeypatch.setattr(fp8, "quantize_rows", lambda x: launches.append(x.shape) or real(x))
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    opts = dict(max_new_tokens=8, strategy="threshold", threshold=0.3, block_length=4, cache="dual",
                refresh="window", eotp=True)
    out, counts = [], []
    for maxima in (False, True):
        monkeypatch.setattr(decoder, "ROW_MAXIMA", maxima)
        launches.clear()
        engine = Engine(model, max_batch=2, backend="triton", fused=True)
        reqs = [engine.submit(p, **opts) for p in prompts]
        engine.run()
        out.append([r.tokens for r in reqs])
        counts.append(len(launches))
    assert out[0] == out[1] and sum(len(t) for t in out[0]) >= 4
    assert counts[0] > 0 and counts[1] == 0
