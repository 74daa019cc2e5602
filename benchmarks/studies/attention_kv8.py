"""The engine's attention over a bf16 K/V cache against an e4m3 one (``l2pd.quantize(model, kv_cache="fp8")``),
kernel time per layer, at LLaDA-8B shapes (32 heads of 128) and grouped-query ones (16 heads over 4 K/V heads).

    PYTHONPATH=.:benchmarks python benchmarks/studies/attention_kv8.py --out runs/attention_kv8.json

Each case is one layer's ``pool_attention`` as the engine launches it over each cache (its query tile, key split,
keys a loop and heads per program), over its own K/V for each of several layers (more than L2 holds) in one CUDA
graph: microseconds per layer (median of the replays / layers), next to the bf16 cache's read floor at the copy
rate of the same run, and the e4m3 result's relative error against exact attention over the values the e4m3 cache
holds (and, for scale, the bf16 cache's result against the same: mostly the quantization of K/V itself).
"""

from __future__ import annotations

import argparse

import torch
from harness import floors, graphed_us, run_info, save

from l2pd_kernels import reference as ref
from l2pd_kernels.attention import (
    KV8_BLOCK_N,
    POOL_MERGE_ROWS,
    pool_attention,
    pool_heads_per_program,
    pool_split_plan,
    pool_tiles,
)

# name: (rows, keys, layers, query tile, heads, K/V heads); 32 queries a row (a block)
CASES = {"b1-768": (1, 768, 32, 64, 32, 32), "b1-4096": (1, 4096, 16, 64, 32, 32),
         "b64-768": (64, 768, 6, 64, 32, 32), "gqa-b1-4096": (1, 4096, 16, 64, 16, 4),
         "gqa-b64-768": (64, 768, 6, 32, 16, 4)}
D, Q = 128, 32


def measure(name: str, copy_GBps: float, replays: int) -> dict:
    """One case: both caches' kernel time and error."""
    dev = torch.device("cuda")
    rows, keys, layers, block_m, heads, kv_heads = CASES[name]
    torch.manual_seed(0)
    q = torch.randn(1, rows * Q, heads, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    segs = [[r * Q, Q, r, keys] for r in range(rows)] + ([[Q, 0, 1, 1]] if rows == 1 else [])  # (padding)
    seg = torch.tensor(segs, device=dev)
    tiles = pool_tiles(seg.cpu(), block_m).to(dev)
    launch = {}
    for form, block_n in (("bf16", 64), ("e4m3", KV8_BLOCK_N)):  # as the engine launches each (``_pool_split``)
        splits, chunk = pool_split_plan(tiles.shape[0], heads, keys, dev, block_n, block_m=block_m, kv_heads=kv_heads)
        kw = dict(block_m=block_m, heads_per_program=pool_heads_per_program(heads, kv_heads, block_m, splits > 1))
        if splits > 1:
            kw.update(block_n=block_n, splits=splits, key_chunk=chunk, merge_rows=POOL_MERGE_ROWS)
        launch[form] = kw
    shape = (rows + 1, kv_heads, keys, D)
    kv = [[torch.randn(shape, device=dev, dtype=torch.bfloat16) for _ in range(2)] for _ in range(layers)]
    kv8 = [[ref.quantize_kv(t.float()) for t in pair] for pair in kv]

    def bf16(i: int) -> torch.Tensor:
        return pool_attention(q, *kv[i], seg, tiles, **launch["bf16"])

    def e4m3(i: int) -> torch.Tensor:
        (k, ks), (v, vs) = kv8[i]
        return pool_attention(q, k, v, seg, tiles, k_scale=ks, v_scale=vs, **launch["e4m3"])

    exact = ref.pool_attention(q.float(), *(ref.dequantize_kv(*t, torch.float32) for t in kv8[0]), seg)
    t16, t8 = graphed_us(bf16, layers, replays), graphed_us(e4m3, layers, replays)
    floor = 2 * rows * kv_heads * keys * D * 2 / copy_GBps / 1e3
    err = {f: float((fn(0).float() - exact).norm() / exact.norm()) for f, fn in (("bf16", bf16), ("e4m3", e4m3))}
    return {"case": name, "launch": launch, "bf16_us": t16, "e4m3_us": t8, "e4m3_over_bf16": t8 / t16,
            "bf16_floor_us": floor, "e4m3_rel_err": err["e4m3"], "bf16_rel_err": err["bf16"]}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--replays", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fl = floors()
    res = {**run_info(), "floors": fl, "rows": []}
    for name in args.cases.split(","):
        row = measure(name, fl["copy_GBps"], args.replays)
        print(f"{name:12s} bf16 {row['bf16_us']:8.2f} us a layer ({row['bf16_us'] / row['bf16_floor_us']:.2f}x "
              f"its floor)  e4m3 {row['e4m3_us']:8.2f} ({row['e4m3_over_bf16']:.2f}x bf16)  rel err e4m3 "
              f"{row['e4m3_rel_err']:.1e}, bf16 {row['bf16_rel_err']:.1e}", flush=True)
        res["rows"].append(row)
        torch.cuda.empty_cache()
        save(args.out, res)


if __name__ == "__main__":
    main()
