"""How well the softmax confidence predicts Learn2PD's label (the position's argmax already equals the token a
one-token-per-step decode ends with), on the oracle replay states a filter is trained on.

    python benchmarks/studies/label_calibration.py --prompts 16                                  # bundled model
    python benchmarks/studies/label_calibration.py --model runs/model-hard --level hard --prompts 16

Prints, per confidence bin, the masked positions in it and the share whose label is 1. A share well below the
bin's confidence means the label is stricter than the confidence: a filter that imitates it unmasks fewer
tokens than a threshold at the same tau, even where the threshold's extra tokens do not change the answer.
"""

import argparse
import json
import tempfile

import torch
from _frontier import load_model

from l2pd.collect import collect, load_shards
from l2pd.demo.task import split
from l2pd.demo.tokenizer import prompt_text

EDGES = (0.0, 0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0001)



def table(conf: torch.Tensor, label: torch.Tensor) -> list[dict]:
    rows = []
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        sel = (conf >= lo) & (conf < hi)
        n = int(sel.sum())
        rows.append({"confidence": f"[{lo:g}, {min(hi, 1):g}{']' if hi > 1 else ')'}", "positions": n,
                     "label_share": float(label[sel].float().mean()) if n else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--level", choices=["base", "hard"], default="base")
    ap.add_argument("--prompts", type=int, default=64, help="training-split prompts to replay")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dev)
    questions = [p.question for p in split("train" if args.level == "base" else "hard-train", args.prompts)]
    prompts = tok([prompt_text(tok, q) for q in questions], add_special_tokens=False).input_ids
    with tempfile.TemporaryDirectory() as out:
        collect(model, prompts, out, gen_length=256, block_length=args.block, batch_size=64, progress=False)
        data, _ = load_shards(out)
    masked = data["masked"].bool()
    rows = table(data["features"][masked].float(), data["labels"][masked].bool())
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.model or 'bundled'}, level {args.level}, {args.prompts} prompts, block {args.block}")
    print(f"{'confidence':<16}{'positions':>10}{'label = 1':>11}")
    for r in rows:
        share = "" if r["label_share"] is None else f"{100 * r['label_share']:.1f}%"
        print(f"{r['confidence']:<16}{r['positions']:>10}{share:>11}")


if __name__ == "__main__":
    main()
