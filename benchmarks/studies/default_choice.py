"""Which decoder should a bundled model ship as its default? Every rule tuned on the same validation problems,
then each rule's pick scored on held-out test problems.

    python benchmarks/studies/default_choice.py --family llada --out runs/choice

On ``--val-problems`` validation problems (the training split's seeds from 900,000,000, unseen in training and
in the test split): ``steps`` at each block and, at each tau, threshold and margin (blocks ``--blocks``),
persistence (run length 2, the filter's block) and learn2pd with the bundled filter (its block), all with EoTP
``accepted``.
The rule that picks (``l2pd.sweep.choose``): fewest forwards per answer within ``--budget`` points of the best
``steps`` row. Each rule's own pick and the overall pick are then decoded on ``--test-problems`` test problems,
at 256 new tokens without a cache and at 1,024 with the dual cache. Rows go to OUT/{val,test256,test1024}.jsonl;
the tables are printed.
"""

import argparse
import os
import sys
import time

import torch

import l2pd.demo
from l2pd.demo.task import split
from l2pd.sweep import VAL_OFFSET, choose, format_rows, grid, sweep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _run(model, tok, problems, configs, out, batch, length, flt):
    t0 = time.time()
    rows = sweep(model, tok, problems, configs, out=out, filters={flt.block_length: flt}, batch_size=batch,
                 max_new_tokens=length, progress=False, log=lambda s: print(s, file=sys.stderr))
    print(f"{len(rows)} rows on {len(problems)} problems, {length} new tokens: {time.time() - t0:.0f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llada", choices=["llada", "dream"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--val-problems", type=int, default=1000)
    ap.add_argument("--test-problems", type=int, default=1000)
    ap.add_argument("--long-problems", type=int, default=1000, help="test problems at 1,024 new tokens")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--taus", default="0.9,0.95,0.98,0.985,0.99,0.995,0.998")
    ap.add_argument("--blocks", default="64,128")
    ap.add_argument("--budget", type=float, default=0.5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = l2pd.demo.load(device=dev, family=args.family)
    flt = model.l2pd_filter
    taus = [float(t) for t in args.taus.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    fb = flt.block_length
    configs = grid(["steps"], [], ["off"], sorted(set(blocks) | {fb}), ["none"])
    configs += grid(["threshold", "margin"], taus, ["accepted"], blocks, ["none"])
    configs += grid(["persistence"], taus, ["accepted"], [fb], ["none"], [2])
    configs += grid(["learn2pd"], taus, ["accepted"], [fb], ["none"])
    train = "train"
    val = split(train, args.val_problems, offset=VAL_OFFSET)
    rows = _run(model, tok, val, configs, os.path.join(args.out, "val.jsonl"), args.batch, 256, flt)
    print(format_rows(rows))
    picks = choose(rows, args.budget)
    print("validation picks (fewest forwards within", args.budget, "points of steps):")
    for name, r in picks.items():
        print(f"  {name:<12} {r['strategy']} tau {r['threshold']} block {r['block_length']}: "
              f"{100 * r['accuracy']:.1f}% at {r['mean_nfe']:.2f}")
    chosen = [{k: r[k] for k in ("strategy", "threshold", "eotp", "block_length", "cache", "persist")}
              for name, r in picks.items() if name != "overall"]
    test = split("test", args.test_problems)
    steps = [c for c in configs if c["strategy"] == "steps"]
    rows = _run(model, tok, test, steps + chosen, os.path.join(args.out, "test256.jsonl"), args.batch, 256,
                flt)
    print(format_rows(rows))
    long = [{**c, "cache": "dual"} for c in chosen]
    long_steps = [c for c in steps if c["block_length"] == fb]  # `steps` over 1,024 forwards: the filter's block only
    rows = _run(model, tok, test[: args.long_problems], long_steps + long,
                os.path.join(args.out, "test1024.jsonl"), args.batch, 1024, flt)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
