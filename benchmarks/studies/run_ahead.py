"""Does launching the next iteration before reading this one back (the engine's run-ahead) take the host's gap
out of ``generate``, and what does it cost where it guesses wrong?

    PYTHONPATH=.:benchmarks python benchmarks/studies/run_ahead.py --out runs/run_ahead.json

Random bf16 weights built on the GPU (LLaDA-8B and LLaDA2.0-mini shapes); prompt 512 + 256, block 32, dual
cache; strategy ``steps`` at 1 and 8 tokens per forward (the schedule alone decides, so ``auto`` runs ahead
on every forward but each block's last); ``--batches`` rows of one random prompt each. On one engine, kept by the
model, ``run_ahead`` off and ``auto`` alternate ``--repeats`` times; each run: the wall time per forward of 3
decodes (median), the row forwards launched ahead and wasted, and whether tokens and forwards equal the
first ``off`` run's. The weight-read floor is measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from decode_8b import build_shape, floors
from harness import run_info, save

from l2pd.decode import generate, release

P, G, L = 512, 256, 32
MODES = ("off", "auto")


@torch.no_grad()
def config(model, fl: dict, shape: str, batch: int, refresh: str, tpf: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, 126000, (batch, P), device="cuda")
    kw = dict(max_new_tokens=G, block_length=L, strategy="steps", steps=G // tpf, cache="dual", refresh=refresh,
              eotp=False, return_dict_in_generate=True)
    for _ in range(2):  # compile and capture every shape of the decode
        generate(model, ids, **kw)
    engine = model._l2pd_engine[1]
    runs = {m: [] for m in MODES}
    first = None
    for _ in range(repeats):
        for mode in MODES:
            engine.run_ahead = mode
            before = dict(engine.counters)
            outs = [generate(model, ids, **kw) for _ in range(3)]
            c = {k: engine.counters[k] - before[k] for k in ("ahead", "ahead_wasted", "forwards")}
            first = first or (outs[0].sequences.tolist(), outs[0].nfe.tolist())
            runs[mode].append({
                "ms_per_forward": statistics.median(o.seconds / o.forwards * 1e3 for o in outs),
                "ahead_per_row_forward": c["ahead"] / c["forwards"],
                "wasted_per_row_forward": c["ahead_wasted"] / c["forwards"],
                "same": all((o.sequences.tolist(), o.nfe.tolist()) == first for o in outs),
                "path": outs[-1].path})
    release(model)
    rows = []
    for mode in MODES:
        ms = [r["ms_per_forward"] for r in runs[mode]]
        med = statistics.median(ms)
        row = {"shape": shape, "batch": batch, "refresh": refresh, "tpf": tpf, "run_ahead": mode,
               "ms_per_forward": med, "runs_ms": ms, "over_floor": med / fl["floor_ms"],
               "tokens_per_s": batch * tpf / med * 1e3,
               "ahead_per_row_forward": runs[mode][-1]["ahead_per_row_forward"],
               "wasted_per_row_forward": runs[mode][-1]["wasted_per_row_forward"],
               "same_tokens_and_forwards": all(r["same"] for r in runs[mode]),
               "path": runs[mode][-1]["path"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="8b,llada2-mini")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--tpfs", default="1,8")
    ap.add_argument("--refresh", default="full,window", help="refreshes at LLaDA-8B shapes (LLaDA2.0-mini: window)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    result = {**run_info(), "rows": [], "floors": {}}
    for shape in args.shapes.split(","):
        model = build_shape(shape)
        fl = result["floors"][shape] = floors(model)
        refreshes = args.refresh.split(",") if shape == "8b" else ["window"]
        for batch in map(int, args.batches.split(",")):
            for refresh in refreshes:
                for tpf in map(int, args.tpfs.split(",")):
                    result["rows"] += config(model, fl, shape, batch, refresh, tpf, args.repeats)
        del model
        torch.cuda.empty_cache()
    save(args.out, result)


if __name__ == "__main__":
    main()
