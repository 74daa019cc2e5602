"""Where an engine iteration's time goes at batch 1: the graph replay on the device against the wall time, and
the host's packing, planning and advancing, per forward of a whole ``generate``.

    PYTHONPATH=. python benchmarks/studies/engine_iteration.py --shape llada2-mini --tpfs 1,8
    PYTHONPATH=. python benchmarks/studies/engine_iteration.py --shape 8b --tpfs 1,8 --refresh full,window

Random bf16 weights built on the GPU; prompt 512 + 256, block 32, dual cache, strategy ``steps`` forcing the
tokens per forward; the engine's run-ahead off unless ``--run-ahead auto`` (with it, a replay is
launched before the last one is read back, and the gap is what is left). Each replay is timed by CUDA events
around it; the host stages by wrapping the engine's
methods (their own cost, a few microseconds per call, is in the wall time). Every configuration runs twice
after a warm-up, in alternation, and each run prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from decode_8b import build_shape  # noqa: E402

import l2pd.engine as engine  # noqa: E402
from l2pd.decode import generate  # noqa: E402

P, G, L = 512, 256, 32
STAGES = ("_plan", "_pack", "_run", "_advance")


def instrument() -> tuple[list, dict]:
    """CUDA events around every graph replay, and host seconds per engine stage."""
    replays: list = []
    host: dict = {}
    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(self):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay(self)
        b.record()
        replays.append((a, b))

    torch.cuda.CUDAGraph.replay = timed_replay
    for name in STAGES:
        fn = getattr(engine.Engine, name)

        def wrapped(self, *a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            out = _fn(self, *a, **k)
            host[_name] = host.get(_name, 0.0) + time.perf_counter() - t
            return out

        setattr(engine.Engine, name, wrapped)
    return replays, host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["8b", "llada2-mini"], default="llada2-mini")
    ap.add_argument("--tpfs", default="1,8", help="tokens per forward")
    ap.add_argument("--refresh", default="window", help="refresh modes (comma list)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--run-ahead", default="off", choices=["off", "auto"],
                    help="the engine's run-ahead (off: each replay waits for the host, as this study measured)")
    args = ap.parse_args()
    os.environ["L2PD_RUN_AHEAD"] = args.run_ahead  # (read when generate creates the model's engine)
    model = build_shape(args.shape)
    replays, host = instrument()
    ids = torch.randint(0, 100000, (1, P), device="cuda")
    kw = dict(max_new_tokens=G, block_length=L, strategy="steps", cache="dual", return_dict_in_generate=True)
    configs = [(r, t) for r in args.refresh.split(",") for t in map(int, args.tpfs.split(","))]
    with torch.no_grad():
        for refresh, tpf in configs:  # compile and capture every shape
            for _ in range(2):
                generate(model, ids, steps=G // tpf, refresh=refresh, **kw)
        for rep in range(args.repeats):
            for refresh, tpf in configs:
                replays.clear()
                host.clear()
                torch.cuda.synchronize()
                out = generate(model, ids, steps=G // tpf, refresh=refresh, **kw)
                torch.cuda.synchronize()
                ms = [a.elapsed_time(b) for a, b in replays]
                f = out.forwards
                row = {"shape": args.shape, "refresh": refresh, "tpf": tpf, "repeat": rep, "forwards": f,
                       "graphed": out.graphed, "wall_ms": out.seconds / f * 1e3, "replay_ms": sum(ms) / f,
                       "replay_median_ms": statistics.median(ms), "replay_max_ms": max(ms),
                       **{f"{k[1:]}_us": v / f * 1e6 for k, v in host.items()}}
                row["gap_us"] = (row["wall_ms"] - row["replay_ms"]) * 1e3
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
