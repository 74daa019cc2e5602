"""linear_rope_qkv (the q/k/v product and rope_qkv in one launch) against the two launches it replaces and the
PyTorch reference: bf16/fp16/fp32 and e4m3 weights (widened, and with e4m3 activations), grouped-query heads,
partial RoPE, per-head norms, the engine's cache rows, odd K.

Run on the CPU under TRITON_INTERPRET=1 (the README's test command) or on a GPU; fresh random inputs.
"""

import pytest
import torch

from l2pd_kernels import reference as ref
from tests.conftest import needs_kernels

pytestmark = needs_kernels
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=8e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}
POISON = -2.0**15  # exact in every dtype tested, and far outside what a case's products and norms reach


def _case(dtype, B, S, H, HKV, D, K, partial, norm, rows, T=13):
    x = torch.randn(B, S, K, device=DEV).to(dtype)
    w = (torch.randn((H + 2 * HKV) * D, K, device=DEV) * 2 / K**0.5).to(dtype)
    half = D // 4 if partial else D // 2
    pos = torch.randint(0, 4096, (B, S), device=DEV).float()[..., None]
    f = pos / (10000.0 ** (torch.arange(half, device=DEV, dtype=torch.float32) / half))
    cos, sin = f.cos().contiguous(), f.sin().contiguous()
    slots = torch.randperm(T, device=DEV)[:S]
    kw = dict(rows=torch.randint(0, 3, (S,), device=DEV)) if rows else {}
    if norm:
        kw.update(q_norm=torch.rand(D, device=DEV).to(dtype) + 0.5, k_norm=torch.rand(D, device=DEV).to(dtype) + 0.5,
                  eps=1e-5)
    return x, w, cos, sin, slots, kw, (3 if rows else B, HKV, T, D)


def _same(a, b, norm):
    """The two launches' bits; on a GPU with per-head norms, within one rounding step of them: each sums a
    head's squares over its own tile shape, so the fp32 order (and now and then a last bit) may differ."""
    if DEV == "cpu" or not norm:
        assert torch.equal(a, b)
        return
    step = torch.finfo(a.dtype).eps * b.float().abs().amax(-1, keepdim=True)  # a last bit of the head's largest
    assert bool(((a.float() - b.float()).abs() <= 4 * step).all()), float((a.float() - b.float()).abs().max())
    if a.element_size() == 2:  # rounding to 16 bits hides most fp32 order differences
        assert float((a != b).float().mean()) < 0.05  # a last-bit difference now and then, not another norm


def _against_two_launches(x, w, product, H, HKV, cos, sin, slots, kw, cache, dtype, norm, **fused):
    """linear_rope_qkv (``fused``: its e4m3 arguments) against ``product(x)`` then rope_qkv on its column slices
    (the two launches) and against the reference; returns the fused q, k and v caches and the reference's k."""
    from l2pd_kernels import linear_rope_qkv, rope_qkv

    B, S = x.shape[:2]
    D = w.shape[0] // (H + 2 * HKV)
    k1, v1 = _caches(cache, dtype)
    q1 = linear_rope_qkv(x, w, H, HKV, cos, sin, k1, v1, slots, **kw, **fused)
    q, k, v = product(x).split([H * D, HKV * D, HKV * D], -1)
    k2, v2 = _caches(cache, dtype)
    q2 = rope_qkv(q.view(B, S, H, D), k.view(B, S, HKV, D), v.view(B, S, HKV, D), cos, sin, k2, v2, slots, **kw)
    _same(q1, q2, norm)
    _same(k1, k2, norm)
    assert torch.equal(v1, v2)
    k3, v3 = _caches(cache, dtype)
    q3 = ref.linear_rope_qkv(x, w, H, HKV, cos, sin, k3, v3, slots, **kw, **fused)
    torch.testing.assert_close(q1, q3, **TOL[dtype])
    torch.testing.assert_close(k1, k3, **TOL[dtype])
    torch.testing.assert_close(v1, v3, **TOL[dtype])
    return q1, k1, k3


def _tiles(monkeypatch, D, tma):
    """The same tile for the product in both forms (the fused one takes head_dim columns), so the same sums;
    its tiles loaded by TMA (``tma``; the interpreter runs them too) or by pointers."""
    from l2pd_kernels import skinny

    monkeypatch.setattr(skinny, "pick_config", lambda *a, **k: (D, 32, 4, 2))
    monkeypatch.setattr(skinny, "pick_tma", lambda *a, **k: (D, 32, 4, 2, False))
    monkeypatch.setattr(skinny, "TMA", "1" if tma else "0")


def _caches(shape, dtype):
    k_out = torch.full(shape, POISON, device=DEV).to(dtype)  # untouched slots keep it
    return k_out, k_out.clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, S, H, HKV, D, K", [(1, 5, 4, 2, 16, 40), (2, 3, 2, 2, 32, 70), (1, 1, 3, 1, 16, 16)])
@pytest.mark.parametrize("partial, norm, rows", [(False, False, False), (True, True, False), (False, False, True),
                                                 (True, True, True)])
@pytest.mark.parametrize("tma", [False, True])
def test_linear_rope_qkv_equals_its_two_launches(monkeypatch, dtype, B, S, H, HKV, D, K, partial, norm, rows, tma):
    from l2pd_kernels import skinny

    if rows and B > 1:
        pytest.skip("cache rows take one packed sequence (B = 1)")
    _tiles(monkeypatch, D, tma)
    x, w, cos, sin, slots, kw, cache = _case(dtype, B, S, H, HKV, D, K, partial, norm, rows)
    q1, k1, k3 = _against_two_launches(x, w, lambda x_: skinny.skinny_matmul(x_, w), H, HKV, cos, sin, slots, kw,
                                       cache, dtype, norm)
    assert q1.shape == (B, H, S, D) and q1.transpose(1, 2).is_contiguous()
    assert torch.equal(k1 == POISON, k3 == POISON)  # the same slots written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("tma", [False, True])
