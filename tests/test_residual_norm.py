"""An RMSNorm split between the products around it: ``linear_residual`` (the residual add, x * weight and each
row's sums of squares per column tile in the product's epilogue) and the products that finish it
(``rms_linear``, ``gate_up_silu(rms=)``, ``linear_rope_qkv(rms=)``), against ``l2pd_kernels.reference`` and
against the unsplit norm; bf16/fp16/fp32, odd sizes, several column tiles, K split across programs.

Run on the CPU under TRITON_INTERPRET=1 (the README's test command) or on a GPU; fresh random inputs.
"""

import os

import pytest
import torch

from l2pd_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (the README's test command sets it)",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=8e-2),
       torch.float16: dict(rtol=3e-3, atol=3e-3)}
EPS = 1e-5


def _inputs(dtype, M, K, N, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEV).to(dtype)

    return (rand(M, K), rand(N, K, scale=K**-0.5), rand(M, N), (torch.rand(N, generator=g) + 0.5).to(DEV).to(dtype),
            rand(24, N, scale=N**-0.5), rand(2 * 24, N, scale=N**-0.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M, K, N", [(5, 40, 48), (1, 16, 16), (3, 70, 36)])
@pytest.mark.parametrize("split", [1, 2])
def test_a_norm_split_across_two_products_equals_the_norm_between_them(monkeypatch, dtype, M, K, N, split):
    from l2pd_kernels import gate_up_silu, linear_residual, rms_linear, skinny

    monkeypatch.setattr(skinny, "pick_config", lambda *a, **k: (16, 32, 4, 2))  # several column tiles
    monkeypatch.setattr(skinny, "SPLIT_K", split)
    x, w, res, g, w2, w3 = _inputs(dtype, M, K, N, seed=M * 1000 + K + N)
    out, xg, ssq = linear_residual(x, w, res, g)
    r_out, r_xg, r_ssq = ref.linear_residual(x, w, res, g)
    torch.testing.assert_close(out, r_out, **TOL[dtype])
    torch.testing.assert_close(xg, (out.float() * g.float()).to(dtype))  # from its own sum: a rounding apart
    assert ssq.shape == (-(-N // 16), M) and ssq.dtype == torch.float32
    torch.testing.assert_close(ssq.sum(0), out.float().pow(2).sum(-1), rtol=1e-5, atol=1e-5)

    rms = (ssq, EPS)
    y = rms_linear(xg, w2, rms)
    torch.testing.assert_close(y, ref.rms_linear(xg, w2, rms), **TOL[dtype])
    normed = ref.rms_norm(out, g, EPS)[0]  # the norm run apart: rounding differs, not the result
    torch.testing.assert_close(y, ref.linear(normed, w2), **TOL[dtype])
    a = gate_up_silu(xg, w3, rms)
    torch.testing.assert_close(a, ref.linear_gate_up_silu(xg, w3, rms), **TOL[dtype])
    torch.testing.assert_close(a, ref.linear_gate_up_silu(normed, w3), **TOL[dtype])


def test_the_rope_product_finishes_the_norm(monkeypatch):
    """``linear_rope_qkv(rms=)`` against the reference and against the norm run apart, then the two launches."""
    from l2pd_kernels import linear_residual, linear_rope_qkv, skinny

    monkeypatch.setattr(skinny, "pick_config", lambda *a, **k: (16, 32, 4, 2))
    B, S, H, HKV, D, T = 1, 5, 4, 2, 16, 9
    x, w, res, g, _, _ = _inputs(torch.float32, S, 40, 48, seed=7)
    out, xg, ssq = linear_residual(x, w, res, g)
    wqkv = (torch.randn((H + 2 * HKV) * D, 48) / 48**0.5).to(DEV)
    ang = torch.rand(B, S, D // 2).to(DEV) * 6.28
    cos, sin = ang.cos(), ang.sin()
    slots = torch.randperm(T)[:S].to(DEV)
    caches = [torch.zeros(B, HKV, T, D, device=DEV) for _ in range(6)]
    q1 = linear_rope_qkv(xg[None], wqkv, H, HKV, cos, sin, caches[0], caches[1], slots, rms=(ssq, EPS))
    q2 = ref.linear_rope_qkv(xg[None], wqkv, H, HKV, cos, sin, caches[2], caches[3], slots, rms=(ssq, EPS))
    q3 = ref.linear_rope_qkv(ref.rms_norm(out, g, EPS)[0][None], wqkv, H, HKV, cos, sin, caches[4], caches[5],
                             slots)
    for a, b in ((q1, q2), (caches[0], caches[2]), (caches[1], caches[3]), (q1, q3), (caches[0], caches[4])):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_bad_input_is_refused():
    from l2pd_kernels import linear_residual, linear_rope_qkv, rms_linear

    x, w, res, g, w2, _ = _inputs(torch.float32, 3, 16, 16, seed=1)
    with pytest.raises(ValueError, match="residual must be"):
        linear_residual(x, w, res[:2], g)
    with pytest.raises(ValueError, match="norm_weight"):
        linear_residual(x, w, res, g[:8])
    with pytest.raises(ValueError, match="sums of squares"):
        rms_linear(x, w2[:, :16], (torch.zeros(2, 4, device=DEV), EPS))
    w8 = torch.zeros(96, 16, device=DEV).to(torch.float8_e4m3fn)  # 4 + 2 heads of 16
    cos = torch.ones(1, 3, 8, device=DEV)
    kv = torch.zeros(1, 1, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="e4m3"):
        linear_rope_qkv(x[None], w8, 4, 1, cos, cos, kv, kv.clone(), torch.arange(3, device=DEV),
                        scale=torch.ones(96, device=DEV), a8=True, rms=(torch.zeros(1, 3, device=DEV), EPS))
