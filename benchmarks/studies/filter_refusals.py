"""Does a filter unmask the tokens the model is sure of? Decode with learn2pd + EoTP and count, at the first
forward of each block and at the later ones, the masked positions whose confidence is at least
``--confident`` and how many of them the filter unmasked in that forward.

    python benchmarks/studies/filter_refusals.py --model runs/model-hard \
        --filter runs/hard-frontier/filter128-learn2pd-shared --level hard --problems 16 --tau 0.99

A threshold at ``--confident`` unmasks all of them by definition; a filter that refuses many of them after the
first forward spends forwards that the threshold does not.
"""

import argparse

import torch
from _frontier import load_model

from l2pd.decode import generate
from l2pd.demo.task import split
from l2pd.evaluate import encode_prompts
from l2pd.filter import Filter
from l2pd.models import adapter_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--filter", default=None, help="filter folder (default: the bundled filter)")
    ap.add_argument("--level", choices=["base", "hard"], default="base")
    ap.add_argument("--problems", type=int, default=16, help="held-out problems, decoded as one batch")
    ap.add_argument("--tau", type=float, default=None, help="the filter's tau (default: its own)")
    ap.add_argument("--confident", type=float, default=0.995, help="confidence counted as sure")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dev)
    flt = Filter.from_pretrained(args.filter or "l2pd/demo/assets/filter")
    mask_id = adapter_for(model).mask_id
    problems = split("test" if args.level == "base" else "hard-test", args.problems)
    ids, mask = encode_prompts(tok, [p.question for p in problems], dev)
    log = []

    def on_step(s, step, token, prob, canvas, **_):
        log.append((s, step, prob.float().cpu(), (canvas[:, s : s + token.shape[1]] == mask_id).cpu()))

    out = generate(model, ids, mask, max_new_tokens=256, block_length=flt.block_length, strategy="learn2pd",
                   filter=flt, threshold=args.tau, eotp="accepted", on_step=on_step, return_dict_in_generate=True)
    counts = {"first": [0, 0], "later": [0, 0]}
    for i, (s, step, prob, masked) in enumerate(log):
        after = log[i + 1][3] if i + 1 < len(log) and log[i + 1][0] == s else torch.zeros_like(masked)
        sure = masked & (prob >= args.confident)
        c = counts["first" if step == 0 else "later"]
        c[0] += int((sure & ~after).sum())
        c[1] += int(sure.sum())
    print(f"{args.problems} problems, mean forwards per answer {out.nfe.float().mean():.1f}")
    for name, (done, total) in counts.items():
        share = f"{100 * done / total:.1f}%" if total else "-"
        print(f"{name} forward of a block: {done} of {total} sure masked positions unmasked ({share})")


if __name__ == "__main__":
    main()
