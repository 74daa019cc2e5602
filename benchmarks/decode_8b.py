"""Decode speed of an 8B-shaped LLaDA (random bf16 weights built on the GPU) against the floors of the same run.

    python benchmarks/decode_8b.py --out runs/decode_8b.json

Measures, in one process on one GPU:
- the floors: the weight-read time of one forward (weight bytes over the copy bandwidth, read + write
  counted) and the bf16 matmul rate (an 8192^3 product: in bursts, and back to back for 3 s, where the
  power cap lowers the clocks), both measured here;
- one dual-cache step at batch 1 (prompt 512 + 256 new tokens, block 32; the engine's iteration): eager
  unfused (the plain PyTorch forward), eager with the fused kernels, and replayed from its CUDA graph (the
  graph alone, and the whole iteration with its host packing and read-back); a profile of the eager step by
  kernel kind; the block refresh (full and tail) at batch 1 and the largest batch;
- ``generate`` tokens/s at a forced number of tokens per forward (strategy ``steps`` with
  ``steps = 256 / TPF``), dual cache, full and tail refresh, at each batch, next to the compute limit of the
  dual steps (32 query tokens per row per step) and the weight-read floor;
- greedy token identity of the graphed and the eager path.
Prints a table; ``--out`` keeps every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from harness import device_ms  # noqa: E402  (benchmarks/ is on the path when this runs as a script)

from l2pd import LLaDAConfig, LLaDAModelLM
from l2pd.decode import generate, release
from l2pd.engine import HEAD_ROWS, HEAD_ROWS_MIN
from l2pd.models.llada import pack_weights, unpack_weights

P, G, L = 512, 256, 32


def floors(model) -> dict:
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    src = torch.randn(weight_bytes // 16, device="cuda", dtype=torch.bfloat16)  # 1/8 of the weights: 2 GB
    dst = torch.empty_like(src)
    copy_ms = device_ms(lambda: dst.copy_(src), iters=20)
    bw = 2 * src.numel() * 2 / copy_ms / 1e6  # GB/s, read + write
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = device_ms(lambda: a @ b, iters=20)
    # The same product back to back for ~3 s: an H100 at its power cap lowers its clocks under sustained
    # matmul load (700 W, ~1.35 GHz against 1.98 GHz in bursts), and a compute-bound decode runs for seconds.
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n_mm = time.perf_counter(), max(1, int(3.0 / (mm_ms / 1e3)))
    for _ in range(n_mm):
        a @ b
    torch.cuda.synchronize()
    sustained = 2 * n**3 * n_mm / (time.perf_counter() - t0) / 1e12
    flops_per_token = 2 * sum(p.numel() for n_, p in model.named_parameters() if "wte" not in n_)
    return {"weights_GB": weight_bytes / 1e9, "copy_GBps": bw, "floor_ms": weight_bytes / bw / 1e6,
            "matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9, "matmul_TFLOPs_sustained": sustained,
            "flops_per_token": flops_per_token}


def build_model(model_cls=LLaDAModelLM, config_cls=LLaDAConfig):
    """A model of the config's default (full-size) shapes with random bf16 weights, built on the GPU."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = model_cls(config_cls())
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def build_shape(shape: str, weights: str = "bf16"):
    """``build_model`` by a shape's name: ``8b`` (LLaDA-8B), ``llada2-mini`` (LLaDA2.0-mini) or ``dream-7b``;
    ``weights`` ``w8a8`` or ``fp8``: then ``l2pd.quantize``-d."""
    if shape == "llada2-mini":
        from l2pd.models import LLaDA2Config, LLaDA2MoeModelLM

        model = build_model(LLaDA2MoeModelLM, LLaDA2Config)
    elif shape == "dream-7b":
        from l2pd.models.dream import DreamConfig, DreamModel

        model = build_model(DreamModel, DreamConfig)
    elif shape == "8b":
        model = build_model()
    else:
        raise ValueError(f"shape {shape!r}: expected 8b, llada2-mini or dream-7b")
    if weights != "bf16":
        import l2pd

        l2pd.quantize(model, weights)
    return model


