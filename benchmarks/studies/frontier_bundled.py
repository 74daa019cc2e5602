"""The accuracy / forwards frontier on the bundled model: threshold + EoTP against learn2pd + EoTP at block
lengths 32, 64 and 128, each filter trained and tuned at its own block length.

    python benchmarks/studies/frontier_bundled.py --out runs/frontier --test-problems 1000

For each block length other than the shipped filter's (32): collect replay data on ``--train-prompts``
training problems and train a filter (the recipe of the shipped one). Every filter, the shipped one
included, is then tuned by ``l2pd.sweep.tune`` on ``--val-problems`` validation problems (fewest forwards
within 0.5 points of ``steps``, EoTP accepted). Then ``l2pd.sweep.sweep`` over the held-out test problems:
``steps`` and, at each tau, threshold + EoTP and learn2pd + EoTP, at each block length. Writes the filters,
the tuning figures and the sweep rows (JSONL) under OUT; prints the table.
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
from l2pd.filter import Filter
from l2pd.sweep import VAL_OFFSET, format_rows, sweep, tune
from l2pd.train import train_filter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--train-prompts", type=int, default=2000)
    ap.add_argument("--val-problems", type=int, default=500)
    ap.add_argument("--test-problems", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--taus", default="0.9,0.99,0.995,0.998,0.999")
    ap.add_argument("--tune-taus", default="0.9,0.95,0.98,0.99,0.995,0.998,0.999")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = l2pd.demo.load(device=dev, filter=False)
    shipped = Filter.from_pretrained(l2pd.demo.FILTER_DIR)
    blocks = [int(b) for b in args.blocks.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    filters = {}
    for block in blocks:
        t0 = time.time()
        if block == shipped.block_length:
            flt = shipped
        else:
            questions = [p.question for p in split("train", args.train_prompts)]
            prompts = tok([prompt_text(tok, q) for q in questions], add_special_tokens=False).input_ids
            data = os.path.join(args.out, f"collect{block}")
            collect(model, prompts, data, gen_length=256, block_length=block, batch_size=250, shard_size=500,
                    progress=False)
            flt = train_filter(data, hidden=128, depth=1, max_epochs=3000, threshold=0.99, device=dev,
                               log=lambda *a: None)
        val = split("train", args.val_problems, offset=VAL_OFFSET)
        point = tune(model, tok, flt, val, [float(t) for t in args.tune_taus.split(",")], eotp="accepted",
                     batch_size=args.batch, progress=False)
        flt.save_pretrained(os.path.join(args.out, f"filter{block}"))
        filters[block] = flt
        info[f"block{block}"] = {"seconds": time.time() - t0, "operating_point": point}
        print(f"block {block}: tau {point['tau']} -> {100 * point['accuracy']:.1f}% at {point['mean_nfe']:.2f} "
              f"forwards (validation steps {100 * point['steps_accuracy']:.1f}%)", flush=True)
        with open(os.path.join(args.out, "info.json"), "w") as f:
            json.dump(info, f, indent=1)
    configs = [dict(strategy="steps", threshold=None, eotp="off", block_length=b, cache="none") for b in blocks]
    for b in blocks:
        configs += [dict(strategy=s, threshold=t, eotp="accepted", block_length=b, cache="none")
                    for s in ("threshold", "learn2pd") for t in taus]
        tuned = filters[b].threshold
        if tuned not in taus:
            configs.append(dict(strategy="learn2pd", threshold=tuned, eotp="accepted", block_length=b, cache="none"))
    rows = sweep(model, tok, split("test", args.test_problems), configs, out=os.path.join(args.out, "sweep.jsonl"),
                 filters=filters, batch_size=args.batch, progress=False)
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
