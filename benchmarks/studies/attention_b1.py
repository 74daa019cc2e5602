"""The pool attention of a batch-1 cached step, kernel by kernel: launch settings against the K/V bytes.

    PYTHONPATH=.:benchmarks python benchmarks/studies/attention_b1.py --out runs/attention_b1.json

One layer's attention as the engine runs it in a step of LLaDA-8B shapes (32 heads of 128, 32 queries over 768
cached keys, the engine's idle padding tile included, keys split and merged where ``splits`` > 1), repeated over
32 layers' own K/V (403 MB, more than L2 holds) in one CUDA graph, so each launch's device time shows without a
graph launch's fixed cost: microseconds per layer (median of the replays / 32), against the K/V bytes a layer
reads at the copy rate of the same run. Settings: queries per program (``m``), keys per loop (``n``), warps
(``w``), pipeline stages (``s``, Triton's default where absent) and key chunks (``c``, merged by the combine).
"""

from __future__ import annotations

import argparse

import torch
from harness import floors, graphed_us, run_info, save

from l2pd_kernels.attention import POOL_MERGE_ROWS, pool_attention

LAYERS, H, D, Q, KEYS = 32, 32, 128, 32, 768
SETTINGS = ["m64-n64-w4-c4", "m64-n64-w4-c1", "m64-n64-w4-c2", "m64-n64-w4-c8", "m64-n64-w4-c12",
            "m32-n64-w4-c4", "m32-n64-w4-c8", "m64-n32-w4-c4", "m64-n128-w8-c4", "m64-n64-w8-c4",
            "m64-n64-w4-s1-c4", "m64-n64-w4-s2-c4", "m64-n64-w4-s4-c4", "m32-n32-w2-c8", "m32-n64-w4-c12",
            "m64-n64-w4-c6"]


def parse(setting: str) -> dict:
    return {p[0]: int(p[1:]) for p in setting.split("-")}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(1, Q, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
    # a pool of 2 rows (the request's and the spare) of 768 positions per layer, as ``generate``'s engine holds
    ks = [torch.randn(2, H, KEYS, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    vs = [torch.randn_like(k) for k in ks]
    seg = torch.tensor([[0, Q, 0, KEYS], [Q, 0, 1, 1]], device=dev)  # the request; the (empty) padding segment
    fl = floors()
    kv_bytes = 2 * H * KEYS * D * 2
    res = {**run_info(), "floors": fl, "kv_bytes_per_layer": kv_bytes, "rows": []}
    want = None
    for setting in args.settings.split(","):
        p = parse(setting)
        m, chunks = p["m"], p["c"]
        tiles = torch.tensor([[0, 0], [1, 1 << 30]], device=dev)  # the engine's idle padding tile too
        chunk = -(-KEYS // chunks // p["n"]) * p["n"]
        kw = dict(block_m=m, block_n=p["n"], num_warps=p["w"], num_stages=p.get("s"))
        if chunks > 1:
            kw.update(splits=-(-KEYS // chunk), key_chunk=chunk, merge_rows=POOL_MERGE_ROWS)
        got = pool_attention(q, ks[0], vs[0], seg, tiles, **kw).float()
        want = got if want is None else want
        err = float((got - want).abs().max())
        us = graphed_us(lambda i, kw=kw, tiles=tiles: pool_attention(q, ks[i], vs[i], seg, tiles, **kw), LAYERS,
                        args.replays)
        floor_us = kv_bytes / (fl["copy_GBps"] * 1e9) * 1e6
        row = {"setting": setting, "us_per_layer": us, "kv_floor_us": floor_us, "over_floor": us / floor_us,
               "max_abs_diff_vs_first": err}
        print(f"{setting:22s} {us:7.2f} us a layer  ({us / floor_us:.2f}x the K/V floor {floor_us:.2f} us)"
              f"  diff {err:.1e}", flush=True)
        res["rows"].append(row)
    save(args.out, res)


if __name__ == "__main__":
    main()
