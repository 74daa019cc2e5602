"""Where a cached step's device time goes, by kernel, on an 8B-shaped LLaDA (random bf16 weights on the GPU).

    python benchmarks/profile_step.py --batches 1,64 --out runs/profile.json

For each batch (prompt 512 + 256 new tokens, block 32, dual cache, fused kernels, packed weights): the
step replayed from its CUDA graph (median device time), the same step run eagerly under the torch profiler
(device time per kernel, grouped by kind, and the top kernels), the matmul time it would take at the rate of
an 8192^3 product measured here, and the attention over the cache alone with each SDPA backend.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from decode_8b import EngineStep, G, L, P, build_model, device_ms, floors

from l2pd.models.llada import pack_weights


def kind_of(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "splitk", "_skinny", "scaled_mm", "f8")):
        return "matmul"
    if any(s in n for s in ("flash", "fmha", "attention", "attn", "cudnn")):
        return "attention"
    if any(s in n for s in ("_rms_norm", "_rope_qkv", "_silu_mul")):
        return "fused (l2pd)"
    if any(s in n for s in ("_partial_kernel", "_merge", "_decide", "_lane")):
        return "decision (l2pd)"
    return "other"


@torch.no_grad()
def profile_batch(model, fl: dict, B: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    T = P + G
    st = EngineStep(model, B, "dual", "full", True, True)
    for _ in range(3):
        st.step()
    out = {"graph_step_ms": device_ms(st.replay, iters=20 if B > 8 else 50),
           "iteration_ms": device_ms(st.step, iters=20 if B > 8 else 50)}  # with host packing and read-back
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # kernels inside the replayed graph
        for _ in range(3):
            st.replay()
        torch.cuda.synchronize()
    graph_kernels: dict[str, list] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            graph_kernels[ev.key] = [t / 3 / 1000, ev.count / 3]
    out["graph_top"] = [(k[:90], round(v[0], 3), v[1]) for k, v in
                        sorted(graph_kernels.items(), key=lambda kv: -kv[1][0])[:8]]
    st.engine.graphs = False  # the same rows and cache, eager
    eager = st
    eager.step()
    torch.cuda.synchronize()
    n = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            eager.step()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels[ev.key] = [t / n / 1000, ev.count / n]
    kinds: dict[str, float] = {}
    for k, (ms, _) in kernels.items():
        kinds[kind_of(k)] = kinds.get(kind_of(k), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    out["kinds_ms"] = kinds
    out["device_ms_eager"] = sum(kinds.values())
    out["top"] = [(k[:90], round(v[0], 3), v[1]) for k, v in top]
    out["matmul_at_peak_ms"] = fl["flops_per_token"] * B * L / (fl["matmul_TFLOPs"] * 1e12) * 1e3
    del eager
    torch.cuda.empty_cache()

    # attention over the cache alone: [B, 32, 32, 128] queries, [B, 32, 768, 128] keys, per layer x 32
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(B, 32, L, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 32, T, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    att = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v)
                att[name] = 32 * triton.testing.do_bench_cudagraph(
                    lambda: F.scaled_dot_product_attention(q, k, v), rep=100)
        except Exception as e:  # a backend that does not take these shapes on this build
            att[name] = repr(e)[:120]
    out["attention_x32_ms"] = att
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--weights", choices=("bf16", "fp8", "w8a8"), default="bf16",
                    help="fp8, w8a8: l2pd.quantize first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = build_model()
    pack_weights(model.model.transformer)  # as generate runs it
    fl = floors(model)
    if args.weights != "bf16":  # the floor of the FP8 weights: their bytes and scales over the same copy rate
        import l2pd

        l2pd.quantize(model, args.weights)
        pack_weights(model.model.transformer)  # e4m3 q/k/v and gate/up with their scales, as generate runs them
        nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        fl["floor_ms_bf16"], fl["floor_ms"] = fl["floor_ms"], nbytes / fl["copy_GBps"] / 1e6
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "floors": fl,
           "weights": args.weights}
    for B in (int(b) for b in args.batches.split(",")):
        res[f"b{B}"] = r = profile_batch(model, fl, B)
        print(f"\nbatch {B}: graph step {r['graph_step_ms']:.2f} ms (floor {fl['floor_ms']:.2f}, matmul at the "
              f"8192^3 rate {r['matmul_at_peak_ms']:.2f}); eager device time {r['device_ms_eager']:.2f} ms")
        print("  by kind (ms):", {k: round(v, 2) for k, v in r["kinds_ms"].items()})
        for name, ms, count in r["top"]:
            print(f"  {ms:8.3f} ms  x{count:<5.0f} {name}")
        print("  replayed graph, top kernels:")
        for name, ms, count in r["graph_top"]:
            print(f"  {ms:8.3f} ms  x{count:<5.0f} {name}")
        print("  attention x32 layers (ms):", {k: (round(v, 3) if isinstance(v, float) else v)
                                               for k, v in r["attention_x32_ms"].items()})
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