class EngineStep:
    """The engine's iteration held still, for timing: ``batch`` requests of P prompt tokens + G masks
    (strategy ``steps``, one token per forward) past their first refresh. ``step()`` runs their next forward
    again and again (host packing, the forward, the decision, the read-back; the canvas fills, the shapes and
    kernels stay); ``refresh(previous)`` the first forward of the second block (``previous``: the block the
    tail or window refresh starts at, None for a full refresh); ``replay()`` only the CUDA graph of the last
    iteration run (device work alone)."""

    def __init__(self, model, batch: int, cache: str, refresh: str, fused: bool, graphs: bool) -> None:
        from l2pd.engine import Engine

        self.engine = Engine(model, max_batch=batch, max_length=P + G, backend="triton", fused=fused,
                             cuda_graphs=graphs, max_block_length=L, max_step_tokens=batch * (P + G + L),
                             run_ahead="off")  # (the iteration alone: nothing launched behind it)
        mask = model.config.mask_token_id
        for _ in range(batch):
            prompt = torch.randint(0, min(mask, 126000), (P,)).tolist()
            self.engine.submit(prompt, max_new_tokens=G, block_length=L, strategy="steps", cache=cache,
                               refresh=refresh, eotp=False)
        self.engine.step()  # admission and the first block's refresh
        self.rows = sorted(self.engine.rows.values(), key=lambda r: r.slot)
        self._last = None  # the last captured iteration

    def _run(self):
        captured = {id(g) for g in self.engine._graphed.values() if g.graph is not None}
        out = self.engine._run(self.rows, None)
        new = [g for g in self.engine._graphed.values() if g.graph is not None and id(g) not in captured]
        if new:  # this iteration was captured: ``replay`` replays it
            self._last = new[0]
        return out

    def step(self):
        for r in self.rows:
            r.step = max(r.step, 1)
        return self._run()

    def refresh(self, previous: int | None):
        for r in self.rows:
            r.block, r.step, r.previous = P + L, 0, previous
        return self._run()

    def replay(self) -> None:
        if self._last is None:
            raise RuntimeError("no iteration captured yet: run it three times with graphs on")
        self._last.graph.replay()


@torch.no_grad()
def packing_section(model) -> dict:
    """A layer's matmuls as the forward issues them (q, k, v, out, gate, up, down) against packed weights
    (qkv, out, gate+up, down), times 32 layers, at 32 and 2048 rows."""
    import torch.nn.functional as F

    blk = model.model.transformer.blocks[0]
    ws = [blk.q_proj.weight, blk.k_proj.weight, blk.v_proj.weight, blk.attn_out.weight, blk.ff_proj.weight,
          blk.up_proj.weight, blk.ff_out.weight]
    qkv = torch.cat(ws[:3])
    gu = torch.cat(ws[4:6])
    out = {}
    for M in (32, 2048):
        x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(M, 12288, device="cuda", dtype=torch.bfloat16)

        def separate(x=x, h=h):
            for w in ws[:4] + ws[4:6]:
                F.linear(x, w)
            F.linear(h, ws[6])

        def packed(x=x, h=h):
            F.linear(x, qkv)
            F.linear(x, ws[3])
            F.linear(x, gu)
            F.linear(h, ws[6])

        import triton.testing

        out[f"separate_m{M}_ms_x32"] = 32 * triton.testing.do_bench_cudagraph(separate, rep=200)
        out[f"packed_m{M}_ms_x32"] = 32 * triton.testing.do_bench_cudagraph(packed, rep=200)
    return out


