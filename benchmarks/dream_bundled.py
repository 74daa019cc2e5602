"""Learn2PD on a small Dream-format model trained on the bundled task: collect, train the filter, then the
accuracy / forwards table on held-out problems.

    python -m l2pd.demo.train_model --family dream --out runs/dream --minutes 8
    python benchmarks/dream_bundled.py --model runs/dream --out runs/dream_l2pd --test-problems 500

Writes the filter to OUT/filter, the sweep rows to OUT/sweep.jsonl and prints the table.
"""

import argparse
import json
import os
import time

import torch
from transformers import PreTrainedTokenizerFast

import l2pd
from l2pd.collect import collect
from l2pd.demo.task import split
from l2pd.demo.tokenizer import prompt_text
from l2pd.models import load_pretrained
from l2pd.sweep import format_rows, sweep
from l2pd.train import train_filter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-prompts", type=int, default=2000)
    ap.add_argument("--test-problems", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--taus", default="0.99,0.995,0.998")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(args.model, torch_dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev)
    tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    l2pd.patch(model)
    t0 = time.time()
    questions = [p.question for p in split("train", args.train_prompts)]
    prompts = tok([prompt_text(tok, q) for q in questions], add_special_tokens=False).input_ids
    collect(model, prompts, os.path.join(args.out, "collect"), gen_length=256, block_length=32, batch_size=250,
            shard_size=500, progress=False)
    flt = train_filter(os.path.join(args.out, "collect"), device=dev, threshold=0.995, log=lambda *a: None)
    flt.meta["eotp"] = "accepted"
    flt.save_pretrained(os.path.join(args.out, "filter"))
    print(f"collect + train: {time.time() - t0:.1f} s", flush=True)
    taus = [float(t) for t in args.taus.split(",")]
    configs = [dict(strategy="steps", threshold=None, eotp="off", block_length=32, cache="none")]
    configs += [dict(strategy=s, threshold=t, eotp="accepted", block_length=32, cache="none")
                for s in ("threshold", "learn2pd") for t in taus]
    configs += [dict(strategy="learn2pd", threshold=taus[-1], eotp="accepted", block_length=32, cache="dual")]
    rows = sweep(model, tok, split("test", args.test_problems), configs, out=os.path.join(args.out, "sweep.jsonl"),
                 filters={32: flt}, batch_size=args.batch, progress=False)
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
