"""How much of a batch-1 step is the gap between one kernel and the next, and what programmatic dependent
launch (PDL: ``l2pd_kernels.device.PDL``) takes off it.

    PYTHONPATH=.:benchmarks python benchmarks/studies/launch_overlap.py --out runs/launch_overlap.json

1. A chain, replayed from a CUDA graph: 24 times the residual norm then a 32-row product (LLaDA2.0-mini's
   output projection, 2048 x 2048, a different weight each time), per (norm, product) pair, for each PDL mode;
   and whether the replay's output equals the plain eager chain's.
2. The engine's graphed iteration at batch 1 (prompt 512 + 256, block 32, dual cache, one token per forward) on
   8B-shaped LLaDA and LLaDA2.0-mini-shaped random bf16 weights, for each PDL setting (``--variants``: a mode,
   and which kernels let the next launch early), the settings alternated
   ``--repeats`` times; medians of 50 graph replays each. Mode 0: plain launches; 1: each kernel waits for the
   one before it (``griddepcontrol.wait``) but may be launched before it ends; 2: each kernel also lets the next
   launch as soon as all its programs have started; ``auto``: what ``l2pd_kernels.device`` does by default
   (mode 2 inside the forward of a mixture-of-experts model, mode 1 elsewhere).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from decode_8b import EngineStep, build_shape
from harness import device_ms, floors, run_info, save

from l2pd_kernels import device, linear, rms_norm


@torch.no_grad()
def chain(modes: list[int], links: int = 24) -> list[dict]:
    x = torch.randn(32, 2048, dtype=torch.bfloat16, device="cuda")
    norm = torch.rand(2048, dtype=torch.bfloat16, device="cuda") + 0.5
    ws = [torch.randn(2048, 2048, dtype=torch.bfloat16, device="cuda") / 45 for _ in range(links)]
    def run():
        h = x
        for w in ws:
            h = linear(rms_norm(h, norm, 1e-6)[0], w)
        return h

    _set("0")
    want = run()  # plain launches, eager: what every mode's replay must give
    rows = []
    for mode in modes:
        _set(str(mode))
        run()  # compiles outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = run()
        g.replay()
        torch.cuda.synchronize()
        rows.append({"pdl": mode, "us_per_link": device_ms(g.replay, iters=50) * 1e3 / links,
                     "equal": bool(torch.equal(want, got))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _set(variant: str) -> None:
    """``auto`` (the shipped rule: early launches for mixture-of-experts models), ``MODE`` (0, 1, or 2: early
    launches everywhere), ``2/late=a+b`` (kernels a and b never let the next launch early) or ``2/only=a+b``
    (only they do)."""
    mode, _, rule = variant.partition("/")
    device.PDL = 2 if mode == "auto" else int(mode)
    device.EARLY = None if mode == "auto" else mode == "2"
    kind, _, names = rule.partition("=")
    chosen = set(names.split("+")) if names else set()
    device.LATE = chosen if kind == "late" else (KERNELS - chosen if kind == "only" else set())


KERNELS = {"attention", "attention_combine", "confidence", "confidence_merge", "decide", "quantize_rows", "moe_align",
           "moe_route", "moe_gate_up", "moe_down", "moe_combine", "rms_norm", "rope_qkv", "silu_mul", "skinny"}


@torch.no_grad()
def whole_step(family: str, modes: list[str], repeats: int) -> list[dict]:
    model = build_shape(family)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            _set(mode)
            torch.manual_seed(0)
            st = EngineStep(model, 1, "dual", "full", True, True)
            for _ in range(3):
                st.step()
            times[mode].append(device_ms(st.replay, iters=50))
            del st
            torch.cuda.empty_cache()
    rows = [{"family": family, "pdl": m, "replay_ms": statistics.median(times[m]), "runs": times[m]} for m in modes]
    for r in rows:
        print(json.dumps(r), flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default="chain,step")
    ap.add_argument("--modes", default="0,1,2", help="PDL modes of the chain")
    ap.add_argument("--variants", default="0,1,2", help="the step's: MODE, MODE/late=a+b or MODE/only=a+b")
    ap.add_argument("--families", default="8b,llada2-mini")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    modes = [int(m) for m in args.modes.split(",")]
    result = {**run_info(), "floors": floors()}
    if "chain" in args.sections:
        result["chain"] = chain(modes)
    if "step" in args.sections:
        variants = args.variants.split(",")
        result["step"] = [r for fam in args.families.split(",") for r in whole_step(fam, variants, args.repeats)]
    save(args.out, result)


if __name__ == "__main__":
    main()
