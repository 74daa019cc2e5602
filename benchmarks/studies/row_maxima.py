"""A batch-1 step's e4m3 products with their input quantized by a ``quantize_rows`` launch of its own, against
quantized as the product loads it from the row maxima its producer recorded (``decoder.ROW_MAXIMA``): kernel
time per layer at LLaDA-8B shapes (32 rows), each layer on its own weights in one CUDA graph (more than L2
holds), with the few-row product's tile for the second form swept.

    PYTHONPATH=.:benchmarks python benchmarks/studies/row_maxima.py --out runs/row_maxima.json

Cases (us per layer): the MLP (gate/up with the SiLU gate, then down) and the output projection each way, and
their parts alone. Every pair is checked for equal values first (the same e4m3 inputs either way).
"""

from __future__ import annotations

import argparse

import torch
from harness import floors, graphed_us, run_info, save

from l2pd_kernels import linear_gate_up_silu_fp8, linear_w8a8, quantize_rows, skinny
from l2pd_kernels import reference as ref

D, F, ROWS = 4096, 12288, 32
# the output and down projections' launches tried for the quantizing form: ((BLOCK_N, BLOCK_K, warps, stages),
# transposed, K split); None: the shipped pick. Wider output tiles split K further, so each program quantizes a
# smaller share of x (every program quantizes all rows of its K share)
TILES = [None, ((64, 256, 4, 4), True, 2), ((128, 256, 4, 3), True, 4), ((256, 128, 8, 4), True, 8),
         ((128, 128, 4, 6), True, 4), ((64, 256, 4, 4), False, 2), ((64, 256, 4, 4), False, 4),
         ((128, 256, 8, 3), True, 4)]


def weights(layers: int, dev: torch.device) -> list[dict]:
    out = []
    for _ in range(layers):
        gu, sgu = ref.quantize_fp8(torch.randn(2 * F, D, device=dev, dtype=torch.bfloat16) * 0.02)
        wd, sd = ref.quantize_fp8(torch.randn(D, F, device=dev, dtype=torch.bfloat16) * 0.02)
        wo, so = ref.quantize_fp8(torch.randn(D, D, device=dev, dtype=torch.bfloat16) * 0.02)
        out.append(dict(gu=gu, sgu=sgu, wd=wd, sd=sd, wo=wo, so=so))
    return out


def xq_launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor, tile) -> torch.Tensor:
    """``linear_w8a8(x, w, scale, x_amax=amax)`` with a given tile (None: the shipped pick)."""
    if tile is None:
        return linear_w8a8(x, w, scale, x_amax=amax)
    cfg, swap, split = tile
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    skinny._launch(x, w, out, w.shape[0], False, cfg=cfg, scale=scale, x_amax=amax, swap=swap, split=split)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--replays", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    L = args.layers
    W = weights(L, dev)
    x = torch.randn(L, ROWS, D, device=dev, dtype=torch.bfloat16)
    hq = [quantize_rows(x[i]) for i in range(L)]
    att = torch.randn(L, ROWS, D, device=dev, dtype=torch.bfloat16)
    att_max = att.float().abs().amax(-1).contiguous()
    act = [linear_gate_up_silu_fp8(x[i], W[i]["gu"], W[i]["sgu"], a8=True, xq=hq[i]) for i in range(L)]
    act_max = torch.stack([a.float().abs().amax(-1) for a in act]).contiguous()
    am = torch.zeros(L, ROWS, device=dev)

    checks = {}
    got = linear_gate_up_silu_fp8(x[0], W[0]["gu"], W[0]["sgu"], a8=True, xq=hq[0], amax=am[0])
    checks["gate/up output unchanged by amax"] = bool(torch.equal(got, act[0]))
    checks["recorded maxima equal the output's"] = bool(torch.equal(am[0], act_max[0]))
    want = linear_w8a8(act[0], W[0]["wd"], W[0]["sd"])
    for tile in TILES:
        got = xq_launch(act[0], W[0]["wd"], W[0]["sd"], act_max[0], tile)
        checks[f"down quantizing as it loads {tile}"] = bool(torch.equal(got, want)) or float((got - want).abs().max())
    got = xq_launch(att[0], W[0]["wo"], W[0]["so"], att_max[0], None)
    checks["out quantizing as it loads"] = bool(torch.equal(got, linear_w8a8(att[0], W[0]["wo"], W[0]["so"])))
    print(checks, flush=True)

    def mlp_launch(i):
        a = linear_gate_up_silu_fp8(x[i], W[i]["gu"], W[i]["sgu"], a8=True, xq=hq[i])
        return linear_w8a8(a, W[i]["wd"], W[i]["sd"])

    def mlp_maxima(i):
        if i == 0:
            am.zero_()  # the forward's one fill
        a = linear_gate_up_silu_fp8(x[i], W[i]["gu"], W[i]["sgu"], a8=True, xq=hq[i], amax=am[i])
        return linear_w8a8(a, W[i]["wd"], W[i]["sd"], x_amax=am[i])

    hq2 = [quantize_rows(a) for a in act]
    hqa = [quantize_rows(att[i]) for i in range(L)]
    cases = {
        "mlp: quantize launch": mlp_launch,
        "mlp: row maxima": mlp_maxima,
        "gate/up": lambda i: linear_gate_up_silu_fp8(x[i], W[i]["gu"], W[i]["sgu"], a8=True, xq=hq[i]),
        "gate/up recording maxima": lambda i: linear_gate_up_silu_fp8(x[i], W[i]["gu"], W[i]["sgu"], a8=True,
                                                                      xq=hq[i], amax=am[i]),
        "quantize_rows (SiLU product)": lambda i: quantize_rows(act[i]),
        "down (e4m3 input)": lambda i: linear_w8a8(act[i], W[i]["wd"], W[i]["sd"], xq=(hq2[i])),
        "out: quantize launch": lambda i: linear_w8a8(att[i], W[i]["wo"], W[i]["so"]),
        "quantize_rows (attention output)": lambda i: quantize_rows(att[i]),
        "out (e4m3 input)": lambda i: linear_w8a8(att[i], W[i]["wo"], W[i]["so"], xq=hqa[i]),
    }
    for tile in TILES:
        cases[f"down quantizing as it loads {tile}"] = (
            lambda i, t=tile: xq_launch(act[i], W[i]["wd"], W[i]["sd"], act_max[i], t))
        cases[f"out quantizing as it loads {tile}"] = (
            lambda i, t=tile: xq_launch(att[i], W[i]["wo"], W[i]["so"], att_max[i], t))
    fl = floors()
    rows = []
    for name, fn in cases.items():
        us = [graphed_us(fn, L, args.replays) for _ in range(3)]
        rows.append({"case": name, "us_per_layer": sorted(us)[1], "runs": us})
        print(f"{name:48s} {sorted(us)[1]:8.2f} us  {[round(u, 2) for u in us]}", flush=True)
    floor_us = {"gate/up": 2 * F * D / fl["copy_GBps"] / 1e3, "down": F * D / fl["copy_GBps"] / 1e3,
                "out": D * D / fl["copy_GBps"] / 1e3}
    print({k: round(v, 2) for k, v in floor_us.items()}, "us: the weights' bytes at the copy rate")
    save(args.out, {**run_info(), "floors": fl, "weight_floor_us": floor_us, "checks": checks, "rows": rows})


if __name__ == "__main__":
    main()
