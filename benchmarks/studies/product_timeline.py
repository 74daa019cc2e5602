"""Where a batch-1 step's few-row products lose time against their bytes: every program of every product in the
engine's graphed iteration stamped with the GPU's global timer (at its start, after its wait for the kernel
ahead, at its end) and its SM, then per product kind (medians over the layers): the span from the first
program's release to the last program's end against the weight bytes at the copy rate, how long the programs
run and how their ends spread (the tail), and the time from one product's end to the next one's release (the
kernels between them: norms, attention, quantization).

    PYTHONPATH=.:benchmarks python benchmarks/studies/product_timeline.py --weights w8a8 --out runs/timeline.json

Random weights built on the GPU at LLaDA-8B shapes (``decode_8b.build_shape``), prompt 512 + 256, block 32, dual
cache, full refresh, strategy ``steps``, batch 1, the shipped launches (early launches on). The stamped kernels
run the products' own body (``skinny._skinny_body``) between the stamps; the stamps cost a few instructions a
program, and the replay time with them is printed next to the plain one.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
import triton
import triton.language as tl
from decode_8b import EngineStep, build_shape
from harness import device_ms, floors, run_info, save
from triton.language.extra.cuda import globaltimer, smid

from l2pd_kernels import skinny
from l2pd_kernels.device import pdl_wait


@triton.jit
def _stamp(st_ptr, t0, t1):
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    t2 = globaltimer()
    tl.store(st_ptr + pid * 4, t0)
    tl.store(st_ptr + pid * 4 + 1, t1)
    tl.store(st_ptr + pid * 4 + 2, t2)
    tl.store(st_ptr + pid * 4 + 3, smid().to(tl.int64))


@triton.jit
def _stamped_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm,
                    stride_wn, stride_om, st_ptr, GATE: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr, FP8: tl.constexpr, A8: tl.constexpr, SWAP: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    TMA: tl.constexpr = 0, PDL: tl.constexpr = 0):
    t0 = globaltimer()
    pdl_wait(PDL)
    t1 = globaltimer()
    skinny._skinny_body(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm,
                        stride_wn, stride_om, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr,
                        out_ptr, out_ptr, out_ptr, 0.0, 1, 1, 1, 1, GATE, EVEN_K, IEEE, UPCAST, FP8, A8, SWAP, SPLIT,
                        BLOCK_M, BLOCK_N, BLOCK_K, 0, 1, 0, 0, 0, 0, TMA)
    _stamp(st_ptr, t0, t1)


@triton.jit
def _stamped_rope_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm,
                         stride_wn, stride_om, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr, vo_ptr, qw_ptr,
                         kw_ptr, ks_ptr, vs_ptr, eps, S, H, HKV, T, st_ptr, GATE: tl.constexpr,
                         EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
                         A8: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr,
                         ROWS: tl.constexpr, NORM: tl.constexpr, KV8: tl.constexpr = 0, TMA: tl.constexpr = 0,
                         PDL: tl.constexpr = 0):
    t0 = globaltimer()
    pdl_wait(PDL)
    t1 = globaltimer()
    skinny._skinny_body(x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm,
                        stride_wn, stride_om, cos_ptr, sin_ptr, slots_ptr, rows_ptr, qo_ptr, ko_ptr, vo_ptr, qw_ptr,
                        kw_ptr, ks_ptr, vs_ptr, eps, S, H, HKV, T, GATE, EVEN_K, IEEE, UPCAST, FP8, A8, SWAP,
                        SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, 1, HALF, REST, ROWS, NORM, KV8, TMA)
    _stamp(st_ptr, t0, t1)


class Stamping:
    """Stands in for one of ``skinny``'s kernels: each launch runs the stamped twin with a stamp buffer of its
    own (int64 [programs, 4]); the launches made while a CUDA graph is captured are kept, in order."""

    def __init__(self, twin, kind: str, launches: list) -> None:
        self.twin, self.kind, self.launches = twin, kind, launches

    def __getitem__(self, grid):
        def launch(*args, **kw):
            n = grid[0] * grid[1] * grid[2]
            buf = torch.empty(n, 4, dtype=torch.int64, device="cuda")  # (no fill: no kernel in the graph)
            if torch.cuda.is_current_stream_capturing():
                w = getattr(args[1], "base", args[1])  # (a TMA descriptor's tensor)
                wbytes = w.numel() * w.element_size()
                self.launches.append({"kind": self.kind, "grid": tuple(grid), "M": int(args[7]), "N": int(args[8]),
                                      "K": int(args[9]), "gate": bool(kw.get("GATE")), "w_bytes": wbytes,
                                      "stamps": buf})
            return self.twin[grid](*args, st_ptr=buf, **kw)
        return launch


def _name(rec: dict, k_model: int) -> str:
    if rec["kind"] == "rope":
        return "q/k/v + RoPE"
    if rec["gate"]:
        return "gate/up + SiLU"
    if rec["N"] > 65536:
        return "LM head"
    return "down" if rec["K"] > k_model else "out"


def analyse(launches: list, k_model: int, copy_GBps: float) -> dict:
    rows, per_kind = [], defaultdict(list)
    prev_end = None
    res_ns = None
    for rec in launches:
        st = rec["stamps"].cpu()
        t0, t1, t2 = st[:, 0].double(), st[:, 1].double(), st[:, 2].double()
        every = torch.cat([t0, t1, t2]).unique()
        d = (every[1:] - every[:-1]).min().item() if every.numel() > 1 else None
        res_ns = d if res_ns is None or (d is not None and d < res_ns) else res_ns
        release, end = t1.min().item(), t2.max().item()
        dur = (t2 - t1)
        name = _name(rec, k_model)
        w_bytes = rec["w_bytes"]  # (a packed [gate; up] weight whole)
        row = {"kind": name, "programs": st.shape[0], "sms": int(st[:, 3].unique().numel()),
               "span_us": (end - release) / 1e3, "floor_us": w_bytes / copy_GBps / 1e3,
               "first_start_to_release_us": (release - t0.min().item()) / 1e3,
               "last_release_after_first_us": (t1.max().item() - release) / 1e3,
               "program_median_us": dur.median().item() / 1e3, "program_max_us": dur.max().item() / 1e3,
               "tail_us": (end - torch.quantile(t2, 0.5).item()) / 1e3,
               "gap_before_us": None if prev_end is None else (release - prev_end) / 1e3}
        prev_end = end
        rows.append(row)
        per_kind[name].append(row)
    kinds = {}
    for name, rs in per_kind.items():
        kinds[name] = {k: statistics.median(r[k] for r in rs if r[k] is not None)
                       for k in rs[0] if k not in ("kind",) and any(r[k] is not None for r in rs)}
        kinds[name]["launches"] = len(rs)
    return {"kinds": kinds, "launches": rows, "timer_resolution_ns": res_ns}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", choices=["bf16", "w8a8", "fp8"], default="w8a8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = build_shape("8b", args.weights)
    k_model = model.config.d_model if hasattr(model.config, "d_model") else model.config.hidden_size
    fl = floors()
    plain = EngineStep(model, 1, "dual", "full", True, True)
    for _ in range(3):
        plain.step()
    plain_ms = device_ms(plain.replay, iters=50)
    del plain
    launches: list = []
    real = skinny._skinny_kernel, skinny._skinny_rope_kernel
    skinny._skinny_kernel = Stamping(_stamped_kernel, "plain", launches)
    skinny._skinny_rope_kernel = Stamping(_stamped_rope_kernel, "rope", launches)
    try:
        st = EngineStep(model, 1, "dual", "full", True, True)
        for _ in range(3):  # the second run captures the graph, the third replays it
            st.step()
        stamped_ms = device_ms(st.replay, iters=50)
        st.replay()
        torch.cuda.synchronize()
    finally:
        skinny._skinny_kernel, skinny._skinny_rope_kernel = real
    res = analyse(launches, k_model, fl["copy_GBps"])
    print(f"replay: {plain_ms:.3f} ms plain, {stamped_ms:.3f} ms stamped; {len(launches)} product launches; "
          f"timer steps of {res['timer_resolution_ns']} ns; copy rate {fl['copy_GBps']:.0f} GB/s")
    cols = ["launches", "programs", "sms", "span_us", "floor_us", "program_median_us", "program_max_us", "tail_us",
            "last_release_after_first_us", "first_start_to_release_us", "gap_before_us"]
    print(f"{'product':16s} " + " ".join(f"{c[:14]:>14s}" for c in cols))
    for name, k in res["kinds"].items():
        print(f"{name:16s} " + " ".join(f"{k.get(c, float('nan')):14.2f}" for c in cols))
    total_span = sum(r["span_us"] for r in res["launches"])
    total_gap = sum(r["gap_before_us"] or 0 for r in res["launches"])
    total_floor = sum(r["floor_us"] for r in res["launches"])
    print(f"per step: products span {total_span:.0f} us (their bytes {total_floor:.0f} us), "
          f"between them {total_gap:.0f} us")
    save(args.out, {**run_info(), "weights": args.weights, "floors": fl, "replay_ms": plain_ms,
                    "stamped_replay_ms": stamped_ms, "timer_resolution_ns": res["timer_resolution_ns"],
                    "kinds": res["kinds"], "launches": res["launches"]})


if __name__ == "__main__":
    main()
