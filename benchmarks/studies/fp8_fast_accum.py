"""cuBLAS FP8 products (``torch._scaled_mm`` with row-wise scales, the many-row path of ``linear_w8a8``) with the
accumulator promoted to fp32 every few K steps against fast accumulation (``l2pd_kernels.fp8.FAST_ACCUM``), at
LLaDA-8B shapes: each product's time and relative error, then batch-64 ``generate`` with each setting, alternated.

    PYTHONPATH=.:benchmarks python benchmarks/studies/fp8_fast_accum.py --out runs/fast_accum.json

Products: 2,048 rows (a step at batch 64: 64 rows of a 32-token block) and 24,576 (a refresh over 384 positions
of 64 rows) by the q/k/v, gate/up, down and output weights; e4m3 weights and rows quantized as the forward does
them; error against the fp32 product of the same e4m3 values. ``generate``: batch 64, prompt 512 + 256, block
32, dual cache, ``--refresh`` refresh, 8 tokens per forward (``test_decode_bench.py::test_long_canvas``'s decode).
"""

from __future__ import annotations

import argparse

import torch
from decode_8b import L, build_shape
from harness import graphed_us, run_info, save

from l2pd.decode import generate, release
from l2pd_kernels import fp8, quantize_rows
from l2pd_kernels import reference as ref

SHAPES = [(2048, 12288, 4096), (2048, 24576, 4096), (2048, 4096, 12288), (2048, 4096, 4096), (24576, 24576, 4096)]


@torch.no_grad()
def products() -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for M, N, K in SHAPES:
        w, s = ref.quantize_fp8(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
        q, qs = quantize_rows(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
        exact = (q.float() @ w.float().T) * qs[:, None] * s
        for fast in (False, True):
            def mm(i, fast=fast, q=q, w=w, qs=qs, s=s):
                return torch._scaled_mm(q, w.t(), qs[:, None], s[None, :], out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            err = ((mm(0).float() - exact).norm() / exact.norm()).item()
            us = sorted(graphed_us(mm, 3, 20) for _ in range(3))[1]
            rows.append({"M": M, "N": N, "K": K, "fast_accum": fast, "us": us, "TFLOPs": 2 * M * N * K / us / 1e6,
                         "relative_error": err})
            print(f"{M:6d} x {N:6d} x {K:6d} fast {fast!s:5s}: {us:8.1f} us {2 * M * N * K / us / 1e6:6.0f} "
                  f"TFLOP/s, relative error {err:.2e}", flush=True)
    return rows


@torch.no_grad()
def decode(refresh: str, repeats: int) -> list[dict]:
    model = build_shape("8b", "w8a8")
    ids = torch.randint(0, 126000, (64, 512), device="cuda")
    kw = dict(max_new_tokens=256, block_length=L, strategy="steps", cache="dual", refresh=refresh,
              return_dict_in_generate=True)
    rows, tokens, shipped = [], {}, fp8.FAST_ACCUM
    try:
        for fast in [False, True] * repeats:
            fp8.FAST_ACCUM = fast
            release(model)  # graphs captured with the setting
            generate(model, ids, steps=2 * (256 // L), **kw)
            out = generate(model, ids, steps=256 // 8, **kw)
            tokens.setdefault(fast, out.sequences[:, ids.shape[1]:])  # the answers
            rows.append({"fast_accum": fast, "tokens_per_s": 64 * 256 / out.seconds, "forwards": out.forwards})
            print(f"generate, batch 64, {refresh} refresh, 8 tokens per forward, fast {fast}: "
                  f"{64 * 256 / out.seconds:.0f} tokens/s", flush=True)
    finally:
        fp8.FAST_ACCUM = shipped
        release(model)
    differ = (tokens[False] != tokens[True]).float().mean().item()
    print(f"answer tokens that differ between the settings: {differ:.3f} (random weights: near-ties everywhere)")
    return rows + [{"answer_tokens_differing": differ}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refresh", default="window", help="window (default), full or tail")
    ap.add_argument("--repeats", type=int, default=2, help="decodes per setting, alternated (default 2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    save(args.out, {**run_info(), "products": products(), "generate": decode(args.refresh, args.repeats)})


if __name__ == "__main__":
    main()
