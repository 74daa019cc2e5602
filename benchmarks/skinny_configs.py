"""Every tile candidate of the skinny matmul on LLaDA-8B's linear layers, against cuBLAS, with cold weights.

    python benchmarks/skinny_configs.py --rows 32,64 --out runs/skinny_configs.json

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
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        for layer in LAYERS:
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
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
