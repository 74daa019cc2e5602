"""Every tile candidate of the skinny matmul on LLaDA-8B's linear layers, against cuBLAS, with cold weights.

    python benchmarks/skinny_configs.py --rows 32,64 --out runs/skinny_configs.json
    python benchmarks/skinny_configs.py --weights fp8 --rows 32,64,768,2048 --out runs/skinny_fp8.json

With ``--weights fp8`` the weights are e4m3 with per-channel scales (``l2pd.quantize``); the baselines are
bf16 cuBLAS on the same shapes, the FP8 path of ``l2pd_kernels.linear_fp8`` as it stands, and ``linear_w8a8``,
cuBLAS FP8 (``torch._scaled_mm``, per-token activation scales, without the quantization), and the skinny
candidates (up to 64 rows) reading the FP8 bytes: widened in registers, and (``a8``) against e4m3 activations.

``triton.testing.do_bench`` flushes the L2 cache before each call, so every weight comes from HBM as in a
forward (a 32 MB weight would otherwise stay in the 50 MB L2 between calls). Prints, per layer and row
count, cuBLAS (``F.linear``; plus ``silu_mul`` for gate/up), the best candidate and what ``pick_config``
chooses; ``l2pd_kernels.skinny.pick_config`` is set from these figures.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton.testing

from l2pd_kernels import silu_mul
from l2pd_kernels.skinny import _launch, pick_config

LAYERS = {"qkv": (12288, 4096), "out": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
          "head": (126464, 4096)}
CANDIDATES = [(bn, bk, 4, st) for bn in (16, 32, 64, 128) for bk in (128, 256) for st in (3, 4, 6)] + [
    (128, 128, 8, 4), (128, 256, 8, 3), (64, 256, 8, 4)]
FP8_CANDIDATES = [(bn, bk, w, st) for bn in (16, 32, 64, 128) for bk in (256, 512) for w in (4, 8)
                  for st in (3, 4)]
BF16_SWAP_CANDIDATES = [(bn, bk, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]


def time_layer_fp8(layer: str, rows: int) -> dict:
    """FP8 weights: bf16 cuBLAS, the current ``linear_fp8``, cuBLAS FP8 and the skinny candidates, in us."""
    from l2pd_kernels import linear_fp8, linear_w8a8, quantize_rows
    from l2pd_kernels.reference import quantize_fp8

    n, k = LAYERS[layer]
    gate = layer == "gate_up"
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    w8, scale = quantize_fp8(w)
    n_out = n // 2 if gate else n
    out = torch.empty(rows, n_out, device="cuda", dtype=torch.bfloat16)
    bench = lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50)  # noqa: E731
    row = {"cublas_bf16_us": bench(lambda: F.linear(x, w)), "linear_fp8_us": bench(lambda: linear_fp8(x, w8, scale)),
           "linear_w8a8_us": bench(lambda: linear_w8a8(x, w8, scale)),
           "quantize_rows_us": bench(lambda: quantize_rows(x)), "candidates": {}}
    x8, xs = quantize_rows(x)
    wt, ws = w8.t(), scale[None, :]
    try:
        row["scaled_mm_us"] = bench(lambda: torch._scaled_mm(x8, wt, xs[:, None], ws, out_dtype=torch.bfloat16))
    except Exception as e:  # a build or shape cuBLAS FP8 does not take
        row["scaled_mm_error"] = repr(e)[:200]
    if rows <= 64:  # widened FP8 weights, e4m3 activations, and bf16 weights; each as x @ w.T and w @ x.T
        variants = [("fp8", cfg, dict(scale=scale)) for cfg in FP8_CANDIDATES]
        variants += [("a8", cfg, dict(scale=scale, x_scale=xs)) for cfg in FP8_CANDIDATES]
        variants += [("bf16", cfg, {}) for cfg in BF16_SWAP_CANDIDATES]
        for kind, cfg, kw in variants:
            for swap in (False, True):
                a = x8 if kind == "a8" else x
                b = w if kind == "bf16" else w8
                try:
                    ms = triton.testing.do_bench(lambda a=a, b=b, cfg=cfg, swap=swap, kw=kw: _launch(
                        a, b, out, n_out, gate, cfg, swap=swap, **kw),
                                                 warmup=10, rep=50)
                except Exception:  # needs more shared memory than the GPU has
                    continue
                row["candidates"][f"{kind}{'/swap' if swap else ''} {cfg}"] = 1e3 * ms
    return row


def time_layer(layer: str, rows: int) -> dict:
    """cuBLAS and every candidate on one layer's product, in microseconds."""
    n, k = LAYERS[layer]
    gate = layer == "gate_up"
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    n_out = n // 2 if gate else n
    out = torch.empty(rows, n_out, device="cuda", dtype=torch.bfloat16)

    def base():
        return silu_mul(*F.linear(x, w).chunk(2, -1)) if gate else F.linear(x, w)

    row = {"cublas_us": 1e3 * triton.testing.do_bench(base, warmup=10, rep=50), "candidates": {}}
    for cfg in CANDIDATES:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: _launch(x, w, out, n_out, gate, cfg), warmup=10, rep=50)
        except Exception:  # needs more shared memory than the GPU has
            continue
        row["candidates"][str(cfg)] = 1e3 * ms
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32,64")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        for layer in LAYERS:
            if args.weights == "fp8":
                row = time_layer_fp8(layer, rows)
                res["rows"][f"{layer}@{rows}"] = row
                print(f"{layer:8s} rows {rows:4d}  " + "  ".join(f"{k[:-3]} {v:.1f}" for k, v in row.items()
                                                                if k.endswith("_us")), flush=True)
                for kind in ("fp8 ", "fp8/swap", "a8 ", "a8/swap", "bf16 ", "bf16/swap"):
                    top = sorted(((c, t) for c, t in row["candidates"].items() if c.startswith(kind)),
                                 key=lambda kv: kv[1])[:3]
                    if top:
                        print(f"    {kind:9s} top: " + ", ".join(f"{c} {t:.1f}" for c, t in top), flush=True)
                _save(args.out, res)
                continue
            row = time_layer(layer, rows)
            best = min(row["candidates"], key=row["candidates"].get)
            n, k = LAYERS[layer]
            picked = str(pick_config(rows, n // 2 if layer == "gate_up" else n, k, layer == "gate_up"))
            row.update(best=best, best_us=row["candidates"][best], picked=picked,
                       picked_us=row["candidates"].get(picked), weight_MB=n * k * 2 / 1e6)
            res["rows"][f"{layer}@{rows}"] = row
            top = sorted(row["candidates"].items(), key=lambda kv: kv[1])[:5]
            print(f"{layer:8s} rows {rows:3d}  cuBLAS {row['cublas_us']:7.1f} us  picked {picked} "
                  f"{row['picked_us'] or float('nan'):7.1f} us  top: " + ", ".join(f"{c} {t:.1f}" for c, t in top),
                  flush=True)
            _save(args.out, res)


def _save(path, res) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
