"""Wall time with and without compacting finished rows out of the step (bundled model, held-out problems).

    python benchmarks/studies/compaction_bundled.py --problems 500 --batch 500 --out runs/compaction.json

learn2pd + EoTP (the shipped filter and tau) and threshold 0.9 + EoTP, no cache and the dual cache, 256 and
1024 new tokens, block 32, greedy: rows end at different blocks, so compaction has rows to drop. Each
configuration is decoded once untimed (graph capture), then timed ``--repeats`` times; medians.
"""

import argparse
import json
import statistics

import torch

from l2pd.demo import load
from l2pd.demo.task import split
from l2pd.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--caches", default="none,dual")
    ap.add_argument("--gen-lengths", default="256,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load()
    problems = split("test", args.problems)
    rows = []
    for gen in (int(g) for g in args.gen_lengths.split(",")):
        for strategy, extra in (("learn2pd", {}), ("threshold", {"threshold": 0.9})):
            for cache in args.caches.split(","):
                for compact in (False, True):
                    kw = dict(batch_size=args.batch, progress=False, max_new_tokens=gen, block_length=32,
                              strategy=strategy, eotp=True, cache=cache, compact=compact, **extra)
                    evaluate(model, tok, problems, **kw)
                    runs = [evaluate(model, tok, problems, **kw) for _ in range(args.repeats)]
                    r = runs[0]
                    row = {"gen": gen, "strategy": strategy, "cache": cache, "compact": compact,
                           "accuracy": r["accuracy"], "mean_nfe": r["mean_nfe"],
                           "seconds": statistics.median(x["seconds"] for x in runs),
                           "seconds_all": [x["seconds"] for x in runs]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{'gen':>5} {'config':<18} {'cache':<5} {'accuracy':>8} {'NFE':>6} {'kept s':>7} {'compact s':>9} "
          f"{'x':>5}")
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"{a['gen']:>5} {a['strategy'] + ' + EoTP':<18} {a['cache']:<5} {100 * a['accuracy']:>7.1f}% "
              f"{a['mean_nfe']:>6.2f} {a['seconds']:>7.2f} {b['seconds']:>9.2f} {a['seconds'] / b['seconds']:>5.2f}"
              + ("" if a["accuracy"] == b["accuracy"] else f"  (compacted accuracy {100 * b['accuracy']:.1f}%)"))


if __name__ == "__main__":
    main()
