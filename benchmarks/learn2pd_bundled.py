"""Learn2PD end to end on the bundled model: collect, train the filter, then the speed/quality table.

    python benchmarks/learn2pd_bundled.py --out runs/l2pd --train-prompts 4000 --test-problems 500

Order: collect and train the filter (or take --filter); choose tau on a validation set drawn from the
training split (never seen in training: seeds far above the training range) as the lowest-NFE tau whose
accuracy is within 1 point of `steps` there; then the test tables at 256 and 1024 tokens with that tau,
batch-1 wall times and the host-sync count. Writes the filter (with the chosen tau) to OUT/filter, the shards
to OUT/collect, and every figure to OUT/results.json, rewritten after each part.
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
    ap.add_argument("--model", default=None, help="a LLaDA-format model folder (default: the bundled model)")
    ap.add_argument("--filter-device", default="cpu", help="where the filter trains (cpu: 2 threads)")
    ap.add_argument("--val-problems", type=int, default=500, help="validation problems for choosing tau")
    ap.add_argument("--taus", default="0.9,0.95,0.98,0.99,0.995,0.998,0.999")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    if args.model:
        from transformers import PreTrainedTokenizerFast

        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        model = l2pd.patch(l2pd.LLaDAModelLM.from_pretrained(args.model, torch_dtype=dtype, device=dev))
        tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    else:
        model, tok = l2pd.demo.load(device=dev, filter=False)

    if args.filter:
        from l2pd.filter import Filter

        flt = Filter.from_pretrained(args.filter)
    else:
        flt = collect_and_train(model, tok, args, results)
    results["filter"] = flt.meta
    l2pd.patch(model, filter=flt)
    _dump(args, results)
    choose_tau(model, tok, flt, args, results)
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

    t0 = time.time()
    if args.filter_device == "cpu":
        torch.set_num_threads(2)  # filter training figures as on a 2-core CPU
    flt = train_filter(data_dir, hidden=128, depth=1, device=args.filter_device, threshold=0.9)
    results["filter_train_seconds"] = time.time() - t0
    results["filter_device"] = args.filter_device
    flt.save_pretrained(os.path.join(args.out, "filter"))
    return flt


def _dump(args, results):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


def choose_tau(model, tok, flt, args, results):
    """The lowest-NFE tau whose validation accuracy is within 1 point of `steps` (else the most accurate)."""
    val = split("train", args.val_problems, offset=900_000_000)
    strategies = [("steps", {"strategy": "steps"})]
    strategies += [(f"l2pd+EoTP tau {t}", {"strategy": "learn2pd", "eotp": "accepted", "threshold": float(t)})
                   for t in args.taus.split(",")]
    rows = compare_configs(model, tok, val, 256, 32, args.batch, caches=("none",), strategies=strategies,
                           progress=False)
    base, cands = rows[0], rows[1:]
    ok = [r for r in cands if r["accuracy"] >= base["accuracy"] - 0.01]
    best = min(ok, key=lambda r: r["mean_nfe"]) if ok else max(cands, key=lambda r: r["accuracy"])
    tau = float(best["config"].rsplit(" ", 1)[1])
    results["validation"] = {"rows": rows, "chosen_tau": tau}
    print("\nvalidation (train split, unseen seeds)\n" + format_table(rows) + f"\nchosen tau {tau}", flush=True)
    flt.threshold = tau
    flt.save_pretrained(os.path.join(args.out, "filter"))
    _dump(args, results)


def run_tables(model, tok, args, results, dev):
    results["tables"] = []
    problems = split("test", args.test_problems)
    l2 = ("learn2pd + EoTP", {"strategy": "learn2pd", "eotp": "accepted"})
    for gen in map(int, args.gen_lengths.split(",")):
        if gen <= 256:
            rows = compare_configs(model, tok, problems, gen, 32, args.batch, progress=False)
        else:  # long canvases: the uncached baseline is slow, so only the rows the comparison needs
            rows = compare_configs(model, tok, problems, gen, 32, args.batch, caches=("none", "dual"),
                                   strategies=(("steps", {"strategy": "steps"}),
                                               ("threshold 0.9", {"strategy": "threshold", "threshold": 0.9}), l2),
                                   progress=False)
        results["tables"].append(rows)
        print(f"\ngen length {gen}, {len(problems)} problems, batch {args.batch}\n" + format_table(rows), flush=True)
        _dump(args, results)

    # batch 1 wall time on a subset
    sub = problems[: args.batch1_problems]
    rows = compare_configs(model, tok, sub, 256, 32, 1, strategies=(("steps", {"strategy": "steps"}), l2),
                           progress=False)
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
    _dump(args, results)


if __name__ == "__main__":
    main()
