"""The MoE layer of a batch-1 decode step at LLaDA2.0-mini shapes (32 tokens, 256 experts of width 512, top-8,
hidden 2048, the shared expert inside the kernels) as a decode replays it: ``--layers`` layers' experts, each
with its own weights, in one CUDA graph, so each layer reads its experts cold as in a forward. Time per layer
against the read floor of the experts it touches (plus the shared one) at the copy rate measured here.

    PYTHONPATH=.:benchmarks python benchmarks/moe_layer_b1.py --routing random:29,block:0.05,block:0.5 \\
        --configs default,16/64x64x4x4/128x128x4x3 --out runs/moe_layer_b1.json

Routing: ``random:T`` puts each token on 8 of T experts drawn at random (every one of them touched);
``block:S`` gives every token one shared row of router logits plus S times its own noise, then routes as
LLaDA 2.x does (8 groups, 4 kept): a block of masks routes alike, so some experts take every token. A config is
``default`` (``pick_config``) or ``block_m/gate_up/down``, each tile ``block_n x block_k x warps x stages``.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import triton.testing
from harness import block_routing, floors, save

from l2pd_kernels import fused_moe
from l2pd_kernels.moe import pick_config

E, K, D, INTER, N = 256, 8, 2048, 512, 32


def routing(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    kind, arg = spec.split(":")
    if kind == "random":
        t = int(arg)
        chosen = torch.randperm(E)[:t].tolist()
        rows = []
        for n in range(N):
            r = random.sample(range(t), K)
            if n % t not in r:  # every one of the t experts takes a token
                r[0] = n % t
            rows.append([chosen[i] for i in r])
        return torch.tensor(rows, device="cuda"), torch.softmax(torch.randn(N, K, device="cuda"), -1)
    if kind == "block":
        return block_routing(N, float(arg), E, K)
    raise SystemExit(f"routing {spec!r}: random:T or block:S")


def parse_config(text: str):
    if text == "default":
        return pick_config(N, K, E)
    bm, *tiles = text.split("/")
    return (int(bm), *(tuple(int(v) for v in t.split("x")) for t in tiles))


def graphed_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", default="random:29,block:0.05,block:0.2,block:0.5", help="comma list")
    ap.add_argument("--configs", default="default", help="comma list: default or block_m/gate_up/down")
    ap.add_argument("--layers", type=int, default=8, help="layers per graph, each with its own weights")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    layers = [(torch.randn(E, 2 * INTER, D, **bf) / D**0.5, torch.randn(E, D, INTER, **bf) / INTER**0.5,
               (torch.randn(2 * INTER, D, **bf) / D**0.5, torch.randn(D, INTER, **bf) / INTER**0.5))
              for _ in range(args.layers)]
    x = torch.randn(N, D, **bf)
    bw = floors()["copy_GBps"]
    rows = []
    for spec in args.routing.split(","):
        ids, w = routing(spec)
        touched = int(ids.unique().numel())
        floor_us = (touched + 1) * 3 * D * INTER * 2 / bw / 1e3  # routed experts touched and the shared one
        for text in args.configs.split(","):
            cfg = parse_config(text)

            def step(cfg=cfg, ids=ids, w=w):
                for w13, w2, shared in layers:
                    fused_moe(x, w13, w2, ids, w, config=cfg, scan=True, shared_weights=shared)

            try:
                us = graphed_ms(step) / args.layers * 1e3
            except Exception as exc:  # out of shared memory and the like
                print(f"skip {text}: {type(exc).__name__}", flush=True)
                continue
            row = {"routing": spec, "touched": touched, "most_pairs": int(torch.bincount(ids.flatten()).max()),
                   "config": cfg, "us_per_layer": us, "floor_us": floor_us, "over_floor": us / floor_us}
            print(json.dumps(row), flush=True)
            rows.append(row)
    save(args.out, {"copy_GBps": bw, "rows": rows})


if __name__ == "__main__":
    main()
