"""LLaDA2.0-mini shapes (random bf16 weights built on the GPU): checks, the MoE kernel, the step and
``generate`` against the floors of the same run.

    PYTHONPATH=. python benchmarks/llada2_mini.py --out runs/llada2_mini.json

In one process on one GPU:
- checks: ``fused_moe`` against its reference on a real layer's experts; the fused forward's logits against the
  plain PyTorch forward; greedy tokens of the graphed and the eager ``generate``;
- floors: copy bandwidth (read + write) and the sustained bf16 matmul rate, measured here; the weight bytes a
  step touches (every non-expert weight, plus the routed experts its tokens actually choose, counted per layer);
- the MoE layer (router + routed experts) at 32, 256 and 2,048 tokens against the bytes of the experts it touches;
- ``generate`` (prompt 512 + 256, block 32, dual cache, window refresh, strategy ``steps`` forcing 1, 4 or 8 tokens
  per forward) at batch 1, 8 and 64: ms per forward against the touched-weight floor, and the matmul rate over
  active parameters (every position fed, the prompt's first forward included, x 2 x active parameters per
  token) against the sustained rate.
Routing decides the floor at small batch. Random weights route a block's tokens alike (its masks share one
embedding): about 30 experts a layer at batch 1. A trained router spreads them more, and a block whose 32 tokens
each choose 8 of 256 experts independently touches about 163 a layer (the count the issue's floor assumes).
``--routing independent`` decodes with that routing: each token gets its own 8 experts, drawn at random once per
MoE layer and per row of the forward's input (the router still runs and its weights are kept, so every kernel of
the forward runs as before). Each figure states the touched-expert count it was measured at.
``--weights fp8`` / ``w8a8`` quantizes the model first (``l2pd.quantize``, the routed experts included); its floor
counts the e4m3 bytes and their scales.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from decode_8b import build_model
from harness import device_ms, floors, run_info, save

from l2pd.decode import generate, release
from l2pd.models import LLaDA2Config, LLaDA2MoeModelLM
from l2pd.models.decoder import expert_weights
from l2pd_kernels import fused_moe
from l2pd_kernels import reference as ref

P, G, L = 512, 256, 32


def sizes(model) -> dict:
    """Bytes of the weights that are not routed experts (the embedding left out: a row gather), bytes of one
    routed expert (e4m3 weights with their scales after ``l2pd.quantize``), active parameters per token."""
    c = model.config

    def nbytes(m) -> int:
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    def numel(m) -> int:
        return sum(t.numel() for name, t in [*m.named_parameters(), *m.named_buffers()] if name.endswith("weight"))

    expert = model.model.layers[c.first_k_dense_replace].mlp.experts[0]
    expert_bytes, expert_params = nbytes(expert), numel(expert)
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    embed = model.model.word_embeddings
    total = nbytes(model)
    fixed = total - moe_layers * c.num_experts * expert_bytes - nbytes(embed)
    fixed_params = numel(model) - moe_layers * c.num_experts * expert_params - numel(embed)
    active = fixed_params + moe_layers * c.num_experts_per_tok * expert_params
    return {"weights_GB": total / 1e9, "fixed_GB": fixed / 1e9, "expert_MB": expert_bytes / 1e6,
            "moe_layers": moe_layers, "active_params_per_token": active, "head_params": model.lm_head.weight.numel(),
            "weight_dtypes": sorted({str(t.dtype) for t in model.parameters()} | {str(expert.down_proj.weight.dtype)})}


class IndependentRouting:
    """Within ``with``: each MoE layer's ``moe_route`` returns, for the forward's row i, a fixed set of top_k experts
    drawn uniformly without replacement for that layer and row (a view of a table built here: no launch, so a
    CUDA graph captures it), with the router's own weights. Layers are told apart by their expert bias."""

    def __init__(self, model, max_rows: int, seed: int = 0) -> None:
        c = model.config
        device = model.lm_head.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        self.tables = {}
        for layer in model.model.layers[c.first_k_dense_replace:]:
            key = layer.mlp.gate.expert_bias.data_ptr()
            draw = torch.rand(max_rows, c.num_experts, device=device, generator=g)
            self.tables[key] = draw.argsort(-1)[:, : c.num_experts_per_tok].contiguous()

    def __enter__(self):
        import l2pd_kernels

        self.real = real = l2pd_kernels.moe_route

        def route(logits, top_k, score="sigmoid", bias=None, *a, **k):
            ids, weights = real(logits, top_k, score, bias, *a, **k)
            table = self.tables[bias.data_ptr()]
            if logits.shape[0] > table.shape[0] or top_k != table.shape[1]:
                raise ValueError(f"{logits.shape[0]} rows x top-{top_k}: the table holds {tuple(table.shape)}")
            return table[: logits.shape[0]], weights

        l2pd_kernels.moe_route = route
        return self

    def __exit__(self, *exc) -> None:
        import l2pd_kernels

        l2pd_kernels.moe_route = self.real