@torch.no_grad()
def step_section(model, fl: dict, big_batch: int) -> dict:
    """One dual-cache step at batch 1 (the engine's iteration): device time of the graph alone, and the whole
    iteration as ``generate`` runs it (host packing, launch or replay, the read-back); a profile of the eager
    step by kernel kind; the refreshes."""
    out = {}
    for name, fused, graphs in (("eager_unfused", False, False), ("eager_fused", True, False),
                                ("graph_fused", True, True), ("graph_fused_unpacked", True, True)):
        packed = name not in ("eager_unfused", "graph_fused_unpacked")
        (pack_weights if packed else unpack_weights)(model.model.transformer)
        os.environ["L2PD_PACK"] = "1" if packed else "0"
        st = EngineStep(model, 1, "dual", "full", fused, graphs)
        for _ in range(3):  # graphed: the first call runs eagerly, the second captures
            st.step()
        out[f"dual_step_{name}_ms"] = device_ms(st.replay if graphs else st.step)
        out[f"dual_step_{name}_with_read_ms"] = device_ms(st.step)  # the iteration as generate runs it
        del st
    os.environ["L2PD_PACK"] = "1"
    out["dual_step_graph_over_floor"] = out["dual_step_graph_fused_ms"] / fl["floor_ms"]
    pack_weights(model.model.transformer)

    # where an eager fused step's device time goes
    st = EngineStep(model, 1, "dual", "full", True, False)
    st.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            st.step()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    count = 0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t <= 0 or ev.key.startswith("ProfilerStep") or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.key.lower()
        kind = ("matmul" if any(s in name for s in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "_skinny"))
                else "attention" if any(s in name for s in ("flash", "fmha", "attention", "attn"))
                else "fused (l2pd)" if any(s in name for s in ("_rms_norm", "_rope_qkv", "_silu_mul"))
                else "decision (l2pd)" if any(s in name for s in ("_partial_kernel", "_merge", "_decide"))
                else "other")
        kinds[kind] = kinds.get(kind, 0.0) + t / 5 / 1000  # ms per step
        count += ev.count
    out["eager_fused_profile_ms"] = kinds
    out["eager_fused_kernels_per_step"] = count / 5
    del st

    for B in sorted({1, big_batch}):
        for refresh in ("full", "tail"):
            st = EngineStep(model, B, "dual", refresh, True, True)
            previous = None if refresh == "full" else P  # block 1's tail refresh feeds from block 0's start
            for _ in range(3):
                st.refresh(previous)
            out[f"refresh_{refresh}_b{B}_ms"] = device_ms(st.replay, iters=10)
            del st
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def generate_section(model, fl: dict, batches: list[int], tpfs: list[int], refreshes: list[str],
                     baseline: bool, save=None) -> list[dict]:
    rows = []
    for B in batches:
        ids = torch.randint(0, 126000, (B, P), device="cuda")
        configs = []
        if baseline and B in (1, 64):  # the plain eager loop (no graphs, unfused, unpacked) as the baseline
            configs += [(tpf, "full", False, False) for tpf in tpfs if B == 1 or tpf == 8]
        configs += [(tpf, r, True, True) for r in refreshes for tpf in tpfs]
        for tpf, refresh, graphs, fused in configs:
            os.environ["L2PD_FUSED"] = os.environ["L2PD_PACK"] = "1" if fused else "0"
            (pack_weights if fused else unpack_weights)(model.model.transformer)
            kw = dict(max_new_tokens=G, block_length=L, strategy="steps", cache="dual", refresh=refresh,
                      cuda_graph=graphs, return_dict_in_generate=True)
            for _ in range(2 if graphs else 1):  # capture every shape with a cheap decode (two forwards per block)
                generate(model, ids, steps=2 * (G // L), **kw)
            runs = 3 if B == 1 else 1
            if graphs and HEAD_ROWS and B * L >= HEAD_ROWS_MIN:  # once untimed: the head's row counts, each a graph
                generate(model, ids, steps=G // tpf, **kw)
            outs = [generate(model, ids, steps=G // tpf, **kw) for _ in range(runs)]
            sec = statistics.median(o.seconds for o in outs)
            o = outs[0]
            # compute limit: the dual steps' arithmetic alone (32 query tokens per row per step) at the
            # measured matmul rate; floor: every forward at the weight-read time
            step_flops = fl["flops_per_token"] * B * L
            limit_tok_s = B * tpf / (step_flops / (fl["matmul_TFLOPs"] * 1e12))
            floor_tok_s = B * tpf / (fl["floor_ms"] / 1e3)
            row = {"batch": B, "tpf": tpf, "refresh": refresh, "graphs": graphs, "fused": fused, "runs": runs,
                   "seconds": sec, "seconds_all": [x.seconds for x in outs], "forwards": o.forwards,
                   "graphed": o.graphed, "ms_per_forward": sec / o.forwards * 1e3,
                   "tokens_per_s": B * G / sec, "compute_limit_tokens_per_s": limit_tok_s,
                   "floor_tokens_per_s": floor_tok_s}
            row["share_of_compute_limit"] = row["tokens_per_s"] / limit_tok_s
            row["forward_over_floor"] = row["ms_per_forward"] / fl["floor_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if save is not None:
                save(rows)
        release(model)
        torch.cuda.empty_cache()
    os.environ["L2PD_FUSED"] = os.environ["L2PD_PACK"] = "1"
    return rows


@torch.no_grad()
def identity_section(model) -> dict:
    """Greedy tokens of the graphed and the eager path, same inputs."""
    out = {}
    ids = torch.randint(0, 126000, (2, P), device="cuda")
    for strategy, steps, refresh in (("steps", 32, "tail"), ("threshold", None, "full")):
        kw = dict(max_new_tokens=G, block_length=L, strategy=strategy, steps=steps, cache="dual", refresh=refresh,
                  threshold=0.5, eotp=True)
        eager = generate(model, ids, cuda_graph=False, **kw)
        graphed = [generate(model, ids, cuda_graph=True, return_dict_in_generate=True, **kw) for _ in range(3)]
        out[f"{strategy}_{refresh}_identical"] = all(torch.equal(g.sequences, eager) for g in graphed)
        out[f"{strategy}_{refresh}_graphed_forwards"] = [g.graphed for g in graphed]
        release(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--tpf", default="1,4,8", help="tokens per forward (strategy steps, steps = 256 / TPF)")
    ap.add_argument("--refresh", default="full,tail")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain eager loop")
    ap.add_argument("--sections", default="floors,step,identity,generate")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_8b.py needs a CUDA GPU")
    sections = args.sections.split(",")
    batches = [int(x) for x in args.batches.split(",")]
    t0 = time.time()
    model = build_model()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    res["floors"] = fl = floors(model)
    print(json.dumps(res), flush=True)

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    if "packing" in sections:
        res["packing"] = packing_section(model)
        print(json.dumps(res["packing"]), flush=True)
        save()
    if "step" in sections:
        res["step"] = step_section(model, fl, max(batches))
        print(json.dumps(res["step"]), flush=True)
        save()
    if "identity" in sections:
        res["identity"] = identity_section(model)
        print(json.dumps(res["identity"]), flush=True)
        save()
    if "generate" in sections:
        def save_rows(rows):
            res["generate"] = rows
            save()

        res["generate"] = generate_section(model, fl, batches, [int(x) for x in args.tpf.split(",")],
                                           args.refresh.split(","), not args.no_baseline, save_rows)
        save()
    res["wall_s"] = time.time() - t0
    save()
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}")
    print(f"floor {fl['floor_ms']:.2f} ms/forward ({fl['weights_GB']:.2f} GB at {fl['copy_GBps']:.0f} GB/s); "
          f"matmul {fl['matmul_TFLOPs']:.0f} TFLOP/s")
    if "step" in res:
        s = res["step"]
        print("dual step b1 (ms): " + ", ".join(f"{k[10:-3]} {v:.2f}" for k, v in s.items()
                                                if k.startswith("dual_step_") and k.endswith("_ms")))
        print("profile eager fused (ms/step):", {k: round(v, 2) for k, v in s["eager_fused_profile_ms"].items()},
              "kernels/step", s["eager_fused_kernels_per_step"])
        print("refresh (ms):", {k: round(v, 1) for k, v in s.items() if k.startswith("refresh_")})
    if "identity" in res:
        print("identity:", res["identity"])
    if "generate" in res:
        print(f"{'B':>3} {'TPF':>3} {'refresh':>7} {'path':>13} {'tok/s':>8} {'ms/fwd':>7} {'x floor':>7} "
              f"{'%limit':>6} {'graphed':>9}")
        for r in res["generate"]:
            path = ("graph" if r["graphs"] else "eager") + ("+fused" if r["fused"] else "")
            print(f"{r['batch']:>3} {r['tpf']:>3} {r['refresh']:>7} {path:>13} {r['tokens_per_s']:>8.0f} "
                  f"{r['ms_per_forward']:>7.2f} {r['forward_over_floor']:>7.2f} "
                  f"{100 * r['share_of_compute_limit']:>5.0f}% {r['graphed']:>4}/{r['forwards']}")
    print(f"wall {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
