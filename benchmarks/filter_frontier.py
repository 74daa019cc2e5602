"""Learned filters against a tuned threshold, all with EoTP, on a model trained on the bundled task, at several
block lengths, in one run: Learn2PD's confidence-only filter, the dense rich filter (confidence, margin,
entropy, step index) and the shared per-position filter.

    python benchmarks/filter_frontier.py --out runs/rich --test-problems 1000
    python benchmarks/filter_frontier.py --model runs/dream --families learn2pd,learn2pd-shared \
        --blocks 128,256 --test-problems 500 --out runs/dream_frontier
    python benchmarks/filter_frontier.py --model runs/model-hard --level hard --blocks 128 --out runs/hard_frontier

For each block length: collect replay data once on ``--train-prompts`` training problems (the collection holds
every channel), train each filter family on it with the same seed (dense: hidden 128; shared: hidden 32; depth
1), then sweep the held-out test problems: ``steps``, threshold + EoTP at ``--taus``, and each filter + EoTP
at ``--filter-taus``. With ``--long N`` the same configurations (dual cache; ``steps`` without) also run at
1,024 new tokens on N test problems. Writes the rows (JSONL, strategy ``learn2pd`` for the confidence-only
filter, ``learn2pd-rich`` and ``learn2pd-shared`` for the others), the filters, a PNG of the frontier and a
summary: at matched accuracy (within ``--within`` points of the best ``steps``), the fewest forwards of each
method. ``--level hard`` takes the training prompts and test problems from the task's hard level (for a model
trained with ``--hard-fraction``).
"""

import argparse
import json
import os
import time

import torch
from transformers import PreTrainedTokenizerFast

import l2pd
import l2pd.demo
from l2pd.collect import collect
from l2pd.demo.task import split
from l2pd.demo.tokenizer import prompt_text
from l2pd.filter import RICH_INPUTS
from l2pd.models import load_pretrained
from l2pd.sweep import format_rows, pareto, plot, sweep
from l2pd.train import train_filter

# name -> (inputs, kind, hidden): Learn2PD's filter, the dense rich one, the shared per-position one
FAMILIES = {"learn2pd": (("confidence",), "dense", 128), "learn2pd-rich": (RICH_INPUTS, "dense", 128),
            "learn2pd-shared": (("confidence",), "shared", 32)}


def matched(rows: list[dict], within: float, families) -> dict:
    """Per method, the fewest forwards among rows within ``within`` points of the best ``steps`` accuracy."""
    best_steps = max(r["accuracy"] for r in rows if r["strategy"] == "steps")
    out = {"best_steps_accuracy": best_steps, "within_points": within}
    for name in ("threshold", *families):
        ok = [r for r in rows if r["strategy"] == name and 100 * r["accuracy"] >= 100 * best_steps - within]
        out[name] = min(ok, key=lambda r: (r["mean_nfe"], -r["accuracy"])) if ok else None
    return out


def print_matched(m: dict, families, title: str) -> None:
    print(f"\n{title}: best steps {100 * m['best_steps_accuracy']:.1f}%; within {m['within_points']} points:")
    for name in ("threshold", *families):
        r = m[name]
        print(f"  {name:<16}" + ("none" if r is None else
                                 f"{100 * r['accuracy']:.1f}% at {r['mean_nfe']:.2f} forwards (tau "
                                 f"{r['threshold']}, block {r['block_length']}, cache {r['cache']})"))


def load_model(path: str | None, dev: str):
    """(patched model without a filter, tokenizer): a checkpoint folder, or the bundled LLaDA-format model."""
    if path is None:
        return l2pd.demo.load(device=dev, filter=False)
    model = load_pretrained(path, torch_dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev)
    return l2pd.patch(model), PreTrainedTokenizerFast.from_pretrained(path)


