"""Is a few-row product faster when its tiles arrive by TMA (Hopper's tensor memory accelerator) instead of
per-thread asynchronous copies, and with which tiles?

    PYTHONPATH=.:benchmarks python benchmarks/studies/skinny_tma.py --out runs/skinny_tma.json
    PYTHONPATH=.:benchmarks python benchmarks/studies/skinny_tma.py --kinds fp8,a8 --shapes 8b_qkv,8b_down

"Prefetching weights into L2" (``benchmarks/RESULTS.md``) found a 32-row product of an 8 to 32 MB weight bound by
what each program streams (about 23 bytes per clock per SM, from HBM or from L2 alike), not by HBM. A TMA load
moves a whole [rows, K-step] tile with one instruction. ``l2pd_kernels.skinny`` loads its tiles by TMA where
``pick_tma`` says (``_launch(tma=True)``); this times every candidate tile of that path (plain x @ w.T in 16- to
64-column weight slices, or transposed, w @ x.T, with the weight slice as the tensor cores' 64- or 128-row
operand; K shared by 1, 2 or 4 programs) against the pointer path's own tile (``pick_config``) on LLaDA-8B's,
Dream-7B's and LLaDA2.0-mini's products at 32 rows: bf16, and e4m3 weights widened in registers (``fp8``) or
against e4m3 activations (``a8``). Each is replayed from a CUDA graph over enough copies of the weight that none
stays in L2, and checked against the reference. (Its first form, 468ec89 and the form after, timed a kernel of
its own: "A few-row product by TMA" in ``benchmarks/RESULTS.md``.) ``--check-only`` runs under
``TRITON_INTERPRET=1`` (small shapes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from l2pd_kernels import reference as ref
from l2pd_kernels import skinny

# name: (output columns (per half when gated), K, gated)
SHAPES = {"8b_qkv": (12288, 4096, False), "8b_out": (4096, 4096, False), "8b_gateup": (12288, 4096, True),
          "8b_down": (4096, 12288, False), "8b_head": (126464, 4096, False),
          "dream_qkv": (4608, 3584, False), "dream_out": (3584, 3584, False), "dream_gateup": (18944, 3584, True),
          "dream_down": (3584, 18944, False), "dream_head": (152064, 3584, False),
          "mini_qkv": (3072, 2048, False), "mini_out": (2048, 2048, False), "mini_dense": (5120, 2048, True),
          "mini_dense_down": (2048, 5120, False), "mini_head": (157184, 2048, False)}


def candidates(kind: str, gate: bool) -> list[dict]:
    """TMA tiles to time: swap, BLOCK_N, BLOCK_K (elements), warps, stages, K split."""
    bks = (128, 256) if kind == "bf16" else (256, 512)
    out = []
    for swap, bn, bk, stages, split in itertools.product((False, True), (16, 32, 64, 128), bks, (3, 5), (1, 2, 4)):
        if (swap and bn < 64) or (not swap and bn > 64) or (kind == "bf16" and split == 4):
            continue
        need = stages * (32 + bn * (2 if gate else 1)) * bk * (2 if kind == "bf16" else 1)
        if need > 220 * 1024:
            continue  # more shared memory than a program gets
        out.append(dict(swap=swap, bn=bn, bk=bk, warps=4, stages=stages, split=split))
    return out


def operands(kind: str, n: int, k: int, gate: bool, device: str, copies: int = 1):
    """x and ``copies`` weights of a product (with the e4m3 scales of the FP8 kinds) and the reference."""
    x = torch.randn(32, k, device=device).to(torch.bfloat16)
    ws, kw = [], {}
    for _ in range(copies):
        w = torch.randn(n * (2 if gate else 1), k, device=device) / k**0.5
        if kind == "bf16":
            ws.append((w.to(torch.bfloat16), None))
        else:
            ws.append(ref.quantize_fp8(w))
    w0, s0 = ws[0]
    if kind == "a8":
        want = ref.linear_w8a8(x, w0, s0)
        x, kw["x_scale"] = ref.quantize_rows_fp8(x)
    elif kind == "fp8":
        want = ref.linear_fp8(x, w0, s0)
    else:
        want = x.float() @ w0.float().t()
    if gate:
        g, u = want.float().chunk(2, dim=-1)
        want = torch.nn.functional.silu(g) * u
    return x, ws, kw, want.float()


def launch(x, w, s, kw, n, gate, cfg: dict | None, tma: bool):
    """One product through ``l2pd_kernels.skinny._launch``; ``cfg`` None: the pointer path's own tile."""
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=x.device)
    if cfg is None:
        skinny._launch(x, w, out, n, gate, scale=s, tma=tma, **kw)
    else:
        skinny._launch(x, w, out, n, gate, cfg=(cfg["bn"], cfg["bk"], cfg["warps"], cfg["stages"]), scale=s,
                       swap=cfg["swap"], split=cfg["split"], tma=tma, **kw)
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


