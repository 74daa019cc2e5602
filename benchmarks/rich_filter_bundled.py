"""Confidence-only filter (Learn2PD's) against the richer dense filter (confidence, margin, entropy, step
index), the shared per-position filter and a tuned threshold, all with EoTP, on the bundled model, at several
block lengths, in one run.

    python benchmarks/rich_filter_bundled.py --out runs/rich --test-problems 1000

For each block length: collect replay data once on ``--train-prompts`` training problems (the collection holds
every channel), train the three filters on it with the same seed (dense: hidden 128; shared: hidden 32; depth
1), then sweep the held-out test problems: ``steps``, threshold + EoTP at ``--taus``, and each filter + EoTP
at ``--filter-taus``. Writes the rows (JSONL, strategy ``learn2pd`` for the confidence-only filter,
``learn2pd-rich`` and ``learn2pd-shared`` for the others), the filters, a PNG of the frontier and a summary:
at matched accuracy (within ``--within`` points of the best ``steps``), the fewest forwards of each method.
"""

import argparse
import json
import os
import time

import torch

import l2pd.demo
from l2pd.collect import collect
from l2pd.demo.task import split
from l2pd.demo.tokenizer import prompt_text
from l2pd.filter import RICH_INPUTS
from l2pd.sweep import format_rows, pareto, plot, sweep
from l2pd.train import train_filter

# name -> (inputs, kind, hidden): Learn2PD's filter, the dense rich one, the shared per-position one
FAMILIES = {"learn2pd": (("confidence",), "dense", 128), "learn2pd-rich": (RICH_INPUTS, "dense", 128),
            "learn2pd-shared": (("confidence",), "shared", 32)}


def matched(rows: list[dict], within: float) -> dict:
    """Per method, the fewest forwards among rows within ``within`` points of the best ``steps`` accuracy."""
    best_steps = max(r["accuracy"] for r in rows if r["strategy"] == "steps")
    out = {"best_steps_accuracy": best_steps, "within_points": within}
    for name in ("threshold", *FAMILIES):
        ok = [r for r in rows if r["strategy"] == name and 100 * r["accuracy"] >= 100 * best_steps - within]
        out[name] = min(ok, key=lambda r: (r["mean_nfe"], -r["accuracy"])) if ok else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", default="32,64,128,256")
    ap.add_argument("--train-prompts", type=int, default=2000)
    ap.add_argument("--test-problems", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--taus", default="0.9,0.95,0.98,0.99,0.995,0.998,0.999", help="threshold taus")
    ap.add_argument("--filter-taus", default="0.5,0.8,0.9,0.95,0.98,0.99,0.995,0.998", help="filters' taus")
    ap.add_argument("--within", type=float, default=1.0, help="matched accuracy: points below the best steps")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = l2pd.demo.load(device=dev, filter=False)
    blocks = [int(b) for b in args.blocks.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    ftaus = [float(t) for t in args.filter_taus.split(",")]
    questions = [p.question for p in split("train", args.train_prompts)]
    prompts = tok([prompt_text(tok, q) for q in questions], add_special_tokens=False).input_ids
    test = split("test", args.test_problems)
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "train_prompts": args.train_prompts, "test_problems": len(test)}
    rows = []
    for block in blocks:
        t0 = time.time()
        data = os.path.join(args.out, f"collect{block}")
        collect(model, prompts, data, gen_length=256, block_length=block, batch_size=250, shard_size=500,
                progress=False)
        info[f"block{block}"] = {"collect_seconds": round(time.time() - t0, 1)}
        base = [dict(strategy="steps", threshold=None, eotp="off", block_length=block, cache="none")]
        base += [dict(strategy="threshold", threshold=t, eotp="accepted", block_length=block, cache="none")
                 for t in taus]
        rows += sweep(model, tok, test, base, batch_size=args.batch, progress=False)
        for name, (inputs, kind, hidden) in FAMILIES.items():
            flt = train_filter(data, hidden=hidden, depth=1, max_epochs=3000, threshold=0.99, device=dev, seed=0,
                               inputs=inputs, kind=kind, log=lambda *a: None)
            flt.meta["eotp"] = "accepted"
            flt.save_pretrained(os.path.join(args.out, f"filter{block}-{name}"))
            info[f"block{block}"][name] = {"val_loss": flt.meta["val_loss"], "epochs": flt.meta["epochs"],
                                           "train_rows": flt.meta["train_rows"]}
            configs = [dict(strategy="learn2pd", threshold=t, eotp="accepted", block_length=block, cache="none")
                       for t in ftaus]
            for r in sweep(model, tok, test, configs, filters={block: flt}, batch_size=args.batch, progress=False):
                rows.append({**r, "strategy": name})
        info[f"block{block}"]["seconds"] = round(time.time() - t0, 1)
        print(f"block {block} done in {time.time() - t0:.0f} s: " + json.dumps(info[f"block{block}"]), flush=True)
    rows = pareto(rows)
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    info["matched"] = matched(rows, args.within)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(info, f, indent=1)
    plot(rows, os.path.join(args.out, "frontier.png"))
    print(format_rows(rows))
    m = info["matched"]
    print(f"\nbest steps {100 * m['best_steps_accuracy']:.1f}%; within {args.within} points:")
    for name in ("threshold", *FAMILIES):
        r = m[name]
        print(f"  {name:<14}" + ("none" if r is None else
                                 f"{100 * r['accuracy']:.1f}% at {r['mean_nfe']:.2f} forwards (tau "
                                 f"{r['threshold']}, block {r['block_length']})"))


if __name__ == "__main__":
    main()
