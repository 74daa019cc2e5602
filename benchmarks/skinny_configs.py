"""Every tile candidate of the skinny matmul on LLaDA-8B's linear layers, against cuBLAS, with cold weights.

    python benchmarks/skinny_configs.py --rows 32,64 --out runs/skinny_configs.json
    python benchmarks/skinny_configs.py --weights fp8 --rows 32,64,768,2048 --out runs/skinny_fp8.json
    python benchmarks/skinny_configs.py --splits --rows 32 --out runs/skinny_split.json
    python benchmarks/skinny_configs.py --splits --occupancy --rows 32 --kinds bf16,a8 --jobs 8

``--occupancy`` (with ``--splits``) times tiles light enough in shared memory for several programs per SM.
``--splits`` times the tiles around ``pick_config``'s with K shared by 1, 2, 4 or 8 programs per output tile
(bf16, FP8 weights widened, e4m3 activations; LLaDA-8B's layers and LLaDA2.0-mini's), replayed from a CUDA graph
that runs the product on enough distinct copies of the weight to overflow the L2 cache, back to back as in a
step: no host cost, every weight from HBM.

With ``--weights fp8`` the weights are e4m3 with per-channel scales (``l2pd.quantize``); the baselines are
bf16 cuBLAS on the same shapes, the FP8 path of ``l2pd_kernels.linear_fp8`` as it stands, and ``linear_w8a8``,
cuBLAS FP8 (``torch._scaled_mm``, per-token activation scales, without the quantization), and the skinny
candidates (up to 64 rows) reading the FP8 bytes: widened in registers, and (``a8``) against e4m3 activations.

``triton.testing.do_bench`` flushes the L2 cache before each call, so every weight comes from HBM as in a
forward (a 32 MB weight would otherwise stay in the 50 MB L2 between calls). Prints, per layer and row
count, cuBLAS (``F.linear``; plus ``silu_mul`` for gate/up), the best candidate and what ``pick_config``
chooses; ``l2pd_kernels.skinny.pick_config`` is set from these figures.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton.testing
from harness import device_ms

from l2pd_kernels import silu_mul
from l2pd_kernels.skinny import _launch, pick_config

LAYERS = {"qkv": (12288, 4096), "out": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
          "head": (126464, 4096)}
CANDIDATES = [(bn, bk, 4, st) for bn in (16, 32, 64, 128) for bk in (128, 256) for st in (3, 4, 6)] + [
    (128, 128, 8, 4), (128, 256, 8, 3), (64, 256, 8, 4)]
FP8_CANDIDATES = [(bn, bk, w, st) for bn in (16, 32, 64, 128) for bk in (256, 512) for w in (4, 8)
                  for st in (3, 4)]
BF16_SWAP_CANDIDATES = [(bn, bk, 4, st) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]


def time_layer_fp8(layer: str, rows: int) -> dict:
    """FP8 weights: bf16 cuBLAS, the current ``linear_fp8``, cuBLAS FP8 and the skinny candidates, in us."""
    from l2pd_kernels import linear_fp8, linear_w8a8, quantize_rows
    from l2pd_kernels.reference import quantize_fp8

    n, k = LAYERS[layer]
    gate = layer == "gate_up"
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    w8, scale = quantize_fp8(w)
    n_out = n // 2 if gate else n
    out = torch.empty(rows, n_out, device="cuda", dtype=torch.bfloat16)
    bench = lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50)  # noqa: E731
    row = {"cublas_bf16_us": bench(lambda: F.linear(x, w)), "linear_fp8_us": bench(lambda: linear_fp8(x, w8, scale)),
           "linear_w8a8_us": bench(lambda: linear_w8a8(x, w8, scale)),
           "quantize_rows_us": bench(lambda: quantize_rows(x)), "candidates": {}}
    x8, xs = quantize_rows(x)
    wt, ws = w8.t(), scale[None, :]
    try:
        row["scaled_mm_us"] = bench(lambda: torch._scaled_mm(x8, wt, xs[:, None], ws, out_dtype=torch.bfloat16))
    except Exception as e:  # a build or shape cuBLAS FP8 does not take
        row["scaled_mm_error"] = repr(e)[:200]
    if rows <= 64:  # widened FP8 weights, e4m3 activations, and bf16 weights; each as x @ w.T and w @ x.T
        variants = [("fp8", cfg, dict(scale=scale)) for cfg in FP8_CANDIDATES]
        variants += [("a8", cfg, dict(scale=scale, x_scale=xs)) for cfg in FP8_CANDIDATES]
        variants += [("bf16", cfg, {}) for cfg in BF16_SWAP_CANDIDATES]
        for kind, cfg, kw in variants:
            for swap in (False, True):
                a = x8 if kind == "a8" else x
                b = w if kind == "bf16" else w8
                try:
                    ms = triton.testing.do_bench(lambda a=a, b=b, cfg=cfg, swap=swap, kw=kw: _launch(
                        a, b, out, n_out, gate, cfg, swap=swap, **kw),
                                                 warmup=10, rep=50)
                except Exception:  # needs more shared memory than the GPU has
                    continue
                row["candidates"][f"{kind}{'/swap' if swap else ''} {cfg}"] = 1e3 * ms
    return row


def time_layer(layer: str, rows: int) -> dict:
    """cuBLAS and every candidate on one layer's product, in microseconds."""
    n, k = LAYERS[layer]
    gate = layer == "gate_up"
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    n_out = n // 2 if gate else n
    out = torch.empty(rows, n_out, device="cuda", dtype=torch.bfloat16)

    def base():
        return silu_mul(*F.linear(x, w).chunk(2, -1)) if gate else F.linear(x, w)

    row = {"cublas_us": 1e3 * triton.testing.do_bench(base, warmup=10, rep=50), "candidates": {}}
    for cfg in CANDIDATES:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: _launch(x, w, out, n_out, gate, cfg), warmup=10, rep=50)
        except Exception:  # needs more shared memory than the GPU has
            continue
        row["candidates"][str(cfg)] = 1e3 * ms
    return row


