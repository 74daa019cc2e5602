"""Is there room for a threshold that moves with the step, the position or the guess's history? A confidence
threshold c0 + a * f, for one per-position input f of the history filter (the step index, the masks before the
position, the run length of its guess, its index in the block), against the single tuned threshold and margin,
all with EoTP.

    PYTHONPATH=. python benchmarks/studies/scheduled_threshold.py --model runs/model-hard --level hard \
        --out runs/scheduled

Each rule is a history filter with hand-set weights (accept when confidence > c0 + a * f: hidden units
relu(confidence) and relu(f), output 1000 * (confidence - c0 - a * f), tau 0.5), so it decodes through
``generate`` like any filter. The grid runs on validation problems; per input, the selection rule of
``benchmarks/learned_decoder.py`` (fewest forwards within ``--within`` points of the best ``steps`` on
validation) picks (c0, a), and the picks run on the held-out test problems. If a rule of this family needs far
fewer forwards than the single threshold, a learned per-step or per-position tau has room; if not, it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from filter_frontier import load_model  # noqa: E402
from learned_decoder import VAL_OFFSET, configs, pick, print_picks, scored_picks  # noqa: E402

from l2pd.demo.task import split  # noqa: E402
from l2pd.filter import Filter  # noqa: E402
from l2pd.sweep import format_rows  # noqa: E402
from l2pd.sweep import sweep as run_sweep  # noqa: E402
from l2pd_kernels.reference import HISTORY_FEATURES  # noqa: E402

# the input and the slopes a tried for it (each input's range differs: step / block is small)
GRID = {"step": (-0.2, -0.05, 0.05, 0.2), "masked_before": (-0.02, -0.005, 0.005, 0.02),
        "run": (-0.02, -0.005, 0.005, 0.02), "position": (-0.02, -0.005, 0.005, 0.02)}
SCALE = 1000.0


def scheduled(block: int, feature: str, c0: float, a: float) -> Filter:
    """A history filter that accepts exactly where confidence > c0 + a * feature (tau 0.5)."""
    flt = Filter(block, 16, 1, 0.5, kind="history")  # (two units used; 16 wide like the kernels' smallest tile)
    first, last = flt.layers
    with torch.no_grad():
        for p in flt.parameters():
            p.zero_()
        first.weight[0, HISTORY_FEATURES.index("confidence")] = 1.0
        first.weight[1, HISTORY_FEATURES.index(feature)] = 1.0
        last.weight[0, :2] = torch.tensor([SCALE, -SCALE * a])
        last.bias.fill_(-SCALE * c0)
    flt.meta["eotp"] = "accepted"
    return flt.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--level", choices=["base", "hard"], default="hard")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--c0", default="0.98,0.99,0.995,0.998")
    ap.add_argument("--features", default=",".join(GRID))
    ap.add_argument("--val-problems", type=int, default=500)
    ap.add_argument("--test-problems", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--within", type=float, default=1.0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dev)
    val_split, test_split = ("train", "test") if args.level == "base" else ("hard-train", "hard-test")
    val = split(val_split, args.val_problems, offset=VAL_OFFSET)
    test = split(test_split, args.test_problems)
    B = args.block
    kw = dict(batch_size=args.batch, progress=False, max_new_tokens=256)
    c0s = [float(c) for c in args.c0.split(",")]
    base = [dict(strategy="steps", threshold=None, eotp="off", block_length=B, cache="none")]
    rules = base + configs("threshold", [0.95, 0.98, 0.99, 0.995, 0.998], B) + \
        configs("margin", [0.95, 0.98, 0.99, 0.995, 0.998], B)

    def decode(problems, tag, chosen=None):
        rows = run_sweep(model, tok, problems, rules, out=os.path.join(args.out, f"{tag}-rules.jsonl"), **kw)
        for feature in args.features.split(","):
            for c0 in c0s:
                for a in GRID[feature]:
                    if chosen is not None and (feature, c0, a) not in chosen:
                        continue
                    flt = scheduled(B, feature, c0, a)
                    for r in run_sweep(model, tok, problems, configs("learn2pd", [0.5], B), filters={B: flt},
                                       out=os.path.join(args.out, f"{tag}-{feature}-{c0}-{a}.jsonl"), **kw):
                        rows.append({**r, "strategy": feature, "threshold": c0, "slope": a})
        return rows

    val_rows = decode(val, "val")
    methods = ["threshold", "margin"] + args.features.split(",")
    picks = pick(val_rows, args.within, methods)
    chosen = {(m, p["threshold"], p["slope"]) for m, p in picks.items() if m in GRID and p}
    test_rows = decode(test, "test", chosen)
    summary = {"model": args.model, "level": args.level, "block": B, "best_steps_val": picks["best_steps"],
               "picks": scored_picks(picks, test_rows, methods, {"c0_or_tau": "threshold", "slope": "slope"})}
    for name, rows in (("val", val_rows), ("test", test_rows)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    shown = [{**r, "strategy": f"{r['strategy']} {r['slope']:+g}"} if "slope" in r else r for r in val_rows]
    print("validation\n" + format_rows(shown))
    print_picks(summary["picks"], args.within)


if __name__ == "__main__":
    main()
