"""Where two settings of a batch-1 step differ, kernel by kernel: the engine's graphed iteration replayed under
the torch profiler in each setting, its kernels grouped by name and grid (a few-row product's grid names it:
its output tiles, row tiles and K split; where one such kernel runs m times a layer, as two products of one
width do, its launches are told apart by their order in the layer: ``#0``, ``#1``), device microseconds per
step.

    PYTHONPATH=.:benchmarks python benchmarks/studies/step_kernels.py --family dream-7b --settings no-tma,now

Settings are ``step_rules.py``'s. Random weights built on the GPU (``decode_8b.build_shape``), prompt 512 + 256,
block 32, dual cache, full refresh (window at LLaDA2.0-mini's shapes), strategy ``steps``, batch 1.
``--iteration refresh``: the refresh iteration instead of the cached step (with the full refresh, a forward over
the whole 768-position canvas that also decodes; one such forward a block).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from functools import partial

import torch
from decode_8b import EngineStep, P, build_shape
from harness import device_ms, run_info, save
from step_rules import SETTINGS, apply


def kernels(st: EngineStep, layers: int, replays: int = 5) -> dict[str, list[float]]:
    """(name, grid[, order in the layer]) -> [device us per step, launches per step] over ``replays`` graph
    replays of a model of ``layers`` layers."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            st.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    launches: list[tuple[str, float]] = [
        (f"{ev['name'][:40]} {tuple(ev.get('args', {}).get('grid', ()))}", ev["dur"])
        for ev in sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])]
    per_step = defaultdict(int)
    for key, _ in launches:
        per_step[key] += 1
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    seen: dict[str, int] = defaultdict(int)
    for key, dur in launches:
        m = per_step[key] // replays // layers
        name = f"{key} #{seen[key] % m}" if m > 1 and per_step[key] // replays == m * layers else key
        seen[key] += 1
        out[name][0] += dur / replays
        out[name][1] += 1 / replays
    return dict(out)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="8b", help="8b, llada2-mini or dream-7b")
    ap.add_argument("--settings", default="no-tma,now", help="two or more of " + ", ".join(SETTINGS))
    ap.add_argument("--weights", choices=["bf16", "w8a8", "fp8"], default="bf16",
                    help="w8a8 / fp8: l2pd.quantize the model first")
    ap.add_argument("--iteration", choices=["step", "refresh"], default="step",
                    help="the cached step (default) or the first forward of a block (its refresh)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    settings = args.settings.split(",")
    model = build_shape(args.family, args.weights)
    refresh = "window" if args.family == "llada2-mini" else "full"
    res = {**run_info(), "family": args.family, "weights": args.weights, "iteration": args.iteration,
           "settings": {}}
    layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layers
    for s in settings:
        apply(s)
        st = EngineStep(model, 1, "dual", refresh, True, True)
        run = st.step if args.iteration == "step" else partial(st.refresh, None if refresh == "full" else P)
        for _ in range(3):  # the third run replays the graph the second captured
            run()
        res["settings"][s] = {"replay_ms": device_ms(st.replay, iters=50),
                              "kernels": kernels(st, layers)}
        del st
        torch.cuda.empty_cache()
    apply("now")
    keys = sorted({k for v in res["settings"].values() for k in v["kernels"]},
                  key=lambda k: -max(v["kernels"].get(k, [0])[0] for v in res["settings"].values()))
    print("replay ms: " + ", ".join(f"{s} {v['replay_ms']:.3f}" for s, v in res["settings"].items()))
    print(f"{'kernel (grid)':60s} " + " ".join(f"{s:>14s}" for s in settings) + "   launches")
    for k in keys[:30]:
        vals = [res["settings"][s]["kernels"].get(k, [0.0, 0.0]) for s in settings]
        launches = "/".join(f"{v[1]:.0f}" for v in vals)
        print(f"{k[:60]:60s} " + " ".join(f"{v[0]:14.1f}" for v in vals) + "   " + launches)
    save(args.out, res)


if __name__ == "__main__":
    main()