MINI_LAYERS = {"mini_qkv": (3072, 2048), "mini_out": (2048, 2048), "mini_head": (157184, 2048)}


# tiles that leave room for two or more programs per SM, with K splits to make enough programs; on an H200 the
# bf16 ones were no faster than the picked tiles (a product's cost is its bytes plus about 4 us), the e4m3 ones
# gave the a8 tiles ("The few-row products' tiles from an occupancy sweep" in benchmarks/RESULTS.md)
OCCUPANCY_CANDIDATES = [(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for st in (2, 3, 4)]
# the same for e4m3 weights and activations (a byte per element: K steps twice as long for the same bytes)
OCCUPANCY_CANDIDATES_A8 = [(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (2, 3, 4)]


def time_splits(layer: str, rows: int, kind: str, candidates: list | None = None,
                splits: tuple = (1, 2, 4, 8), compile_only: bool = False) -> dict:
    """Per (tile, split): microseconds per product, from a graph over copies of the weight (>= 256 MB); the
    tiles around the picked one, or the picked one and ``candidates``. ``compile_only``: one launch of each on
    one copy, to fill Triton's disk cache (``--jobs``)."""
    from l2pd_kernels import quantize_rows
    from l2pd_kernels.reference import quantize_fp8
    from l2pd_kernels.skinny import _launch, pick_config_fp8, pick_split

    n, k = {**LAYERS, **MINI_LAYERS}[layer]
    gate = layer == "gate_up"
    n_out = n // 2 if gate else n
    copies = 1 if compile_only else max(1, -(-(256 << 20) // (n * k * (2 if kind == "bf16" else 1))))
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    kw: dict = {}
    if kind != "bf16":
        ws, scales = zip(*[quantize_fp8(w) for w in ws])
        kw["scale"] = scales[0]
        if kind == "a8":
            x, kw["x_scale"] = quantize_rows(x)
    pick = pick_config(rows, n_out, k, gate) if kind == "bf16" else pick_config_fp8(rows, n_out, k, gate, kind == "a8")
    out = torch.empty(rows, n_out, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    row = {"pick": str(pick), "copies": copies, "MB": n * k * (2 if kind == "bf16" else 1) / 1e6, "us": {}}
    if kind == "bf16":
        want = F.linear(x, ws[-1]).float()
    else:
        xf = x.float() * kw["x_scale"][:, None] if kind == "a8" else x.float()
        want = xf @ (ws[-1].float() * kw["scale"][:, None]).T
    if gate:
        want = F.silu(want[:, :n_out]) * want[:, n_out:]
    row["max_rel_err"] = 0.0
    cfgs = list(dict.fromkeys([tuple(pick), *candidates])) if candidates else [
        (bn, *pick[1:]) for bn in sorted({pick[0], 64 if pick[0] != 64 else 128})]
    for cfg in cfgs:
        tiles, steps = -(-n_out // cfg[0]), -(-k // cfg[1])
        row["rule"] = row.get("rule") or {}
        row["rule"][str(cfg)] = pick_split(tiles, steps, sms)
        for split in splits:
            def body(cfg=cfg, split=split):
                for w in ws:
                    _launch(x, w, out, n_out, gate, cfg, split=split, **kw)
            try:
                body()
                torch.cuda.synchronize()
                if compile_only:
                    continue
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    body()
                ms = device_ms(g.replay, iters=20)
                err = float((out.float() - want).abs().max() / want.abs().max())  # the replayed graph's result
                row["max_rel_err"] = max(row["max_rel_err"], err)
            except Exception as e:  # a tile that needs more shared memory than the GPU has
                row["us"][f"{cfg} x{split}"] = repr(e)[:120]
                continue
            row["us"][f"{cfg} x{split}"] = 1e3 * ms / copies
    return row


def _extra(kind: str, occupancy: bool) -> dict:
    if not occupancy:
        return {}
    return dict(candidates=OCCUPANCY_CANDIDATES if kind == "bf16" else OCCUPANCY_CANDIDATES_A8, splits=(1, 2))


def _compile(task: tuple) -> None:
    layer, rows, kind, occupancy = task
    time_splits(layer, rows, kind, compile_only=True, **_extra(kind, occupancy))


def splits_main(rows_list: list[int], out: str | None, occupancy: bool = False, layers: list[str] | None = None,
                kinds: tuple = ("bf16", "a8", "fp8"), jobs: int = 1) -> None:
    res = {"device": torch.cuda.get_device_name(), "rows": {}}
    tasks = [(layer, rows, kind, occupancy) for rows in rows_list for kind in kinds
             for layer in layers or (*LAYERS, *MINI_LAYERS) if not (kind == "fp8" and layer.startswith("mini"))]
    if jobs > 1:  # compile every variant in parallel processes first: the timed pass then loads them from disk
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs) as pool:
            pool.map(_compile, tasks, chunksize=1)
    for layer, rows, kind, _ in tasks:
        row = time_splits(layer, rows, kind, **_extra(kind, occupancy))
        res["rows"][f"{kind} {layer}@{rows}"] = row
        times = {c: t for c, t in row["us"].items() if isinstance(t, float)}
        top = sorted(times.items(), key=lambda kv: kv[1])[:3]
        base = times.get(f"{row['pick']} x1", float("nan"))
        print(f"{kind:4s} {layer:9s} {rows:3d}  {row['MB']:6.1f} MB  pick x1 {base:7.1f} us "
              f"({row['MB'] / base:.2f} TB/s)  best: " + ", ".join(f"{c} {t:.1f} ({row['MB'] / t:.2f})"
                                                                   for c, t in top), flush=True)
        _save(out, res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32,64")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--splits", action="store_true", help="time split-K against the tiles around the picked one")
    ap.add_argument("--occupancy", action="store_true",
                    help="with --splits: tiles light enough in shared memory for several programs per SM "
                         "(OCCUPANCY_CANDIDATES, _A8), K unsplit and split in two, next to the picked tile")
    ap.add_argument("--layers", default=None, help="with --splits: a comma list of " + ", ".join(
        (*LAYERS, *MINI_LAYERS)))
    ap.add_argument("--kinds", default="bf16,a8,fp8", help="with --splits: a comma list of bf16 (weights), a8 "
                    "(e4m3 weights and activations), fp8 (e4m3 weights widened in registers)")
    ap.add_argument("--jobs", type=int, default=1, help="with --splits: compile the variants in this many "
                    "processes before timing them one at a time")
    args = ap.parse_args()
    if args.splits:
        layers = args.layers.split(",") if args.layers else None
        if layers and (bad := [x for x in layers if x not in {**LAYERS, **MINI_LAYERS}]):
            ap.error(f"unknown layers {bad}")
        kinds = tuple(args.kinds.split(","))
        if bad := [x for x in kinds if x not in ("bf16", "a8", "fp8")]:
            ap.error(f"unknown kinds {bad}")
        return splits_main([int(r) for r in args.rows.split(",")], args.out, args.occupancy, layers, kinds,
                           args.jobs)
    res = {"device": torch.cuda.get_device_name(), "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        for layer in LAYERS:
            if args.weights == "fp8":
                row = time_layer_fp8(layer, rows)
                res["rows"][f"{layer}@{rows}"] = row
                print(f"{layer:8s} rows {rows:4d}  " + "  ".join(f"{k[:-3]} {v:.1f}" for k, v in row.items()
                                                                if k.endswith("_us")), flush=True)
                for kind in ("fp8 ", "fp8/swap", "a8 ", "a8/swap", "bf16 ", "bf16/swap"):
                    top = sorted(((c, t) for c, t in row["candidates"].items() if c.startswith(kind)),
                                 key=lambda kv: kv[1])[:3]
                    if top:
                        print(f"    {kind:9s} top: " + ", ".join(f"{c} {t:.1f}" for c, t in top), flush=True)
                _save(args.out, res)
                continue
            row = time_layer(layer, rows)
            best = min(row["candidates"], key=row["candidates"].get)
            n, k = LAYERS[layer]
            picked = str(pick_config(rows, n // 2 if layer == "gate_up" else n, k, layer == "gate_up"))
            row.update(best=best, best_us=row["candidates"][best], picked=picked,
                       picked_us=row["candidates"].get(picked), weight_MB=n * k * 2 / 1e6)
            res["rows"][f"{layer}@{rows}"] = row
            top = sorted(row["candidates"].items(), key=lambda kv: kv[1])[:5]
            print(f"{layer:8s} rows {rows:3d}  cuBLAS {row['cublas_us']:7.1f} us  picked {picked} "
                  f"{row['picked_us'] or float('nan'):7.1f} us  top: " + ", ".join(f"{c} {t:.1f}" for c, t in top),
                  flush=True)
            _save(args.out, res)


def _save(path, res) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
