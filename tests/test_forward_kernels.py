"""The forward's fused kernels (rms_norm, rope_qkv, silu_mul, skinny_matmul) against the PyTorch reference.

Run on the CPU under TRITON_INTERPRET=1 (the README's test command) or on a GPU; fresh random inputs each
run, odd sizes, fp32/bf16/fp16.
"""

import pytest
import torch

from l2pd_kernels import reference as ref
from tests.conftest import needs_kernels

pytestmark = needs_kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# tolerance of one rounding step in the output dtype (fp32: the sums' order)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 3, 100), (3, 5, 257)])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("with_weight", [False, True])
def test_rms_norm_matches_reference(dtype, shape, with_delta, with_weight):
    from l2pd_kernels import rms_norm

    x = torch.randn(shape, device=DEV).to(dtype) * 3
    delta = torch.randn(shape, device=DEV).to(dtype) if with_delta else None
    w = torch.rand(shape[-1], device=DEV).to(dtype) + 0.5 if with_weight else None
    h, total = rms_norm(x, w, 1e-5, delta=delta)
    h_ref, total_ref = ref.rms_norm(x, w, 1e-5, delta=delta)
    assert h.dtype == dtype and h.shape == x.shape
    # one rounding of the same fp32 sum: exact, except that the interpreter rounds to bf16 by truncation
    exact = dtype != torch.bfloat16 or DEV == "cuda"
    torch.testing.assert_close(total, total_ref, **(dict(rtol=0, atol=0) if exact else TOL[dtype]))
    if not exact and delta is not None:  # the norm of the kernel's own (truncated) sum: a rounding step apart
        h_ref = ref.rms_norm(total, w, 1e-5)[0]
    torch.testing.assert_close(h, h_ref, **TOL[dtype])


def test_rms_norm_strided_input_and_errors():
    from l2pd_kernels import rms_norm

    x = torch.randn(4, 6, 40, device=DEV)[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(rms_norm(x, None, 1e-6)[0], ref.rms_norm(x, None, 1e-6)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="delta"):
        rms_norm(x, None, 1e-5, delta=torch.zeros(3, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 1000), (2, 1031)])
def test_silu_mul_matches_reference(dtype, shape):
    from l2pd_kernels import silu_mul

    g = (torch.randn(shape, device=DEV) * 4).to(dtype)
    u = torch.randn(shape, device=DEV).to(dtype)
    torch.testing.assert_close(silu_mul(g, u), ref.silu_mul(g, u), **TOL[dtype])
    packed = torch.cat([g, u], -1)  # column slices of one packed gate+up output
    F = g.shape[-1]
    torch.testing.assert_close(silu_mul(packed[..., :F], packed[..., F:]), ref.silu_mul(g, u), **TOL[dtype])
    with pytest.raises(ValueError, match="gate"):
        silu_mul(g, u[..., :1])


def _cos_sin(B, S, D, start=0):
    pos = torch.randint(0, 4096, (B, S), device=DEV) + start
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    f = pos.float()[..., None] * inv
    return f.cos(), f.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,HKV,D,T", [(1, 1, 1, 1, 4, 1), (2, 5, 6, 3, 16, 11), (3, 7, 4, 4, 8, 20)])
