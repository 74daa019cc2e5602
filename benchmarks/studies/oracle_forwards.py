"""How few forwards a perfect filter would need: Learn2PD's oracle replay (unmask exactly the positions whose
guess already equals the final answer of ``steps``) on held-out problems, per block length.

    python benchmarks/studies/oracle_forwards.py --blocks 32,128,256 --problems 1000
    python benchmarks/studies/oracle_forwards.py --model l2pd/demo/assets/dream --blocks 128,256 --problems 500

The oracle is what a filter is trained to imitate, so its forwards per answer bound what any filter trained
this way can reach at ``steps``' accuracy. It has no EoTP: every block is decoded, so at block lengths below
the canvas its count includes the end-of-text blocks (one forward each); a single block (the canvas length)
is the figure to compare with EoTP rows.
"""

import argparse

import torch
from _frontier import load_model

from l2pd.decode import generate
from l2pd.demo.task import is_correct, split
from l2pd.evaluate import answer_texts, encode_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled LLaDA-format model)")
    ap.add_argument("--blocks", default="128,256")
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--gen-length", type=int, default=256)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dev)
    problems = split("test", args.problems)
    print(f"{args.model or 'bundled'}, {len(problems)} held-out problems, gen length {args.gen_length}, {dev}")
    for block in (int(b) for b in args.blocks.split(",")):
        forwards = correct = 0
        for i in range(0, len(problems), args.batch):
            batch = problems[i : i + args.batch]
            ids, mask = encode_prompts(tok, [p.question for p in batch], dev)
            kw = dict(max_new_tokens=args.gen_length, block_length=block, return_dict_in_generate=True)
            steps = generate(model, ids, mask, strategy="steps", **kw)
            target = steps.sequences[:, ids.shape[1] :]
            out = generate(model, ids, mask, strategy="oracle", target=target, **kw)
            forwards += out.nfe.sum().item()
            texts = answer_texts(tok, out.sequences, ids.shape[1])
            correct += sum(is_correct(t, p.answer) for t, p in zip(texts, batch))
        n = len(problems)
        print(f"block {block:>4}: oracle accuracy {100 * correct / n:.1f}% (= steps), {forwards / n:.3f} forwards "
              "per answer", flush=True)


if __name__ == "__main__":
    main()