def check(device: str) -> list[dict]:
    """TMA tiles of each kind against the reference on small odd shapes."""
    rows = []
    for kind, gate, (n, k), cfg in (
            ("bf16", False, (200, 96), dict(swap=True, bn=64, bk=64, warps=4, stages=3, split=1)),
            ("bf16", False, (96, 192), dict(swap=False, bn=32, bk=64, warps=4, stages=3, split=3)),
            ("bf16", True, (48, 128), dict(swap=False, bn=16, bk=64, warps=4, stages=2, split=2)),
            ("fp8", True, (40, 256), dict(swap=False, bn=32, bk=64, warps=4, stages=2, split=2)),
            ("a8", False, (72, 320), dict(swap=True, bn=64, bk=64, warps=4, stages=2, split=1))):
        x, ws, kw, want = operands(kind, n, k, gate, device)
        w, s = ws[0]
        for _ in range(2):  # twice: a split leaves its counters at zero for the next launch
            err = rel_err(launch(x, w, s, kw, n, gate, cfg, True), want)
        rows.append({"kind": kind, "shape": [x.shape[0], n, k], "gate": gate, "cfg": cfg, "max_rel_err": err})
        assert err < 3e-2, rows[-1]
    return rows


def _graphed(ws: list, fn) -> float:
    """Microseconds per call of ``fn`` over each weight copy, replayed from one CUDA graph."""
    from harness import device_ms

    fn(*ws[0])  # compiles outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in ws:
            fn(*w)
    return device_ms(g.replay, iters=20) * 1e3 / len(ws)


@torch.no_grad()
def time_shape(kind: str, name: str) -> dict:
    """The pointer path's own tile, the shipped choice and every TMA candidate on one product, in us."""
    n, k, gate = SHAPES[name]
    nbytes = n * (2 if gate else 1) * k * (2 if kind == "bf16" else 1)
    x, ws, kw, want = operands(kind, n, k, gate, "cuda", max(2, (600 << 20) // nbytes))

    def product(cfg, tma):
        return lambda w, s: launch(x, w, s, kw, n, gate, cfg, tma)

    row = {"kind": kind, "layer": name, "MB": nbytes / 1e6, "gate": gate, "candidates": {}}
    row["pointer_us"] = _graphed(ws, product(None, False))
    row["pointer_rel_err"] = rel_err(product(None, False)(*ws[0]), want)
    row["shipped_us"] = _graphed(ws, product(None, None))
    for cfg in candidates(kind, gate):
        try:
            err = rel_err(product(cfg, True)(*ws[0]), want)
            row["candidates"][json.dumps(cfg)] = {"us": _graphed(ws, product(cfg, True)), "rel_err": err}
        except Exception as exc:  # a tile the compiler refuses
            row["candidates"][json.dumps(cfg)] = {"error": str(exc)[-200:]}
    limit = max(3e-2, 2 * row["pointer_rel_err"])
    ok = sorted((v["us"], c) for c, v in row["candidates"].items() if "us" in v and v["rel_err"] <= limit)
    row["wrong"] = [c for c, v in row["candidates"].items() if "us" in v and v["rel_err"] > limit]
    print(json.dumps({"kind": kind, "layer": name, "MB": round(row["MB"], 1),
                      "pointer_us": round(row["pointer_us"], 2), "shipped_us": round(row["shipped_us"], 2),
                      "best": [(round(t, 2), c) for t, c in ok[:3]], "wrong": len(row["wrong"])}), flush=True)
    return row


def timing(shapes: list[str], kinds: list[str]) -> list[dict]:
    out = []
    for kind, name in itertools.product(kinds, shapes):
        out.append(time_shape(kind, name))
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"products to time, of: {', '.join(SHAPES)}")
    ap.add_argument("--kinds", default="bf16", help="comma list of bf16, fp8 (e4m3 weights widened), a8 (and "
                                                     "e4m3 activations)")
    ap.add_argument("--check-only", action="store_true", help="the correctness check alone (CPU with the interpreter)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 and --check-only")
    result = {"check": check(device)}
    print(json.dumps(result["check"]), flush=True)
    if not args.check_only:
        from harness import floors, run_info, save

        result.update(run_info(), floors=floors(),
                      timing=timing(args.shapes.split(","), args.kinds.split(",")))
        save(args.out, result)


if __name__ == "__main__":
    main()