@pytest.mark.parametrize("partial", [False, True])  # True: RoPE on the first half of each head (LLaDA 2.x)
@pytest.mark.parametrize("norm", [False, True])  # True: per-head q/k RMS norms first (LLaDA 2.x, LLaDA-MoE)
def test_rope_qkv_matches_reference(dtype, B, S, H, HKV, D, T, partial, norm):
    from l2pd_kernels import rope_qkv

    # q/k/v as column slices of one projection output: strided like a fused qkv matmul would leave them
    qkv = torch.randn(B, S, (H + 2 * HKV) * D, device=DEV).to(dtype)
    q = qkv[..., : H * D].view(B, S, H, D)
    k = qkv[..., H * D : (H + HKV) * D].view(B, S, HKV, D)
    v = qkv[..., (H + HKV) * D :].view(B, S, HKV, D)
    cos, sin = _cos_sin(B, S, D // 2 if partial else D)
    slots = torch.randperm(T, device=DEV)[:S] if S <= T else torch.arange(S, device=DEV)
    kw = {}
    if norm:
        q = q * 3  # heads far from unit RMS, so a missing norm shows
        kw = dict(q_norm=torch.rand(D, device=DEV).to(dtype) + 0.5, k_norm=torch.rand(D, device=DEV).to(dtype) + 0.5,
                  eps=1e-5)
    outs = []
    for fn in (rope_qkv, ref.rope_qkv):
        k_out = torch.full((B, HKV, max(T, S), D), 7.0, device=DEV).to(dtype)  # poisoned: untouched slots stay 7
        v_out = k_out.clone()
        outs.append((fn(q, k, v, cos, sin, k_out, v_out, slots, **kw), k_out, v_out))
    (qk, kk, vk), (qr, kr, vr) = outs
    assert qk.shape == (B, H, S, D)
    # normed heads: a normed value a rounding apart (rsqrt, the sum's order) moves the rotated one by one ulp of
    # the normed magnitude (up to about 6 here), twice: 150 seeds gave at most 0.0625 in bf16, 1e-3 in fp16
    tol = {**TOL[dtype], "atol": {torch.float32: 1e-4, torch.bfloat16: 8e-2, torch.float16: 2e-3}[dtype]} if norm \
        else TOL[dtype]
    torch.testing.assert_close(qk, qr, **tol)
    torch.testing.assert_close(kk, kr, **tol)
    torch.testing.assert_close(vk, vr, rtol=0, atol=0)
    untouched = torch.ones(kk.shape[2], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert (kk[:, :, untouched] == 7).all() and (vk[:, :, untouched] == 7).all()
    if partial:  # the second half of each head passes through unchanged (normed, with the norm)
        q_in = ref.rms_norm(q, kw["q_norm"], 1e-5)[0] if norm else q
        torch.testing.assert_close(qk[..., D // 2:], q_in.transpose(1, 2)[..., D // 2:], **tol if norm else
                                   dict(rtol=0, atol=0))


def test_rope_qkv_rejects_bad_shapes():
    from l2pd_kernels import rope_qkv

    q = torch.randn(1, 2, 2, 8, device=DEV)
    cos, sin = _cos_sin(1, 2, 8)
    buf = torch.zeros(1, 2, 4, 8, device=DEV)
    slots = torch.arange(2, device=DEV)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_qkv(q, q, q, cos[..., :2], sin, buf, buf.clone(), slots)
    with pytest.raises(ValueError, match="slots"):
        rope_qkv(q, q, q, cos, sin, buf, buf.clone(), slots.int())
    with pytest.raises(ValueError, match="k_out"):
        rope_qkv(q, q, q, cos, sin, buf[:, :1], buf[:, :1].clone(), slots)
    w = torch.ones(8, device=DEV)
    with pytest.raises(ValueError, match="q_norm and k_norm"):
        rope_qkv(q, q, q, cos, sin, buf, buf.clone(), slots, q_norm=w)  # one without the other
    with pytest.raises(ValueError, match="q_norm and k_norm"):
        rope_qkv(q, q, q, cos, sin, buf, buf.clone(), slots, q_norm=w[:4], k_norm=w[:4])


# a sum of K products in another order: fp32 drifts by a few ulps of the sum's magnitude
MM_TOL = {**TOL, torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _exact_linear(x, w):
    """x @ w.T in float64 on the CPU (no TF32, no reordering question), rounded once to x's dtype."""
    return (x.cpu().double() @ w.cpu().double().T).to(x.dtype).to(x.device)


@pytest.mark.parametrize("swap", ["none", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k", [(1, 5, 16), (7, 33, 100), (32, 48, 256), (70, 17, 130)])
def test_skinny_matmul_matches_reference(dtype, rows, n, k, swap, monkeypatch):
    from l2pd_kernels import skinny, skinny_matmul

    monkeypatch.setattr(skinny, "SWAP", swap)  # x @ w.T, and its transpose w @ x.T
    x = torch.randn(rows, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    got = skinny_matmul(x, w)
    assert got.shape == (rows, n) and got.dtype == dtype
    torch.testing.assert_close(got, _exact_linear(x, w), **MM_TOL[dtype])
    # leading dims, and x as a column slice of a wider buffer (the attention output view)
    wide = torch.randn(2, rows, k + 9, device=DEV).to(dtype)[..., 3 : 3 + k]
    torch.testing.assert_close(skinny_matmul(wide, w), _exact_linear(wide, w), **MM_TOL[dtype])


@pytest.mark.parametrize("swap", ["none", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,f,k", [(1, 3, 16), (5, 37, 72), (32, 64, 128)])
def test_gate_up_silu_matches_reference(dtype, rows, f, k, swap, monkeypatch):
    from l2pd_kernels import gate_up_silu, skinny

    monkeypatch.setattr(skinny, "SWAP", swap)
    x = torch.randn(1, rows, k, device=DEV).to(dtype)
    w = (torch.randn(2 * f, k, device=DEV) * 2 / k**0.5).to(dtype)
    got = gate_up_silu(x, w)
    assert got.shape == (1, rows, f) and got.dtype == dtype
    # gate and up are each rounded before the product, and either may land on the neighbouring value when
    # the fp32 sums are taken in another order: two rounding steps apart at most
    tol = {k: 2 * v for k, v in TOL[dtype].items()}
    torch.testing.assert_close(got, ref.linear_gate_up_silu(x, w), **tol)


def _product_case(kind: str, rows: int, n: int, k: int):
    """(x, w, launch keywords, reference result, dtype, gated, tolerance) of a few-row product test: ``kind``
    names the dtype (bf16, fp16, fp32), ``-gate`` a packed [gate; up] weight, ``fp8`` e4m3 weights widened in
    registers, ``a8`` e4m3 weights against e4m3 activations."""
    gate = kind.endswith("gate")
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(kind.split("-")[0], torch.bfloat16)
    x = torch.randn(rows, k, device=DEV).to(dtype)
    w = (torch.randn((2 if gate else 1) * n, k, device=DEV) * 2 / k**0.5).to(dtype)
    kw, a8 = {}, kind == "a8"
    if a8 or kind.startswith("fp8"):
        w, kw["scale"] = ref.quantize_fp8(w.float())
        want = (ref.linear_gate_up_silu_fp8(x, w, kw["scale"], a8=a8) if gate else
                (ref.linear_w8a8 if a8 else ref.linear_fp8)(x, w, kw["scale"]))
        if a8:  # e4m3 activations with their row scales
            x, kw["x_scale"] = ref.quantize_rows_fp8(x)
    elif gate:
        want = ref.linear_gate_up_silu(x, w)
    else:
        want = _exact_linear(x, w)
    # gate and up each rounded before their product, e4m3 rows: two rounding steps apart at most
    tol = {key: 2 * v for key, v in MM_TOL[dtype].items()} if gate or a8 else MM_TOL[dtype]
    return x, w, kw, want, dtype, gate, tol


@pytest.mark.parametrize("kind", ["bf16", "fp32-gate", "fp16-gate", "fp8", "a8"])
@pytest.mark.parametrize("rows,n,k,split", [(5, 37, 300, 3), (17, 64, 520, 2), (1, 19, 96, 4)])
def test_skinny_split_k_matches_reference(kind, rows, n, k, split):
    """K shared by ``split`` programs per tile (the last to arrive sums the partials): the reference result,
    the unsplit kernel's within the fp32 sums' order, and every tile counter back at zero for the next launch."""
    from l2pd_kernels import skinny

    x, w, kw, want, dtype, gate, tol = _product_case(kind, rows, n, k)
    outs = []
    for s in (1, split):
        out = torch.empty(rows, n, device=DEV, dtype=dtype)
        skinny._launch(x, w, out, n, gate, cfg=(16, 32, 4, 2), split=s, **kw)
        outs.append(out)
    torch.testing.assert_close(outs[1], want, **tol)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    assert int(skinny._tile_counters(x.device).abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,n,k,split", [(5, 37, 300, 1), (17, 64, 520, 2), (1, 19, 96, 3)])
@pytest.mark.parametrize("swap", ["none", "a8"])
def test_products_add_a_bias_before_rounding(dtype, rows, n, k, split, swap, monkeypatch):
    """A bias (Dream's q/k/v) joins the fp32 sums before they round, as ``F.linear`` adds it: bf16 weights,
    e4m3 weights widened and against e4m3 rows, K split or not, either orientation; against the references and
    against the kernel without a bias plus the bias in fp32. Bad biases are refused."""
    from l2pd_kernels import linear, linear_fp8, linear_w8a8, skinny

    monkeypatch.setattr(skinny, "SWAP", swap)
    monkeypatch.setattr(skinny, "SPLIT_K", split)
    x = torch.randn(rows, k, device=DEV).to(dtype)
    wf = torch.randn(n, k, device=DEV) / k**0.5
    bias = torch.randn(n, device=DEV).to(dtype)
    w8, scale = ref.quantize_fp8(wf)
    w = wf.to(dtype)
    tol = MM_TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    # on a GPU e4m3 activations meet FP8 tensor cores, whose accumulator is narrower (about 2^-13 of the sum)
    tol8 = tol if DEV == "cpu" else dict(rtol=2e-2, atol=2e-2)
    for got, want, plain, tl_ in ((skinny.skinny_matmul(x, w, bias=bias), ref.linear(x, w, bias),
                                   skinny.skinny_matmul(x, w, torch.float32), tol),
                                  (linear_fp8(x, w8, scale, bias), ref.linear_fp8(x, w8, scale, bias), None, tol),
                                  (linear_w8a8(x, w8, scale, bias=bias), ref.linear_w8a8(x, w8, scale, bias=bias),
                                   None, tol8)):
        assert got.shape == (rows, n) and got.dtype == dtype
        torch.testing.assert_close(got, want, **tl_)
        if plain is not None and DEV == "cuda":  # the fp32 sums plus the bias, rounded once: the same bits
            assert torch.equal(got, (plain + bias.float()).to(dtype))  # (the interpreter's casts do not round so)
    if DEV == "cpu" or dtype != torch.float32:
        torch.testing.assert_close(linear(x, w, bias), ref.linear(x, w, bias), **tol)
    for bad in (bias[:-1], torch.randn(2 * n, device=DEV).to(dtype)[::2]):
        with pytest.raises(ValueError, match="bias"):
            linear_fp8(x, w8, scale, bad)
        with pytest.raises(ValueError, match="bias"):
            skinny.skinny_matmul(x, w, bias=bad)


@pytest.mark.parametrize("kind", ["bf16", "fp16", "fp32", "bf16-gate", "fp8-gate", "a8"])
@pytest.mark.parametrize("rows,n,k,split", [(5, 37, 264, 1), (32, 64, 128, 2), (17, 19, 96, 3), (3, 21, 70, 1)])
@pytest.mark.parametrize("swap", [False, True])
def test_skinny_tma_loads_match_pointer_loads(kind, rows, n, k, split, swap):
    """Tiles loaded by TMA (rows, columns and K past the ends read as zeros; a gate tile's spare columns read up
    rows and are not stored): the reference result, and the pointer path's bits with the same tile, which a
    graphed step (TMA loads) and the same step run eagerly (pointer loads) rely on. K = 70 leaves bf16 rows 140
    bytes apart, which no TMA descriptor covers: the pointer path runs."""
    from l2pd_kernels import skinny

    x, w, kw, want, dtype, gate, tol = _product_case(kind, rows, n, k)
    outs = []
    for tma in (False, True):
        out = torch.empty(rows, n, device=DEV, dtype=dtype)
        skinny._launch(x, w, out, n, gate, cfg=(16, 64, 4, 2), swap=swap, split=split, tma=tma, **kw)
        outs.append(out)
    torch.testing.assert_close(outs[1], want.to(dtype), **tol)
    assert torch.equal(outs[0], outs[1])
    assert int(skinny._tile_counters(x.device).abs().sum()) == 0


def test_skinny_eager_launch_takes_the_tma_tile_with_pointer_loads(monkeypatch):
    """Outside a CUDA graph capture the shipped rule keeps ``pick_tma``'s tile but loads by pointers (a TMA
    launch costs more host time): recorded launches carry the tile and ``TMA=0``; ``L2PD_SKINNY_TMA=1`` loads by
    TMA in eager launches too."""
    from l2pd_kernels import skinny

    launches = []
    real = skinny._skinny_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw)
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(skinny, "_skinny_kernel", Recorder())
    monkeypatch.setattr(skinny, "_hopper", lambda device: True)  # as on a Hopper GPU
    monkeypatch.setattr(skinny, "pick_tma", lambda *a, **k: (16, 64, 4, 2, True))
    x = torch.randn(5, 128, device=DEV).to(torch.bfloat16)
    w = (torch.randn(48, 128, device=DEV) / 12).to(torch.bfloat16)
    for mode in ("auto", "1"):
        monkeypatch.setattr(skinny, "TMA", mode)
        out = torch.empty(5, 48, device=DEV, dtype=torch.bfloat16)
        skinny._launch(x, w, out, 48, False)
        torch.testing.assert_close(out, _exact_linear(x, w), **MM_TOL[torch.bfloat16])
    eager_auto, eager_forced = launches
    assert (eager_auto["BLOCK_N"], eager_auto["BLOCK_K"], eager_auto["SWAP"]) == (16, 64, True)
    assert eager_auto["TMA"] == 0 and eager_forced["TMA"] == 1


def test_pick_tma_rule():
    from l2pd_kernels.skinny import pick_tma

    assert pick_tma(32, 4096, 12288, False, 132) == (32, 256, 4, 5, False)  # LLaDA-8B's down: one slice per SM
    assert pick_tma(32, 3584, 18944, False, 132) is None  # Dream-7B's down: slower in its step
    assert pick_tma(32, 12288, 4096, False, 132) == (64, 128, 4, 4, True)  # its q/k/v: transposed
    assert pick_tma(32, 12288, 4096, True, 132)[:2] == (128, 128)  # its gate/up: 96 programs fill as 192 do
    assert pick_tma(32, 18944, 3584, True, 132)[:2] == (64, 128)  # Dream-7B's: 148 programs would take 2 waves
    assert pick_tma(32, 5120, 2048, True, 132)[:2] == (64, 128)  # LLaDA2.0-mini's dense layer
    assert pick_tma(32, 4096, 4096, False, 132, fp8=True) is None  # e4m3: the pointer path's tiles
    assert pick_tma(32, 4096, 4096, False, 132, a8=True) is None


@pytest.mark.parametrize("split", [0, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 5, 16), (7, 33, 100), (32, 256, 512)])
def test_skinny_matmul_fp32_output_keeps_the_sums_unrounded(dtype, rows, n, k, split, monkeypatch):
    """``out_dtype=torch.float32`` (a router's logits): the fp32 sums of exact half-precision products, not
    rounded to the inputs' dtype, K whole or split among programs; ``linear_f32`` and its reference agree."""
    from l2pd_kernels import linear_f32, skinny, skinny_matmul

    monkeypatch.setattr(skinny, "SPLIT_K", split)
    x = torch.randn(rows, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    want = x.cpu().double() @ w.cpu().double().T
    got = skinny_matmul(x, w, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    scale = float(want.abs().max())
    # fp32 sums of k exact products: far inside the inputs' own rounding (bf16: 4e-3 of the largest value)
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=1e-5 * scale)
    for fn in (linear_f32, ref.linear_f32):
        out = fn(x, w)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="out_dtype"):
        skinny_matmul(x, w, torch.float64)
    with pytest.raises(ValueError, match="half-precision"):
        linear_f32(x.float(), w.float())


def test_skinny_split_k_through_the_public_calls(monkeypatch):
    """``L2PD_SKINNY_SPLIT`` (``SPLIT_K``) reaches ``skinny_matmul`` and ``gate_up_silu`` with their own tiles."""
    from l2pd_kernels import gate_up_silu, skinny, skinny_matmul

    monkeypatch.setattr(skinny, "SPLIT_K", 2)
    x = torch.randn(3, 600, device=DEV).to(torch.bfloat16)
    w = (torch.randn(2 * 21, 600, device=DEV) / 600**0.5).to(torch.bfloat16)
    torch.testing.assert_close(skinny_matmul(x, w), _exact_linear(x, w), **MM_TOL[torch.bfloat16])
    tol = {key: 2 * v for key, v in TOL[torch.bfloat16].items()}
    torch.testing.assert_close(gate_up_silu(x, w), ref.linear_gate_up_silu(x, w), **tol)


def test_pick_split_rule():
    from l2pd_kernels import skinny

    if skinny.SPLIT_K:
        pytest.skip("L2PD_SKINNY_SPLIT set")
    assert skinny.pick_split(96, 32, 132) == 1 and skinny.pick_split(128, 48, 132) == 1  # bf16: never
    assert skinny.pick_split(64, 48, 132, widened=True) == 8  # widened e4m3, down projection: 8 x 64 programs
    assert skinny.pick_split(192, 16, 132, widened=True) == 2
    assert skinny.pick_split(1976, 16, 132, widened=True) == 1  # the LM head fills the SMs alone
    assert skinny.pick_split(64, 24, 132, a8=True) == 2 and skinny.pick_split(64, 4, 132, a8=True) == 1
    for tiles, steps in ((1, 64), (32, 16), (96, 32), (128, 48)):
        split = skinny.pick_split(tiles, steps, 132, widened=True)
        assert steps // split >= 4 and tiles * split <= 4 * 132


def test_skinny_matmul_rejects_bad_input():
    from l2pd_kernels import gate_up_silu, skinny_matmul

    x = torch.randn(3, 8, device=DEV)
    with pytest.raises(ValueError, match="multiply"):
        skinny_matmul(x, torch.randn(4, 9, device=DEV))
    with pytest.raises(ValueError, match="share"):
        skinny_matmul(x, torch.randn(4, 8, device=DEV).half())
    with pytest.raises(ValueError, match="unit stride"):
        skinny_matmul(x, torch.randn(8, 4, device=DEV).T)
    with pytest.raises(ValueError, match="even"):
        gate_up_silu(x, torch.randn(5, 8, device=DEV))


def test_linear_dispatch_keeps_results():
    """``linear``/``linear_gate_up_silu`` pick the kernel or cuBLAS by rows; both give the reference result."""
    import l2pd_kernels

    for rows in (4, 100):
        x = torch.randn(rows, 64, device=DEV)
        w = torch.randn(40, 64, device=DEV) / 8
        torch.testing.assert_close(l2pd_kernels.linear(x, w), ref.linear(x, w), **TOL[torch.float32])
        torch.testing.assert_close(l2pd_kernels.linear_gate_up_silu(x, w), ref.linear_gate_up_silu(x, w),
                                   **TOL[torch.float32])
