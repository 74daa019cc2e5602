"""Is a few-row product faster when its tiles arrive by TMA (Hopper's tensor memory accelerator) instead of
per-thread asynchronous copies?

    PYTHONPATH=.:benchmarks python benchmarks/studies/skinny_tma.py --out runs/skinny_tma.json

"Prefetching weights into L2" (``benchmarks/RESULTS.md``) found a 32-row product of an 8 to 32 MB weight bound by
what each program streams (about 23 bytes per clock per SM, from HBM or from L2 alike), not by HBM. A TMA load
moves a whole [rows, K-step] tile with one instruction, and the tensor cores read it from shared memory; this
times such a product (``_tma_kernel``: w @ x.T per 64- or 128-row slice of the weight, so Hopper's ``wgmma``
takes the weight as its 64-row operand) against ``l2pd_kernels.linear`` on LLaDA-8B's and LLaDA2.0-mini's
products at 32 rows, replayed from a CUDA graph over enough copies of the weight that none stays in L2, and
checks it against the fp32 product. Runs under ``TRITON_INTERPRET=1`` too (``--check-only``, small shapes).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SHAPES = {"8b_qkv": (12288, 4096), "8b_out": (4096, 4096), "8b_down": (4096, 12288), "mini_qkv": (3072, 2048),
          "mini_out": (2048, 2048)}
CONFIGS = [(64, 128, 4), (128, 128, 4), (64, 64, 6), (64, 128, 4, 2), (64, 128, 4, 4), (64, 64, 6, 2), (64, 64, 6, 4)]


@triton.jit
def _tma_kernel(x_desc, w_desc, out_ptr, M, N, K, stride_om, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, STAGES: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    k_len = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK  # this program's share of K (SPLIT programs per slice)
    k_lo = tl.program_id(1) * k_len
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k in tl.range(k_lo, tl.minimum(k_lo + k_len, K), BK, num_stages=STAGES):
        w = w_desc.load([n0, k])  # [BN, BK]: the weight slice, the wide operand
        x = x_desc.load([0, k])  # [BM, BK], rows past M read as zeros
        if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc)
    rn = n0 + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    ok = (rn[:, None] < N) & (rm[None, :] < M)
    if SPLIT == 1:
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:  # fp32 output, summed by atomics (a feasibility figure: the order of the sum is not fixed)
        tl.atomic_add(out_ptr + rm[None, :] * stride_om + rn[:, None], acc, mask=ok)


def tma_linear(x: torch.Tensor, w: torch.Tensor, cfg: tuple) -> torch.Tensor:
    """x [M, K] @ w.T for M <= 64 (bf16), through ``_tma_kernel``; cfg (BN, BK, stages[, split]): with a split,
    the output is fp32 (zeroed, then summed by atomics)."""
    bn, bk, stages, split = (*cfg, 1)[:4]
    M, K = x.shape
    bm = max(16, triton.next_power_of_2(M))
    out = (torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device) if split == 1 else
           torch.zeros(M, w.shape[0], dtype=torch.float32, device=x.device))
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    _tma_kernel[(triton.cdiv(w.shape[0], bn), split)](
        x_desc, w_desc, out, M, w.shape[0], K, out.stride(0), BM=bm, BN=bn, BK=bk, STAGES=stages,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", SPLIT=split, num_warps=4)
    return out


def check(device: str) -> list[dict]:
    rows = []
    for (n, k), m in (((200, 96), 5), ((64, 128), 32)):
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        w = torch.randn(n, k, device=device).to(torch.bfloat16)
        want = x.float() @ w.float().t()
        got = tma_linear(x, w, (64, 64, 3, 1 if m == 5 else 2)).float()
        rows.append({"shape": [m, n, k], "max_rel_err": float(((got - want).abs().max() / want.abs().max()))})
    return rows


def _graphed(ws: list, fn) -> float:
    """Microseconds per call of ``fn`` over each weight copy, replayed from one CUDA graph."""
    from harness import device_ms

    fn(ws[0])  # compiles outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in ws:
            fn(w)
    return device_ms(g.replay, iters=20) * 1e3 / len(ws)


@torch.no_grad()
def timing(rows: int = 32) -> list[dict]:
    from l2pd_kernels import linear

    out = []
    for name, (n, k) in SHAPES.items():
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        copies = max(2, (600 << 20) // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        want = x.float() @ ws[0].float().t()
        row = {"layer": name, "MB": n * k * 2 / 1e6, "candidates": {}}

        row["skinny_us"] = _graphed(ws, lambda w, x=x: linear(x, w))
        for cfg in CONFIGS:
            try:
                err = float(((tma_linear(x, ws[0], cfg).float() - want).abs().max() / want.abs().max()))
                row["candidates"][str(cfg)] = {
                    "us": _graphed(ws, lambda w, x=x, cfg=cfg: tma_linear(x, w, cfg)), "rel_err": err}
            except Exception as exc:  # more shared memory than a program gets
                row["candidates"][str(cfg)] = {"error": str(exc)[-200:]}
        best = min((v["us"], c) for c, v in row["candidates"].items() if "us" in v)
        print(json.dumps({"layer": name, "MB": round(row["MB"], 1), "skinny_us": round(row["skinny_us"], 2),
                          "best_tma": best[1], "best_tma_us": round(best[0], 2)}), flush=True)
        out.append(row)
        del ws
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-only", action="store_true", help="the correctness check alone (CPU with the interpreter)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 and --check-only")
    result = {"check": check(device)}
    print(json.dumps(result["check"]), flush=True)
    if not args.check_only:
        from harness import floors, run_info, save

        result.update(run_info(), floors=floors(), timing=timing())
        save(args.out, result)


if __name__ == "__main__":
    main()
