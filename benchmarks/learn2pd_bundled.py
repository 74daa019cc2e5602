"""Learn2PD end to end on the bundled model: collect, train the filter, then the speed/quality table.

    python benchmarks/learn2pd_bundled.py --out runs/l2pd --train-prompts 4000 --test-problems 500

Writes the filter to OUT/filter, the collected shards to OUT/collect, and every figure to OUT/results.json.
"""

import argparse
import json
import os
import time
import warnings

import torch

import l2pd
import l2pd.demo
from l2pd.collect import collect
from l2pd.demo.task import split
from l2pd.demo.tokenizer import prompt_text
from l2pd.evaluate import compare_configs, encode_prompts, format_table
from l2pd.train import train_filter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--collect-dir", default=None, help="where the shards go (default OUT/collect)")
    ap.add_argument("--train-prompts", type=int, default=4000)
    ap.add_argument("--test-problems", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--gen-lengths", default="256,1024")
    ap.add_argument("--batch1-problems", type=int, default=20)
    ap.add_argument("--filter", default=None, help="use this filter folder instead of collecting and training")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    model, tok = l2pd.demo.load(device=dev, filter=False)

    if args.filter:
        from l2pd.filter import Filter

        flt = Filter.from_pretrained(args.filter)
    else:
        flt = collect_and_train(model, tok, args, results)
    results["filter"] = flt.meta
    l2pd.patch(model, filter=flt)
    run_tables(model, tok, args, results, dev)


def collect_and_train(model, tok, args, results):
    t0 = time.time()
    qs = [prompt_text(tok, p.question) for p in split("train", args.train_prompts)]
    prompts = tok(qs, add_special_tokens=False).input_ids
    data_dir = args.collect_dir or os.path.join(args.out, "collect")
    collect(model, prompts, data_dir, gen_length=256, block_length=32, batch_size=args.batch,
            shard_size=args.batch * 2, progress=False)
    results["collect_seconds"] = time.time() - t0
    print(f"collected {args.train_prompts} prompts in {results['collect_seconds']:.1f} s", flush=True)

    torch.set_num_threads(2)  # filter training figures as on a 2-core CPU
    flt = train_filter(data_dir, hidden=128, depth=1, device="cpu", threshold=0.9)
    flt.save_pretrained(os.path.join(args.out, "filter"))
    return flt


def run_tables(model, tok, args, results, dev):
    results["tables"] = []
    problems = split("test", args.test_problems)
    for gen in map(int, args.gen_lengths.split(",")):
        rows = compare_configs(model, tok, problems, gen, 32, args.batch, progress=False)
        results["tables"].append(rows)
        print(f"\ngen length {gen}, {len(problems)} problems, batch {args.batch}\n" + format_table(rows), flush=True)

    # tau sweep for learn2pd + EoTP (gen 256, no cache)
    sweep = []
    for tau in (0.7, 0.8, 0.9, 0.95, 0.98):
        strat = ((f"l2pd+EoTP tau {tau}", {"strategy": "learn2pd", "eotp": "accepted", "threshold": tau}),)
        sweep += compare_configs(model, tok, problems, 256, 32, args.batch, caches=("none",), strategies=strat,
                                 progress=False)
    for thr in (0.7, 0.8, 0.95):
        strat = ((f"threshold {thr}", {"strategy": "threshold", "threshold": thr}),)
        sweep += compare_configs(model, tok, problems, 256, 32, args.batch, caches=("none",), strategies=strat,
                                 progress=False)
    results["sweep"] = sweep
    print("\n" + "\n".join(f"{r['config']}: acc {100 * r['accuracy']:.1f}% nfe {r['mean_nfe']:.1f}" for r in sweep))

    # batch 1 wall time on a subset
    sub = problems[: args.batch1_problems]
    strategies = (("steps", {"strategy": "steps"}), ("learn2pd + EoTP", {"strategy": "learn2pd", "eotp": "accepted"}))
    rows = compare_configs(model, tok, sub, 256, 32, 1, strategies=strategies, progress=False)
    results["batch1"] = rows
    print(f"\nbatch 1, {len(sub)} problems\n" + format_table(rows), flush=True)

    # host syncs inside generate: one small read per step plus one per block
    if dev == "cuda":
        ids, mask = encode_prompts(tok, [sub[0].question], dev)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.generate(ids, mask, max_new_tokens=256, block_length=32, strategy="learn2pd", eotp=True,
                                 cache="dual", return_dict_in_generate=True)
        torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        results["syncs"] = {"forwards": out.forwards, "host_syncs": syncs}
        print(f"\nhost syncs in one generate: {syncs} for {out.forwards} forwards", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
