"""Decode speed of a Dream-7B-shaped model (random bf16 weights built on the GPU) against the weight-read
floor of the same run: the second family through the same step, kernels and CUDA graphs as LLaDA-8B.

    python benchmarks/dream_7b.py --out runs/dream_7b.json

Dream-v0-Instruct-7B shapes (hidden 3584, 28 layers, 28 query / 4 key-value heads, MLP 18944, vocabulary
152064, biased q/k/v, untied head, shifted logits: a cached step feeds the position before the block too).
Prompt 512 + 256 new tokens, block 32, dual cache, batch 1: one step eager (fused kernels), replayed from its
CUDA graph with the skinny matmul kernel and with cuBLAS; ``generate`` at 1 and 8 tokens per forward
(strategy ``steps``, window refresh); greedy token identity of the graphed and eager paths.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from decode_8b import EngineStep, G, L, P, build_model, device_ms, floors

import l2pd_kernels.skinny
from l2pd.decode import generate, release
from l2pd.models import adapter_for
from l2pd.models.dream import DreamConfig, DreamModel


def step_ms(model: DreamModel, path: str) -> float:
    """Median device time of one dual-cache step at batch 1 on ``path``."""
    rows = l2pd_kernels.skinny.MAX_ROWS
    if path == "graph_cublas":
        l2pd_kernels.skinny.MAX_ROWS = 0
    try:
        graphs = path.startswith("graph")
        st = EngineStep(model, 1, "dual", "full", True, graphs)
        for _ in range(3):  # graphed: the first call runs eagerly, the second captures
            st.step()
        return device_ms(st.replay if graphs else st.step)
    finally:
        l2pd_kernels.skinny.MAX_ROWS = rows


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write every figure here as JSON")
    args = ap.parse_args()
    model = build_model(DreamModel, DreamConfig)
    adapter_for(model).pack()
    fl = floors(model)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "floors": fl, "step_ms": {}}
    for path in ("eager_fused", "graph", "graph_cublas"):
        res["step_ms"][path] = step_ms(model, path)
    ids = torch.randint(0, 126000, (1, P), device="cuda")
    res["generate"] = {}
    for tpf in (1, 8):
        kw = dict(max_new_tokens=G, block_length=L, strategy="steps", steps=G // tpf, cache="dual",
                  refresh="window", return_dict_in_generate=True)
        generate(model, ids, **kw)  # compiles and captures the graphs
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = generate(model, ids, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        s = sorted(times)[1]
        res["generate"][f"tpf{tpf}"] = {"seconds": s, "tokens_per_s": G / s, "ms_per_forward": 1e3 * s / out.forwards,
                                        "forwards": out.forwards, "path": out.path}
    kw = dict(max_new_tokens=G, block_length=L, strategy="steps", steps=G // 8, cache="dual", refresh="window")
    release(model)
    graphed = generate(model, ids, cuda_graph=True, **kw)
    graphed = generate(model, ids, cuda_graph=True, **kw)
    eager = generate(model, ids, cuda_graph=False, **kw)
    res["graph_equals_eager"] = bool(torch.equal(graphed, eager))
    floor = fl["floor_ms"]
    print(f"{res['device']}, torch {res['torch']}: weights {fl['weights_GB']:.2f} GB, copy {fl['copy_GBps']:.0f} "
          f"GB/s, weight-read floor {floor:.2f} ms")
    for path, ms in res["step_ms"].items():
        print(f"  step {path:<13} {ms:7.2f} ms  {ms / floor:5.2f}x floor")
    for name, g in res["generate"].items():
        print(f"  generate b1 {name}: {g['tokens_per_s']:.0f} tok/s, {g['ms_per_forward']:.2f} ms/forward "
              f"({g['ms_per_forward'] / floor:.2f}x floor), path {g['path']}")
    print(f"  graphed tokens equal eager: {res['graph_equals_eager']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
