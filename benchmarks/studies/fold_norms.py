"""What each piece of an RMSNorm split across the products around it costs at batch 1 (LLaDA-8B shapes, 32
rows): the residual products (output, down) with and without the norm's first half in their epilogue
(``linear_residual``), the products after the norm (gate/up, q/k/v) with and without its second half (``rms=``),
the norm kernel itself, and the four products of a layer both ways.

    PYTHONPATH=.:benchmarks python benchmarks/studies/fold_norms.py --out runs/fold_norms.json

Each piece runs over ``--layers`` layers' own weights (so they stream from HBM, as in a step), captured in one
CUDA graph; the figure is the median replay over the layers, in microseconds per layer.
"""

from __future__ import annotations

import argparse
import json

import torch
from harness import device_ms, run_info, save

from l2pd_kernels import gate_up_silu, linear_residual, rms_linear, rms_norm, skinny_matmul

D, F, QKV, ROWS, EPS = 4096, 12288, 3 * 4096, 32, 1e-5


def _graph_us(fn, layers: int) -> float:
    """Median replay of ``fn`` captured in a CUDA graph, per layer (us)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return device_ms(g.replay, iters=50) * 1e3 / layers


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.layers
    dev, bf = "cuda", torch.bfloat16

    def w(rows, cols):
        return [torch.randn(rows, cols, device=dev, dtype=bf) / cols**0.5 for _ in range(n)]

    wo, wgu, wd, wqkv = w(D, D), w(2 * F, D), w(D, F), w(QKV, D)
    g = torch.rand(D, device=dev, dtype=bf) + 0.5
    x = torch.randn(1, ROWS, D, device=dev, dtype=bf)
    att = torch.randn(1, ROWS, D, device=dev, dtype=bf)
    act = torch.randn(1, ROWS, F, device=dev, dtype=bf)
    _, xg, ssq = linear_residual(att, wo[0], x, g)
    rms = (ssq, EPS)

    def apart():
        for i in range(n):
            h, y = rms_norm(x, g, EPS, delta=skinny_matmul(att, wo[i]))
            a = gate_up_silu(h, wgu[i])
            h, y = rms_norm(y, g, EPS, delta=skinny_matmul(a, wd[i]))
            skinny_matmul(h, wqkv[i])

    def folded():
        for i in range(n):
            y, h, s = linear_residual(att, wo[i], x, g)
            a = gate_up_silu(h, wgu[i], (s, EPS))
            y, h, s = linear_residual(a, wd[i], y, g)
            rms_linear(h, wqkv[i], (s, EPS))

    pieces = {
        "out": lambda: [skinny_matmul(att, wo[i]) for i in range(n)],
        "out + residual, norm begun": lambda: [linear_residual(att, wo[i], x, g) for i in range(n)],
        "down": lambda: [skinny_matmul(act, wd[i]) for i in range(n)],
        "down + residual, norm begun": lambda: [linear_residual(act, wd[i], x, g) for i in range(n)],
        "norm (with the residual add)": lambda: [rms_norm(x, g, EPS, delta=att) for _ in range(n)],
        "gate/up": lambda: [gate_up_silu(xg, wgu[i]) for i in range(n)],
        "gate/up, norm finished": lambda: [gate_up_silu(xg, wgu[i], rms) for i in range(n)],
        "q/k/v": lambda: [skinny_matmul(xg, wqkv[i]) for i in range(n)],
        "q/k/v, norm finished": lambda: [rms_linear(xg, wqkv[i], rms) for i in range(n)],
        "layer's four products and two norms": apart,
        "layer's four products, norms folded": folded,
    }
    rows = []
    for name, fn in pieces.items():
        us = _graph_us(fn, n)
        rows.append({"piece": name, "us_per_layer": round(us, 2)})
        print(json.dumps(rows[-1]), flush=True)
    save(args.out, {**run_info(), "layers": n, "rows": ROWS, "pieces": rows})


if __name__ == "__main__":
    main()
