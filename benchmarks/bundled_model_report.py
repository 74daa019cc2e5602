"""Accuracy and convergence figures of a LLaDA-format model folder on the held-out word problems.

    python benchmarks/bundled_model_report.py --model l2pd/demo/assets/model --problems 500 --batch 500
"""

import argparse
import json

import torch
from transformers import PreTrainedTokenizerFast

from l2pd import LLaDAModelLM
from l2pd.demo.task import split
from l2pd.evaluate import convergence_profile, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--gen-lengths", default="256")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = LLaDAModelLM.from_pretrained(args.model, torch_dtype=dtype, device=args.device)
    tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    problems = split("test", args.problems)
    rows = []
    for gen in map(int, args.gen_lengths.split(",")):
        for strategy, extra in (("steps", {}), ("threshold", {"threshold": 0.9})):
            r = evaluate(model, tok, problems, batch_size=args.batch, progress=False, max_new_tokens=gen,
                         block_length=32, strategy=strategy, **extra)
            bad = [t for t, p in zip(r.pop("texts"), problems) if str(p.answer) not in t][:2]
            rows.append({"gen_length": gen, "strategy": strategy, **r})
            print(json.dumps(rows[-1]), "\nwrong examples:", json.dumps(bad), flush=True)
    prof = convergence_profile(model, tok, problems[:128], gen_length=256, block_length=32)
    print(json.dumps({"convergence": prof}), flush=True)


if __name__ == "__main__":
    main()
