"""Does prefetching the next product's weight into L2 during the gaps between products shorten a batch-1 step?

    PYTHONPATH=.:benchmarks python benchmarks/studies/l2_prefetch.py --weights-mb 8,16,32,48 --gaps-us 5,20,40 \
        --fractions 0.5,1 --out runs/l2_prefetch.json

1. The mechanism, alone: a few-row product (32 rows) of a weight of 8 to 48 MB after an idle gap (a sleeping
   kernel of 5 to 40 us), replayed from a CUDA graph over enough copies of the weight that none stays in L2
   between uses; with no prefetch, and with the first 25%, 50% or all of the weight prefetched on a side
   stream at the start of the gap (16 KB bulk prefetches, and all of it as 128-byte line prefetches), and one
   copy read again and again (in L2 where it fits). Reported: the product's time (replay minus the gaps alone).
2. The whole step, with prefetches in a captured forward's gaps (q/k/v -> output projection, output -> MLP,
   MLP -> next q/k/v, budgets in MB): ran from the tree of commit a8889f5, where ``l2pd.models.prefetch`` did
   this (its ``--sections step``); it was slower, so the forward no longer prefetches (``benchmarks/RESULTS.md``,
   "Prefetching weights into L2").
"""

from __future__ import annotations

import argparse
import json

import torch
from harness import device_ms, floors, run_info, save

from l2pd_kernels import linear
from l2pd_kernels.prefetch import prefetch_l2


def _gap(us: float) -> None:
    torch.cuda._sleep(int(us * 1.98e3))  # cycles at the H200's ~1.98 GHz boost clock: a gap, not a precise one


def _graph(ws: list, x: torch.Tensor, side: torch.cuda.Stream, gap: float, frac: float | None,
           product: bool = True, lines: bool = False) -> torch.cuda.CUDAGraph:
    """For each weight copy: a gap, then the product; ``frac``: its first bytes prefetched as the gap starts."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        main = torch.cuda.current_stream()
        for w in ws:
            if frac:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch_l2(w, int(frac * w.numel() * 2), lines=lines)
            _gap(gap)
            if product:
                linear(x, w)
        if frac:
            main.wait_stream(side)
    return g


@torch.no_grad()
def mechanism(mb_list: list[int], gaps: list[float], fractions: list[float], copies_mb: int = 600) -> list[dict]:
    x = torch.randn(32, 4096, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream(priority=-1)
    rows = []
    for mb in mb_list:
        n = mb * (1 << 20) // (4096 * 2)
        ws = [torch.randn(n, 4096, dtype=torch.bfloat16, device="cuda") for _ in range(max(4, copies_mb // mb))]
        for gap in gaps:
            for _ in range(2):  # compile outside the captures
                linear(x, ws[0])
                prefetch_l2(ws[0])
            torch.cuda.synchronize()
            gaps_only = device_ms(_graph(ws, x, side, gap, None, product=False).replay, iters=20)
            for frac, lines in [(None, False), *((f, False) for f in fractions), (1.0, True)]:
                t = device_ms(_graph(ws, x, side, gap, frac, lines=lines).replay, iters=20)
                rows.append({"weight_MB": mb, "gap_us": gap, "prefetched": frac or 0.0, "lines": lines,
                             "product_us": (t - gaps_only) * 1e3 / len(ws)})
                print(json.dumps(rows[-1]), flush=True)
        same = ws[:1] * len(ws)  # one copy again and again: the weight stays in L2 (where it fits)
        t = device_ms(_graph(same, x, side, gaps[0], None).replay, iters=20)
        gaps_only = device_ms(_graph(same, x, side, gaps[0], None, product=False).replay, iters=20)
        rows.append({"weight_MB": mb, "gap_us": gaps[0], "resident": True,
                     "product_us": (t - gaps_only) * 1e3 / len(ws)})
        print(json.dumps(rows[-1]), flush=True)
        del ws
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--weights-mb", default="8,32,48")
    ap.add_argument("--gaps-us", default="5,20")
    ap.add_argument("--fractions", default="0.25,0.5,1")
    args = ap.parse_args()
    result = {**run_info(), "floors": floors()}
    result["mechanism"] = mechanism([int(m) for m in args.weights_mb.split(",")],
                                    [float(g) for g in args.gaps_us.split(",")],
                                    [float(f) for f in args.fractions.split(",")])
    save(args.out, result)


if __name__ == "__main__":
    main()
