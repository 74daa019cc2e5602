"""Launch configurations of the `confidence` kernel against the copy floor, measured in one run on a GPU.

    python benchmarks/confidence_sweep.py            # vocabulary 126464, block 32, bf16, batch 8/64
    python benchmarks/confidence_sweep.py --grid lanes --batches 1,8,64

Prints, per batch, the copy bandwidth (read + write of the logits) and every configuration's read bandwidth,
its share of the copy bandwidth and the host time per call; the configuration in
``l2pd_kernels.confidence.TUNING`` is marked. The best configuration has the highest worst-case share over
the batches.
"""

import argparse
import functools
import itertools
import json
import time

import torch
import triton.testing

from l2pd_kernels import reference as ref
from l2pd_kernels.confidence import TUNING, confidence


def _ms(fn) -> float:
    # replayed from a CUDA graph: the kernels' device time, without the ~0.1 ms of Python launch cost per call
    # that would otherwise dominate small batches (the decode loop replays a graph there too)
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--suppress", type=int, default=126336,
                    help="id excluded from the argmax, as the decode loop excludes the mask id (-1: none)")
    ap.add_argument("--grid", choices=("full", "lanes"), default="full",
                    help="full: both reductions; lanes: a finer grid of the per-lane kernel only")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--best", help="write the best configuration here (for L2PD_CONFIDENCE_TUNING)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the sweep needs a CUDA GPU")
    keys = ("lanes", "block_v", "num_warps", "stages", "programs_per_sm")
    if args.grid == "full":
        grid = list(itertools.product((False,), (2048, 4096), (4, 8), (1, 3), (4, 8)))
        grid += itertools.product((True,), (1024, 2048, 4096), (4, 8), (1, 3), (4, 8, 16))
    else:
        grid = [(False, 2048, 4, 1, 4)]
        grid += itertools.product((True,), (1024, 2048, 4096), (1, 2, 4), (4, 6), (1, 2, 4))
    suppress = None if args.suppress < 0 else args.suppress
    configs = [dict(zip(keys, c)) for c in grid]
    rows = []
    for B in map(int, args.batches.split(",")):
        torch.manual_seed(0)
        x = torch.randn(B, 32, args.vocab, device="cuda", dtype=torch.bfloat16) * 4
        nbytes = x.numel() * x.element_size()
        out = torch.empty_like(x)
        copy_ms = _ms(functools.partial(out.copy_, x))
        copy_bw = 2 * nbytes / copy_ms / 1e6
        tr, pr = ref.confidence(x, suppress=suppress)
        print(f"batch {B}: copy {copy_bw:,.0f} GB/s", flush=True)
        for cfg in configs:
            tk, pk = confidence(x, suppress=suppress, **cfg)
            if not torch.equal(tk, tr) or not torch.allclose(pk, pr, rtol=1e-5, atol=1e-7):
                raise SystemExit(f"config {cfg} disagrees with the reference")
            fn = functools.partial(confidence, x, suppress=suppress, **cfg)
            ms = _ms(fn)
            bw = nbytes / ms / 1e6
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):  # host time per call (few enough launches that the queue never blocks)
                fn()
            host_us = (time.perf_counter() - t0) / 50 * 1e6
            torch.cuda.synchronize()
            default = cfg == {k: TUNING[k] for k in keys}
            rows.append({"batch": B, **cfg, "ms": ms, "read_GBps": bw, "copy_GBps": copy_bw,
                         "share": bw / copy_bw, "host_us": host_us, "default": default})
            mark = "  <- default" if default else ""
            print(f"  {' '.join(f'{k}={v!s:<5}' for k, v in cfg.items())} {ms * 1e3:8.1f} us "
                  f"{bw:8,.0f} GB/s {100 * bw / copy_bw:5.1f}% host {host_us:5.1f} us{mark}", flush=True)
    worst = {}
    for r in rows:
        key = tuple(r[k] for k in keys)
        worst[key] = min(worst.get(key, 1e9), r["share"])
    top_key, top_share = max(worst.items(), key=lambda kv: kv[1])
    top = dict(zip(keys, top_key))
    print(f"best worst-case share over batches: {top} {100 * top_share:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "best": top}, f, indent=1)
    if args.best:
        with open(args.best, "w") as f:
            json.dump(top, f)


if __name__ == "__main__":
    main()
