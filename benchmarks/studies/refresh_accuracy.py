"""Accuracy of the tail and window refreshes next to the full refresh on the bundled model (held-out problems).

    python benchmarks/studies/refresh_accuracy.py --problems 500 --batch 500 --out runs/refresh.json

Strategies ``steps`` (one token per forward), learn2pd + EoTP (the shipped filter and tau) and threshold
0.995 + EoTP, with the prefix cache (refresh ``full``, ``tail``) and the dual cache (``full``, ``tail``,
``window``); 256 new tokens, block 32, greedy.
"""

import argparse
import json
import math

import torch

from l2pd.demo import load
from l2pd.demo.task import split
from l2pd.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load()
    problems = split("test", args.problems)
    rows = []
    configs = [("steps", {}), ("learn2pd", {"eotp": True}), ("threshold", {"threshold": 0.995, "eotp": True})]
    for name, extra in configs:
        for cache, refreshes in (("prefix", ("full", "tail")), ("dual", ("full", "tail", "window"))):
            for refresh in refreshes:
                r = evaluate(model, tok, problems, batch_size=args.batch, progress=False, max_new_tokens=256,
                             block_length=32, strategy=name, cache=cache, refresh=refresh, **extra)
                acc, n = r["accuracy"], r["problems"]
                row = {"strategy": name, **extra, "cache": cache, "refresh": refresh, "problems": n,
                       "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / n), "mean_nfe": r["mean_nfe"],
                       "seconds": r["seconds"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "rows": rows}, f, indent=1)
    print(f"\n{'config':<28} {'cache':<7} {'refresh':<7} {'accuracy':>14} {'NFE':>6}")
    for r in rows:
        cfg = r["strategy"] + (" + EoTP" if r.get("eotp") else "") + (f" {r['threshold']}" if "threshold" in r else "")
        print(f"{cfg:<28} {r['cache']:<7} {r['refresh']:<7} {100 * r['accuracy']:>7.1f} ± {100 * r['stderr']:.1f} "
              f"{r['mean_nfe']:>6.2f}")


if __name__ == "__main__":
    main()
