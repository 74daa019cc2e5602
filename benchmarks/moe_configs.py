"""Tile candidates of ``fused_moe`` at LLaDA2.0-mini shapes (256 experts, top-8, hidden 2048, expert width 512),
cold weights, against the read floor of the experts the tokens touch.

    PYTHONPATH=. python benchmarks/moe_configs.py --tokens 32,256,2048,16384 --out runs/moe_configs.json
    L2PD_MOE_TMA=1 PYTHONPATH=.:benchmarks python benchmarks/moe_configs.py --tokens 2048 --touched 169 \
        --heights 64,128 --tiles 128x64x8x4,256x64x8x3,128x128x8x3
    PYTHONPATH=.:benchmarks python benchmarks/moe_configs.py --tokens 2048 --heights 64 --down-only

``triton.testing.do_bench`` flushes the L2 cache before each call. For each token count: the default
(``pick_config``), the best gate/up and down candidate at each tile height, and the floor (touched experts'
bytes over the copy bandwidth measured here). ``l2pd_kernels.moe.CONFIGS`` is set from these figures.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton.testing
from harness import block_routing

from l2pd_kernels import fused_moe
from l2pd_kernels import reference as ref
from l2pd_kernels.moe import pick_config

E, K, D, INTER = 256, 8, 2048, 512
TILES = [(bn, bk, w, st) for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for w in (4, 8) for st in (3, 4)]
DOWN_TILES = [(bn, bk, w, st) for bn in (128, 256) for bk in (64, 128) for w in (4, 8) for st in (3, 4, 5)] + [
    (64, 64, 4, 4), (64, 128, 4, 4)]


def spread_routing(tokens: int, touched: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token on K distinct experts drawn at random from ``touched`` of the E (so about tokens * K / touched
    pairs each), with softmax weights."""
    chosen = torch.randperm(E, device="cuda")[:touched]
    picks = torch.rand(tokens, touched, device="cuda").argsort(1)[:, :K]
    return chosen[picks], torch.softmax(torch.randn(tokens, K, device="cuda"), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="32,256,2048,16384")
    ap.add_argument("--heights", default="16,32,64,128")
    ap.add_argument("--spread", type=float, default=0.3, help="token-to-token spread of router logits in a block")
    ap.add_argument("--touched", type=int, default=None,
                    help="route each token to 8 of this many experts at random instead of in blocks (a batch-64 "
                         "decode of random weights touched about 169 of 256 a layer)")
    ap.add_argument("--tiles", default=None,
                    help="comma list of block_n x block_k x warps x stages (default: the full grid, TILES)")
    ap.add_argument("--down-only", action="store_true",
                    help="sweep the down kernel's tile alone (the gate/up kernel keeps the default's), with "
                         "256-column tiles too")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tiles = TILES if args.tiles is None else [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    if args.down_only and args.tiles is None:
        tiles = DOWN_TILES
    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    w2 = torch.randn(E, D, INTER, device="cuda", dtype=torch.bfloat16) / INTER**0.5
    src = torch.empty(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / triton.testing.do_bench(lambda: dst.copy_(src)) / 1e6  # GB/s
    expert_bytes = 3 * D * INTER * 2
    results = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, D, device="cuda", dtype=torch.bfloat16)
        # a block of one row's masks routes alike (a decode step at batch 1 touched about 45 experts per layer
        # with random weights): tokens share most of their router logits, in groups of 32
        ids, w = block_routing(n, args.spread, E, K) if args.touched is None else spread_routing(n, args.touched)
        touched = int(ids.unique().numel())
        want = ref.fused_moe(x, w13, w2, ids, w).float()
        floor = touched * expert_bytes / bw / 1e6
        row = {"tokens": n, "touched": touched, "floor_ms": floor,
               "default": list(pick_config(n, K, E)),
               "default_ms": triton.testing.do_bench(lambda x=x, ids=ids, w=w: fused_moe(x, w13, w2, ids, w))}
        best = None
        for bm in [int(h) for h in args.heights.split(",")]:
            for tile in tiles:  # the same tile for both kernels
                for scan in ((False, True) if n * K <= 1024 else (False,)):
                    cfg = (bm, pick_config(n, K, E)[1], tile) if args.down_only else (bm, tile, tile)
                    try:
                        got = fused_moe(x, w13, w2, ids, w, config=cfg, scan=scan).float()
                        err = float((got - want).abs().max())
                        ms = triton.testing.do_bench(
                            lambda x=x, ids=ids, w=w, cfg=cfg, scan=scan: fused_moe(x, w13, w2, ids, w, config=cfg,
                                                                                    scan=scan))
                    except Exception as exc:  # out of shared memory and the like
                        print(f"skip {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, cfg, err, scan)
        row["best_ms"], row["best"], row["best_max_err"] = best[0], [best[1][0], *best[1][1:]], best[2]
        row["best_scan"] = best[3]
        row["default_over_floor"] = row["default_ms"] / floor
        row["best_over_floor"] = best[0] / floor
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bw, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