def test_linear_rope_qkv_with_k_split_equals_its_two_launches(monkeypatch, dtype, split, tma):
    """Each head's K shared by several programs (``pick_rope_split``: few heads on many SMs), the last to arrive
    doing the RoPE: the two launches' bits with the same split, and close to the reference."""
    from l2pd_kernels import skinny

    B, S, H, HKV, D, K = 1, 5, 4, 2, 16, 200
    _tiles(monkeypatch, D, tma)
    monkeypatch.setattr(skinny, "SPLIT_K", split)
    x, w, cos, sin, slots, kw, cache = _case(dtype, B, S, H, HKV, D, K, True, True, True)
    _against_two_launches(x, w, lambda x_: skinny.skinny_matmul(x_, w), H, HKV, cos, sin, slots, kw, cache, dtype,
                          True)


def test_few_heads_split_k_to_cover_the_sms():
    from l2pd_kernels.skinny import pick_rope_split

    assert pick_rope_split(24, 16, 132) == 4  # LLaDA2.0-mini's 24 heads, K 2,048 in steps of 128
    assert pick_rope_split(96, 32, 132) == 1  # LLaDA-8B's 96 heads already cover the SMs
    assert pick_rope_split(8, 6, 132) == 1  # never below 4 K steps a program


@pytest.mark.parametrize("a8", [False, True])
def test_linear_rope_qkv_fp8(monkeypatch, a8):
    """e4m3 weights with their channel scales, widened or (a8) against e4m3 activations: the two launches'
    bits (``linear_fp8`` / ``linear_w8a8``, then ``rope_qkv``) and near the reference."""
    from l2pd_kernels import linear_fp8, linear_w8a8, skinny

    B, S, H, HKV, D, K = 1, 4, 4, 2, 16, 48
    monkeypatch.setattr(skinny, "pick_config_fp8", lambda *a, **k: (D, 32, 4, 2))
    monkeypatch.setattr(skinny, "SPLIT_K", 1)  # no K split in the two launches either
    x, w, cos, sin, slots, kw, cache = _case(torch.bfloat16, B, S, H, HKV, D, K, True, True, True)
    w8, scale = ref.quantize_fp8(w)
    product = (lambda x_: linear_w8a8(x_, w8, scale)) if a8 else (lambda x_: linear_fp8(x_, w8, scale))
    _against_two_launches(x, w8, product, H, HKV, cos, sin, slots, kw, cache, torch.bfloat16, True, scale=scale, a8=a8)


def test_linear_rope_qkv_rejects_bad_input():
    from l2pd_kernels import linear_rope_qkv

    x, w, cos, sin, slots, kw, cache = _case(torch.bfloat16, 1, 3, 4, 2, 16, 32, False, False, False)
    k_out, v_out = _caches(cache, torch.bfloat16)
    with pytest.raises(ValueError, match="heads"):
        linear_rope_qkv(x, w, 3, 2, cos, sin, k_out, v_out, slots)  # 128 rows are not 7 heads
    with pytest.raises(ValueError, match="cos/sin"):
        linear_rope_qkv(x, w, 4, 2, cos[..., :3], sin[..., :3], k_out, v_out, slots)
    with pytest.raises(ValueError, match="k_out"):
        linear_rope_qkv(x, w, 4, 2, cos, sin, k_out[:, :1], v_out[:, :1], slots)
    with pytest.raises(ValueError, match="slots"):
        linear_rope_qkv(x, w, 4, 2, cos, sin, k_out, v_out, slots.int())
    with pytest.raises(ValueError, match="dtype"):
        linear_rope_qkv(x.float(), w, 4, 2, cos, sin, k_out, v_out, slots)
    with pytest.raises(ValueError, match="q_norm"):
        linear_rope_qkv(x, w, 4, 2, cos, sin, k_out, v_out, slots, q_norm=torch.ones(16, device=DEV))


def test_the_forward_fuses_where_it_paid(monkeypatch):
    """``L2PD_FUSED_ROPE`` unset: weights in the activations' dtype and heads for half the SMs or more (an H200's
    132: LLaDA-8B's 96 heads yes, LLaDA2.0-mini's 24 no; e4m3 weights against e4m3 activations too, widened
    ones no); set, it decides alone."""
    from l2pd.models import decoder
    from l2pd_kernels import device

    monkeypatch.setattr(device, "sm_count", lambda dev: 132)
    monkeypatch.setattr(decoder, "FUSED_ROPE", None)
    h = torch.zeros(1, 32, 8, dtype=torch.bfloat16)
    w = torch.zeros(8, 8, dtype=torch.bfloat16)
    assert decoder._rope_fuses(w, h, 96) and not decoder._rope_fuses(w, h, 24)
    assert not decoder._rope_fuses(w.to(torch.float8_e4m3fn), h, 96)
    assert decoder._rope_fuses(w.to(torch.float8_e4m3fn), h, 96, a8=True)
    assert not decoder._rope_fuses(w.to(torch.float8_e4m3fn), h, 24, a8=True)
    monkeypatch.setattr(decoder, "FUSED_ROPE", True)
    assert decoder._rope_fuses(w, h, 24)
    monkeypatch.setattr(decoder, "FUSED_ROPE", False)
    assert not decoder._rope_fuses(w, h, 96)
