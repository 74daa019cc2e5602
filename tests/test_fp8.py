"""FP8 weights: the quantizer's error bound, the few-row FP8 kernels (weights only, and weights with per-token
activations) and the row quantizer against their references (odd sizes, fp32/bf16/fp16 activations; on the CPU
under TRITON_INTERPRET=1), and quantized models decoding through patch with their filter."""

import os

import pytest
import torch

import l2pd
from l2pd_kernels import reference as ref
from tests.conftest import MASK, needs_kernels, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_quantize_fp8_error_is_within_half_an_e4m3_step():
    w = torch.randn(37, 53) * torch.rand(37, 1) * 3
    w[5] = 0  # an all-zero channel
    w8, scale = ref.quantize_fp8(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (37,) and float(scale[5]) == 1.0
    back = w8.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: a rounding error of at most 2^-4 of the value (normal range), and the
    # channel's largest value maps to 448 exactly
    err = (back - w).abs()
    assert bool((err <= w.abs() * 2**-4 + scale[:, None] * 2**-9 + 1e-12).all())
    torch.testing.assert_close(back.abs().amax(-1)[w.abs().amax(-1) > 0], w.abs().amax(-1)[w.abs().amax(-1) > 0])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 16, 32), (5, 37, 100), (33, 129, 64)])
def test_linear_fp8_kernel_matches_reference(dtype, rows, n, k):
    from l2pd_kernels import linear_fp8

    x = torch.randn(rows, k, device=DEV).to(dtype)
    w8, scale = ref.quantize_fp8(torch.randn(n, k, device=DEV))
    got = linear_fp8(x, w8, scale)
    want = ref.linear_fp8(x, w8, scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="FP8"):
        linear_fp8(x, w8.float(), scale)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,k", [(1, 16), (7, 100), (33, 2100)])
def test_quantize_rows_kernel_matches_reference(dtype, rows, k):
    from l2pd_kernels import quantize_rows

    x = (torch.randn(rows, k, device=DEV) * torch.rand(rows, 1, device=DEV) * 50).to(dtype)
    x[0] = 0  # an all-zero row: scale 1
    if rows > 1:
        x[-1, :3] = torch.tensor([1e-6, -3e-5, 2e-4]).to(dtype)  # e4m3 subnormals after scaling
    q, s = quantize_rows(x)
    q_ref, s_ref = ref.quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (rows,) and float(s[0]) == 1.0
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)  # the same division and rounding
    assert bool((q.float().abs().amax(-1)[1:] == 448.0).all())  # each row's largest magnitude maps to 448


@needs_kernels
def test_quantize_rows_rounds_ties_to_even():
    """Every midpoint between neighbouring e4m3 values (normal and subnormal, both signs) in a row whose scale is
    1 (its largest magnitude 448): the kernels' rounding rounds each as torch does, to the even neighbour; the
    norm's quantization too. (A negative value that rounds to zero comes out +0 where torch keeps -0: the GPU's
    own conversion writes +0. The same in every sum, so values are compared, not bits.)"""
    from l2pd_kernels import quantize_rows, rms_norm_fp8

    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = e4m3[e4m3.isfinite() & (e4m3 >= 0)].unique()
    mids = (values[:-1] + values[1:]) / 2  # exact in fp32
    x = torch.cat([mids, -mids, values, torch.tensor([448.0])])[None].to(DEV)
    q, s = quantize_rows(x)
    q_ref, s_ref = ref.quantize_rows_fp8(x)
    assert float(s[0]) == 1.0 and torch.equal(s, s_ref)
    assert torch.equal(q.float(), q_ref.float())
    assert torch.equal(q.float(), x.to(torch.float8_e4m3fn).float())  # torch's own rounding of the same values
    h, _, (qn, _) = rms_norm_fp8(x, None, 0.0)
    assert torch.equal(qn.float(), quantize_rows(h)[0].float())  # the norm's rows: quantize_rows' of its output


