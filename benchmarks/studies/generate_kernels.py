"""A whole ``generate`` by kernel: device time per kernel name over one decode (every forward: the prompt's, the
refreshes, the cached steps), at LLaDA-8B shapes with random weights built on the GPU.

    PYTHONPATH=.:benchmarks python benchmarks/studies/generate_kernels.py --weights w8a8,bf16 --out runs/gen.json

The decode of ``test_decode_bench.py::test_long_canvas``: a batch of prompts of ``--prompt`` tokens, ``--new``
new tokens, block 32, dual cache, ``--refresh`` refresh, strategy ``steps`` at ``--tpf`` tokens per forward, after
a decode that captures every graph. One decode is timed plainly, the next under the torch profiler; kernels
launched from CUDA graphs count as the profiler records them.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from decode_8b import L, build_shape
from harness import run_info, save

from l2pd.decode import generate, release


@torch.no_grad()
def profile(weights: str, batch: int, prompt: int, new: int, tpf: int, refresh: str, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = build_shape("8b", weights)
    ids = torch.randint(0, 126000, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, block_length=L, strategy="steps", cache="dual", refresh=refresh,
              return_dict_in_generate=True)
    generate(model, ids, steps=2 * (new // L), **kw)  # captures every shape
    plain = generate(model, ids, steps=new // tpf, **kw)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = generate(model, ids, steps=new // tpf, **kw)
        torch.cuda.synchronize()
    ms, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms[e.name[:80]] += e.time_range.elapsed_us() / 1e3
            count[e.name[:80]] += 1
    total = sum(ms.values())
    rows = [{"kernel": k, "ms": v, "share": v / total, "launches": count[k]}
            for k, v in sorted(ms.items(), key=lambda kv: -kv[1])]
    print(f"{weights}: {batch * new / plain.seconds:.0f} tokens/s ({plain.seconds:.3f} s, {plain.forwards} forwards; "
          f"profiled {out.seconds:.3f} s), kernels {total:.1f} ms")
    for r in rows[:top]:
        print(f"  {r['ms']:9.2f} ms {100 * r['share']:5.1f}% x{r['launches']:6d}  {r['kernel'][:70]}")
    release(model)
    del model
    torch.cuda.empty_cache()
    return {"weights": weights, "seconds": plain.seconds, "profiled_seconds": out.seconds, "forwards": plain.forwards,
            "tokens_per_s": batch * new / plain.seconds, "kernel_ms": total, "kernels": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="w8a8,bf16", help="comma list of bf16, fp8, w8a8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--tpf", type=int, default=8, help="tokens per forward (default 8)")
    ap.add_argument("--refresh", default="window", help="window (default), full or tail")
    ap.add_argument("--top", type=int, default=12, help="kernels printed per decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = [profile(w, args.batch, args.prompt, args.new, args.tpf, args.refresh, args.top)
            for w in args.weights.split(",")]
    save(args.out, {**run_info(), "batch": args.batch, "prompt": args.prompt, "new": args.new, "tpf": args.tpf,
                    "refresh": args.refresh, "runs": runs})


if __name__ == "__main__":
    main()