def touched_experts(model, batch: int) -> float:
    """Mean distinct experts per MoE layer over the forwards of a short eager decode at ``batch`` rows."""
    import l2pd_kernels

    counts = []
    real = l2pd_kernels.moe_route  # the forward's ops route through the kernel on CUDA

    def counting(*a, **k):
        ids, w = real(*a, **k)
        counts.append(int(ids.unique().numel()))
        return ids, w

    l2pd_kernels.moe_route = counting
    try:
        ids = torch.randint(0, 150000, (batch, P), device="cuda")
        generate(model, ids, max_new_tokens=64, block_length=L, strategy="steps", steps=8, cache="dual",
                 refresh="window", cuda_graph=False)
    finally:
        l2pd_kernels.moe_route = real
    # the refreshes feed two blocks or the whole prompt; the steps feed one block: keep the steps' forwards
    n_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    per_forward = [statistics.mean(counts[i:i + n_layers]) for i in range(0, len(counts), n_layers)]
    return statistics.median(per_forward)


@torch.no_grad()
def checks(model) -> dict:
    out = {}
    mlp = model.model.layers[1].mlp
    moe = __import__("l2pd.models.llada2", fromlist=["_moe"])._moe(mlp, model.config)
    w13, w2 = expert_weights(moe)
    x = torch.randn(32, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    logits = torch.nn.functional.linear(x.float(), mlp.gate.weight.float())
    ids, w = ref.moe_route(logits, 8, "sigmoid", mlp.gate.expert_bias, 8, 4, 2.5)
    a, b = fused_moe(x, w13, w2, ids, w), ref.fused_moe(x, w13, w2, ids, w)
    out["moe_rel_err"] = float((a.float() - b.float()).norm() / b.float().norm())
    out["moe_max_abs_diff"], out["moe_ref_norm"] = float((a.float() - b.float()).abs().max()), float(b.float().norm())
    seq = torch.randint(0, 150000, (1, 96), device="cuda")
    fused = model(seq).logits.float()
    os.environ["L2PD_FUSED"] = "0"
    plain = model(seq).logits.float()
    os.environ["L2PD_FUSED"] = "1"
    out["forward_rel_err"] = float((fused - plain).norm() / plain.norm())
    prompt = torch.randint(0, 150000, (1, 100), device="cuda")
    kw = dict(max_new_tokens=64, block_length=L, strategy="steps", steps=16, cache="dual", refresh="window")
    eager = generate(model, prompt, cuda_graph=False, **kw)
    graphed = [generate(model, prompt, cuda_graph=True, return_dict_in_generate=True, **kw) for _ in range(2)][-1]
    out["graph_tokens_identical"] = bool(torch.equal(eager, graphed.sequences))
    out["graphed_forwards"] = f"{graphed.graphed}/{graphed.forwards}"
    release(model)
    return out


@torch.no_grad()
def moe_section(model, fl: dict, sz: dict) -> list[dict]:
    mlp = model.model.layers[1].mlp
    moe = __import__("l2pd.models.llada2", fromlist=["_moe"])._moe(mlp, model.config)
    w13, w2 = expert_weights(moe)
    rows = []
    for n in (32, 256, 2048):
        x = torch.randn(n, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)

        def route(x=x):
            logits = torch.nn.functional.linear(x.float(), mlp.gate.weight.float())
            return ref.moe_route(logits, 8, "sigmoid", mlp.gate.expert_bias, 8, 4, 2.5)

        ids, w = route()
        touched = int(ids.unique().numel())
        ms = device_ms(lambda x=x: fused_moe(x, w13, w2, *route(x)), iters=30)
        kernel_ms = device_ms(lambda x=x, ids=ids, w=w: fused_moe(x, w13, w2, ids, w), iters=30)
        floor = touched * sz["expert_MB"] * 1e6 / (fl["copy_GBps"] * 1e9) * 1e3
        ref_ms = (device_ms(lambda x=x, ids=ids, w=w: ref.fused_moe(x, w13, w2, ids, w), iters=5, warmup=1)
                  if n <= 256 else None)
        row = {"tokens": n, "touched_experts": touched, "layer_ms": ms, "experts_ms": kernel_ms,
               "floor_ms": floor, "over_floor": kernel_ms / floor, "reference_loop_ms": ref_ms}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def generate_section(model, fl: dict, sz: dict, batches: list[int], tpfs: list[int]) -> list[dict]:
    rows = []
    for B in batches:
        touched = touched_experts(model, B)
        floor_ms = (sz["fixed_GB"] * 1e9 + sz["moe_layers"] * touched * sz["expert_MB"] * 1e6) / (
            fl["copy_GBps"] * 1e9) * 1e3
        ids = torch.randint(0, 150000, (B, P), device="cuda")
        kw = dict(max_new_tokens=G, block_length=L, strategy="steps", cache="dual", refresh="window",
                  return_dict_in_generate=True)
        for _ in range(2):  # compile and capture every shape
            generate(model, ids, steps=2 * (G // L), **kw)
        for tpf in tpfs:
            generate(model, ids, steps=G // tpf, **kw)  # once untimed (L2PD_HEAD_ROWS=1: each row count a graph)
            outs = [generate(model, ids, steps=G // tpf, **kw) for _ in range(3 if B == 1 else 1)]
            sec = statistics.median(o.seconds for o in outs)
            o = outs[0]
            ms = sec / o.forwards * 1e3
            # matmul rate over active parameters: every position the forwards fed (the prompt's first forward
            # and the refreshes included); before 2026-12-02 one block per row a step and two a refresh
            # ("block_tokens"), which left the prompt out. "work": the LM head counted only over the rows it
            # ran (the masked positions at many rows), the rest of the active parameters over every position
            active, head = sz["active_params_per_token"], sz["head_params"]
            tflops = o.fed_tokens * 2 * active / sec / 1e12
            block_tflops = B * L * (o.forwards + G // L) * 2 * active / sec / 1e12
            work_tflops = (o.fed_tokens * (active - head) + o.logit_rows * head) * 2 / sec / 1e12
            row = {"batch": B, "tpf": tpf, "seconds": sec, "seconds_all": [x.seconds for x in outs],
                   "forwards": o.forwards, "graphed": o.graphed, "ms_per_forward": ms, "tokens_per_s": B * G / sec,
                   "touched_experts_per_layer": touched, "touched_floor_ms": floor_ms,
                   "over_touched_floor": ms / floor_ms, "active_TFLOPs": tflops,
                   "share_of_sustained_matmul": tflops / fl["matmul_TFLOPs_sustained"],
                   "fed_tokens": o.fed_tokens, "logit_rows": o.logit_rows,
                   "share_block_tokens": block_tflops / fl["matmul_TFLOPs_sustained"],
                   "share_work_done": work_tflops / fl["matmul_TFLOPs_sustained"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
        release(model)
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def profile_section(model, top: int = 18, new: int = 64, steps: int = 16, batch: int = 1) -> list[dict]:
    """Device time by kernel over the forwards of a short eager decode at ``batch`` rows (what a graph replays):
    ``new`` tokens in ``steps`` forwards (its block refreshes included)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 150000, (batch, P), device="cuda")
    kw = dict(max_new_tokens=new, block_length=L, strategy="steps", steps=steps, cache="dual", refresh="window",
              cuda_graph=False, return_dict_in_generate=True)
    generate(model, ids, **kw)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = generate(model, ids, **kw)
    rows = []
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0) > 0:
            t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
            rows.append({"kernel": ev.key[:90], "calls": ev.count, "ms_per_forward": t / 1e3 / out.forwards})
    rows.sort(key=lambda r: -r["ms_per_forward"])
    total = sum(r["ms_per_forward"] for r in rows)
    print(f"profile: {total:.2f} ms of kernels per forward, {sum(r['calls'] for r in rows) / out.forwards:.0f} "
          "kernels per forward", flush=True)
    for r in rows[:top]:
        print(f"  {r['ms_per_forward']:7.3f} ms  {r['calls'] / out.forwards:6.1f}/fwd  {r['kernel']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON with every figure")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--tpfs", default="1,4,8", help="tokens per forward")
    ap.add_argument("--sections", default="checks,moe,profile,generate", help="comma list of what to run")
    ap.add_argument("--profile-new", type=int, default=64, help="the profiled decode's new tokens")
    ap.add_argument("--profile-steps", type=int, default=16, help="the profiled decode's forwards")
    ap.add_argument("--profile-batch", type=int, default=1, help="the profiled decode's rows")
    ap.add_argument("--weights", choices=["bf16", "fp8", "w8a8"], default="bf16",
                    help="l2pd.quantize the model first (fp8: e4m3 weights everywhere, the routed experts included; "
                         "w8a8: e4m3 activations too where the products take them)")
    ap.add_argument("--routing", choices=["model", "independent"], default="model",
                    help="the experts each token takes in the decodes: the random router's (model) or each token's "
                         "own 8 drawn at random (independent; see above)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = build_model(LLaDA2MoeModelLM, LLaDA2Config)
    if args.weights != "bf16":
        import l2pd

        l2pd.quantize(model, args.weights)
        torch.cuda.empty_cache()
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    result = run_info()
    result["weights"] = args.weights
    result["sizes"] = sz = sizes(model)
    result["floors"] = fl = floors()
    print(json.dumps({**sz, **fl}), flush=True)
    sections = args.sections.split(",")
    result["routing"] = args.routing
    if args.routing == "independent":
        if "checks" in sections:  # the plain forward would route by the router while the fused one would not
            raise SystemExit("--routing independent: leave out the checks section (--sections moe,profile,generate)")
        rows = max(int(b) for b in args.batches.split(",") + [args.profile_batch]) * (P + G)
        IndependentRouting(model, rows).__enter__()  # for the rest of the run
    if "checks" in sections:
        result["checks"] = checks(model)
        print(json.dumps(result["checks"]), flush=True)
    if "moe" in sections:
        result["moe"] = moe_section(model, fl, sz)
    if "profile" in sections:
        result["profile"] = profile_section(model, new=args.profile_new, steps=args.profile_steps,
                                            batch=args.profile_batch)
    if "generate" in sections:
        result["generate"] = generate_section(model, fl, sz, [int(b) for b in args.batches.split(",")],
                                              [int(t) for t in args.tpfs.split(",")])
    save(args.out, result)


if __name__ == "__main__":
    main()