@needs_kernels
@pytest.mark.parametrize("swap", ["none", "a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 16, 32), (5, 37, 100), (33, 129, 64)])
def test_linear_w8a8_kernel_matches_reference(dtype, rows, n, k, swap, monkeypatch):
    from l2pd_kernels import linear_w8a8, skinny

    monkeypatch.setattr(skinny, "SWAP", swap)
    x = torch.randn(rows, k, device=DEV).to(dtype)
    w8, scale = ref.quantize_fp8(torch.randn(n, k, device=DEV))
    got = linear_w8a8(x, w8, scale)
    want = ref.linear_w8a8(x, w8, scale)
    # fp32 activations: the same e4m3 products; the interpreter sums them in fp32, Hopper's FP8 tensor cores
    # with a narrower accumulator (about 2^-13 of the sum)
    exact_sum = os.environ.get("TRITON_INTERPRET") == "1"
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 and exact_sum else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    # and within what rounding the activations to e4m3 can move the weights-only product, term by term: at most
    # 2^-4 of |x_i w_i| in e4m3's normal range, half a subnormal step (2^-10 of the row's scale) times |w_i|
    # below it; plus the output's rounding and, on a GPU, the FP8 tensor cores' narrower accumulator (a bound,
    # not a statistic: a norm ratio over one row of 16 outputs passed 0.05 in 99.5% of draws only)
    exact = ref.linear_fp8(x.float(), w8, scale)
    wf = w8.float() * scale[:, None]
    row_scale = ref.quantize_rows_fp8(x)[1]
    bound = ((2**-4 + 2**-11) * (x.float().abs() @ wf.abs().T) + row_scale[:, None] * 2**-10 * wf.abs().sum(1)
             + 2 * torch.finfo(dtype).eps * exact.abs() + 1e-6)
    assert bool(((got.float() - exact).abs() <= bound).all())
    with pytest.raises(ValueError, match="FP8"):
        linear_w8a8(x, w8.float(), scale)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="cuBLAS FP8 products need a GPU of compute capability 8.9 or later")
@pytest.mark.parametrize("fast", [False, True])
def test_linear_w8a8_many_rows_by_cublas_with_either_accumulation(fast, monkeypatch):
    """Above the few-row kernel's rows ``linear_w8a8`` runs cuBLAS FP8 (``torch._scaled_mm``), its sums
    accumulated fast (``FAST_ACCUM``, the default) or promoted to fp32: close to the reference either way, and the
    two ways within an FP8 accumulator's reach of each other."""
    from l2pd_kernels import fp8, linear_w8a8

    x = torch.randn(200, 4096, device="cuda", dtype=torch.bfloat16)
    w8, scale = ref.quantize_fp8(torch.randn(96, 4096, device="cuda") / 64)
    want = ref.linear_w8a8(x, w8, scale).float()
    monkeypatch.setattr(fp8, "FAST_ACCUM", fast)
    got = linear_w8a8(x, w8, scale).float()
    assert got.shape == (200, 96)
    assert float((got - want).norm() / want.norm()) < (5e-3 if fast else 3e-3)
    monkeypatch.setattr(fp8, "FAST_ACCUM", not fast)
    other = linear_w8a8(x, w8, scale).float()
    assert float((got - other).norm() / want.norm()) < 5e-3


@torch.no_grad()
def test_w8a8_model_decodes_close_to_weights_only():
    torch.manual_seed(0)
    model = tiny_model(seed=1)
    ids = torch.randint(0, 58, (2, 9))
    l2pd.quantize(model, "fp8")
    weights_only = model(ids).logits
    l2pd.quantize(model, "w8a8")  # the same FP8 weights; now the activations too
    assert model.model.transformer.blocks[0].q_proj.l2pd_w8a8 and model._l2pd_quantized == "w8a8"
    both = model(ids).logits
    rel = float((both - weights_only).norm() / weights_only.norm())
    assert 0 < rel < 0.1, rel
    l2pd.patch(model)
    out = model.generate(ids, max_new_tokens=16, block_length=8, eotp="accepted")
    assert not bool((out[:, 9:] == MASK).any())


@torch.no_grad()
def test_quantized_model_decodes_with_its_filter_and_close_logits():
    torch.manual_seed(0)
    model = tiny_model(seed=1)
    ids = torch.randint(0, 58, (2, 9))
    before = model(ids).logits
    from l2pd.filter import model_fingerprint

    torch.manual_seed(0)
    flt = l2pd.Filter(block_length=8, hidden=8)
    flt.meta["model_fingerprint"] = model_fingerprint(model)
    l2pd.quantize(model, "fp8")
    blk = model.model.transformer.blocks[0]
    assert blk.q_proj.weight.dtype == torch.float8_e4m3fn and blk.q_proj.weight_scale.shape == (64,)
    assert model.model.transformer.wte.weight.dtype == torch.float32  # the embedding stays
    after = model(ids).logits
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.1, rel
    l2pd.patch(model, filter=flt)  # the filter recorded for the unquantized weights still fits
    out = model.generate(ids, max_new_tokens=16, block_length=8, eotp="accepted", return_dict_in_generate=True)
    assert not bool((out.sequences[:, 9:] == MASK).any())
    with pytest.raises(ValueError, match="kind"):
        l2pd.quantize(model, "int4")


@needs_kernels
@torch.no_grad()
@pytest.mark.parametrize("kind", ["fp8", "w8a8"])
def test_packed_fp8_weights_same_logits_as_unpacked(kind):
    """Quantized q/k/v and gate/up pack with their scales (one product each, the gate in the kernel's epilogue):
    the same logits as the separate products, with the kernels and with the reference ops."""
    from l2pd.models.decoder import _packed, pack_layers, unpack_layers
    from l2pd.models.llada import llada_forward

    model = tiny_model(seed=5).to(DEV)
    l2pd.quantize(model, kind)
    tf, ids = model.model.transformer, torch.randint(0, 58, (1, 11), device=DEV)
    layers = l2pd.models.adapter_for(model).decoder.layers
    separate = {fused: llada_forward(tf, model.config, ids, fused=fused) for fused in (False, True)}
    assert pack_layers(layers, cpu=True)
    blk = layers[0]
    qkv = _packed(blk.owner, "_l2pd_qkv", [blk.q, blk.k, blk.v])
    assert qkv is not None and qkv.dtype == torch.float8_e4m3fn and vars(blk.owner)["_l2pd_qkv_scale"].shape == (
        qkv.shape[0],)
    for fused in (False, True):
        packed = llada_forward(tf, model.config, ids, fused=fused)
        # one rounding step of the activations apart at most (the gate and up halves rounded in another order)
        torch.testing.assert_close(packed, separate[fused], rtol=1e-4, atol=1e-4)
    blk.q.weight_scale.data = blk.q.weight_scale.clone()  # a scale no longer a view: not used packed
    assert _packed(blk.owner, "_l2pd_qkv", [blk.q, blk.k, blk.v]) is None
    unpack_layers(layers)
    assert "_l2pd_qkv" not in vars(blk.owner) and "_l2pd_qkv_scale" not in vars(blk.owner)
    torch.testing.assert_close(llada_forward(tf, model.config, ids, fused=False), separate[False])


@needs_kernels
@torch.no_grad()
@pytest.mark.parametrize("kind", ["fp8", "w8a8"])
def test_biased_fp8_projections_run_through_the_kernels(kind, monkeypatch):
    """Dream's q/k/v carry biases: quantized, they multiply in the forward's FP8 kernels like every other e4m3
    product (the reference's widened fp32 product there made a Dream-7B-shaped step twice as slow as bf16), the
    bias added after; the logits stay those of the reference ops."""
    from l2pd.models import adapter_for
    from l2pd.models.decoder import decoder_forward
    from tests.test_dream import tiny_dream

    model = tiny_dream(seed=3).to(DEV)
    l2pd.quantize(model, kind)
    dec = adapter_for(model).decoder
    assert dec.layers[0].q.bias is not None and dec.layers[0].q.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(0, 58, (1, 9), device=DEV)
    want = decoder_forward(dec, ids, fused=False)

    def refused(*a, **k):
        raise AssertionError("an e4m3 product of the fused forward ran the reference")

    monkeypatch.setattr(ref, "linear_fp8", refused)
    monkeypatch.setattr(ref, "linear_w8a8", refused)
    got = decoder_forward(dec, ids, fused=True)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@needs_kernels
@pytest.mark.parametrize("a8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,f,k", [(1, 8, 32), (5, 37, 100)])
def test_linear_gate_up_silu_fp8_matches_reference(a8, dtype, rows, f, k):
    from l2pd_kernels import linear_gate_up_silu_fp8

    x = torch.randn(rows, k, device=DEV).to(dtype)
    w8, scale = ref.quantize_fp8(torch.randn(2 * f, k, device=DEV) * 2 / k**0.5)
    got = linear_gate_up_silu_fp8(x, w8, scale, a8=a8)
    want = ref.linear_gate_up_silu_fp8(x, w8, scale, a8=a8)
    assert got.shape == (rows, f) and got.dtype == dtype
    # fp32: exact products summed in another order; on a GPU, e4m3 activations meet FP8 tensor cores, whose
    # accumulator is narrower (about 2^-13 of the sum)
    exact_sum = not a8 or os.environ.get("TRITON_INTERPRET") == "1"
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 and exact_sum else dict(rtol=4e-2, atol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="even"):
        linear_gate_up_silu_fp8(x, w8[:-1], scale[:-1])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,d", [(1, 16), (6, 100), (3, 2100)])
def test_rms_norm_fp8_quantizes_its_own_output(dtype, rows, d):
    """The norm's output as ``rms_norm`` gives it, and its e4m3 rows and scales bit for bit what
    ``quantize_rows`` makes of that output (so a w8a8 product sees the same input either way)."""
    from l2pd_kernels import quantize_rows, rms_norm, rms_norm_fp8

    x = (torch.randn(rows, d, device=DEV) * 3).to(dtype)
    delta = torch.randn(rows, d, device=DEV).to(dtype)
    w = (torch.rand(d, device=DEV) + 0.5).to(dtype)
    x[0] = 0  # an all-zero row (its delta too): scale 1
    delta[0] = 0
    h, total, (q, qs) = rms_norm_fp8(x, w, 1e-5, delta=delta)
    h_plain, total_plain = rms_norm(x, w, 1e-5, delta=delta)
    assert torch.equal(h, h_plain) and torch.equal(total, total_plain)
    q_ref, qs_ref = quantize_rows(h)
    assert q.dtype == torch.float8_e4m3fn and float(qs[0]) == 1.0
    assert torch.equal(qs, qs_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    h_r, _, (q_r, qs_r) = ref.rms_norm_fp8(x, w, 1e-5, delta=delta)
    torch.testing.assert_close(qs, qs_r, rtol=2e-2, atol=0)  # the reference norm's own rounding


@torch.no_grad()
@pytest.mark.parametrize("kind", ["fp8", "w8a8"])
def test_engine_serves_a_quantized_model_as_generate_decodes_it(kind):
    """A quantized model through the decode engine (``l2pd serve --weights``): each request's tokens are
    ``generate``'s on its prompt alone, with the q/k/v and gate/up products packed as the GPU runs them."""
    from l2pd.engine import Engine
    from l2pd.models.decoder import pack_layers

    model = l2pd.patch(tiny_model(seed=2))
    l2pd.quantize(model, kind)
    assert pack_layers(l2pd.models.adapter_for(model).decoder.layers, cpu=True)
    prompts = [torch.randint(0, 58, (n,)).tolist() for n in (7, 12)]
    opts = dict(max_new_tokens=24, strategy="threshold", threshold=0.5, block_length=8, cache="dual",
                refresh="window")
    engine = Engine(model, max_batch=2, backend="torch")
    reqs = engine.generate(prompts, **opts)
    eos = model.config.eos_token_id
    for p, r in zip(prompts, reqs):
        alone = model.generate(torch.tensor([p]), backend="torch", **opts)[0, len(p):].tolist()
        assert r.tokens == (alone[: alone.index(eos)] if eos in alone else alone)


def test_fp8_on_a_gpu_without_e4m3_says_so(monkeypatch):
    """An A100 (compute capability 8.0) has no e4m3: a clear error, not one from inside Triton's compiler."""
    from l2pd_kernels import fp8

    monkeypatch.setattr(fp8, "_FP8_DEVICES", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="weights needs .*compute capability 8.9 or later.*8.0.*--weights native"):
        fp8.check_fp8_device(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="K/V cache needs .*8.0.*--kv-cache native"):
        fp8.check_fp8_device(torch.device("cuda", 0), "kv_cache")
    assert not fp8._FP8_DEVICES  # a refused device is asked again
    fp8.check_fp8_device(torch.device("cpu"))  # the CPU runs the reference ops: no check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8_device(torch.device("cuda", 0))  # a Hopper passes, and is remembered
    assert torch.device("cuda", 0) in fp8._FP8_DEVICES