def configs(strategy: str, taus, block: int, cache: str) -> list[dict]:
    return [dict(strategy=strategy, threshold=t, eotp="accepted", block_length=block, cache=cache) for t in taus]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"filters to train, from {list(FAMILIES)}")
    ap.add_argument("--blocks", default="32,64,128,256")
    ap.add_argument("--policy", default="oracle", help="collection policy: oracle (Learn2PD's) or threshold:TAU")
    ap.add_argument("--level", choices=["base", "hard"], default="base",
                    help="the task's level: collection prompts and test problems from train/test or "
                         "hard-train/hard-test")
    ap.add_argument("--train-prompts", type=int, default=2000)
    ap.add_argument("--test-problems", type=int, default=1000)
    ap.add_argument("--long", type=int, default=0, help="also run at 1,024 new tokens on this many problems")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--taus", default="0.9,0.95,0.98,0.99,0.995,0.998,0.999", help="threshold taus")
    ap.add_argument("--filter-taus", default="0.5,0.8,0.9,0.95,0.98,0.99,0.995,0.998", help="filters' taus")
    ap.add_argument("--within", type=float, default=1.0, help="matched accuracy: points below the best steps")
    args = ap.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in FAMILIES for f in families):
        ap.error(f"--families {args.families!r}: expected names from {list(FAMILIES)}")
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dev)
    blocks = [int(b) for b in args.blocks.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    ftaus = [float(t) for t in args.filter_taus.split(",")]
    train_split, test_split = ("train", "test") if args.level == "base" else ("hard-train", "hard-test")
    questions = [p.question for p in split(train_split, args.train_prompts)]
    prompts = tok([prompt_text(tok, q) for q in questions], add_special_tokens=False).input_ids
    test = split(test_split, args.test_problems)
    long_test = split(test_split, args.long) if args.long else []
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "model": args.model or "bundled", "level": args.level, "policy": args.policy,
            "train_prompts": args.train_prompts, "test_problems": len(test), "long_problems": len(long_test)}
    rows, long_rows = [], []
    for block in blocks:
        t0 = time.time()
        data = os.path.join(args.out, f"collect{block}")
        collect(model, prompts, data, gen_length=256, block_length=block, batch_size=250, shard_size=500,
                progress=False, policy=args.policy)
        info[f"block{block}"] = {"collect_seconds": round(time.time() - t0, 1)}
        base = [dict(strategy="steps", threshold=None, eotp="off", block_length=block, cache="none")]
        rows += sweep(model, tok, test, base + configs("threshold", taus, block, "none"), batch_size=args.batch,
                      progress=False)
        if long_test:
            long_rows += sweep(model, tok, long_test, base + configs("threshold", taus, block, "dual"),
                               batch_size=args.batch, max_new_tokens=1024, progress=False)
        for name in families:
            inputs, kind, hidden = FAMILIES[name]
            flt = train_filter(data, hidden=hidden, depth=1, max_epochs=3000, threshold=0.99, device=dev, seed=0,
                               inputs=inputs, kind=kind, log=lambda *a: None)
            flt.meta["eotp"] = "accepted"
            flt.save_pretrained(os.path.join(args.out, f"filter{block}-{name}"))
            info[f"block{block}"][name] = {"val_loss": flt.meta["val_loss"], "epochs": flt.meta["epochs"],
                                           "train_rows": flt.meta["train_rows"]}
            for r in sweep(model, tok, test, configs("learn2pd", ftaus, block, "none"), filters={block: flt},
                           batch_size=args.batch, progress=False):
                rows.append({**r, "strategy": name})
            if long_test:
                for r in sweep(model, tok, long_test, configs("learn2pd", ftaus, block, "dual"),
                               filters={block: flt}, batch_size=args.batch, max_new_tokens=1024, progress=False):
                    long_rows.append({**r, "strategy": name})
        info[f"block{block}"]["seconds"] = round(time.time() - t0, 1)
        print(f"block {block} done in {time.time() - t0:.0f} s: " + json.dumps(info[f"block{block}"]), flush=True)
    rows = pareto(rows)
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    info["matched"] = matched(rows, args.within, families)
    plot(rows, os.path.join(args.out, "frontier.png"))
    print(format_rows(rows))
    print_matched(info["matched"], families, "256 new tokens")
    if long_rows:
        long_rows = pareto(long_rows)
        with open(os.path.join(args.out, "sweep_1024.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in long_rows)
        info["matched_1024"] = matched(long_rows, args.within, families)
        print("\n1,024 new tokens\n" + format_rows(long_rows))
        print_matched(info["matched_1024"], families, "1,024 new tokens")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
