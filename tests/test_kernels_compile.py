"""Every kernel the forward and the decision launch compiles for Hopper (sm_90) and, but for the FP8 ones, for
the A100 (sm_80) on this machine, no GPU needed, within the shared memory one program gets there.

The interpreter (TRITON_INTERPRET=1) checks the kernels' numbers but not what only the compiler checks (a
loop-carried value that changes shape, a return whose type depends on a branch) or what a launch needs (shared
memory: more than the GPU has fails with "out of resource"). So the launches of small bf16 and fp32
workloads are recorded under the interpreter (each kernel's argument types and compile-time constants), and a
child process without the interpreter compiles each distinct launch ahead of time with Triton's own ``ptxas``.
An A100 has no e4m3, so FP8 launches stop there at ``check_fp8_device``, before any kernel. For sm_90 every
kernel compiles with the programmatic-dependent-launch instructions a Hopper GPU runs (``PDL=2``). Constants that only
the interpreter sets (``UPCAST``: its bf16 ``tl.dot`` is wrong; ``IEEE``: fp32 products, on a GPU for fp32 inputs
only) take their GPU value, and the MoE runs its GPU tiles (``CPU_TILE = 0``).
"""

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_VALUES = {"UPCAST": False}  # constants the interpreter sets differently from a GPU
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
         torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv"}


def _constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def _case(fn, args: tuple, kwargs: dict) -> dict:
    """One launch as (module, kernel, argument types, compile-time constants, options), JSON-ready."""
    params = inspect.signature(fn).parameters
    values = dict(zip(params, args))
    values.update({k: v for k, v in kwargs.items() if k in params})
    types, consts = {}, {}
    for name, p in params.items():
        v = values.get(name, p.default)
        if _constexpr(p) or v is None:
            consts[name] = GPU_VALUES.get(name, v.value if hasattr(v, "value") else v)
        elif isinstance(v, torch.Tensor):
            types[name] = "*" + TYPES[v.dtype]
        elif type(v).__name__ == "TensorDescriptor":  # a TMA descriptor: its dtype and tile
            types[name] = f"tensordesc<{TYPES[v.base.dtype]}[{', '.join(map(str, v.block_shape))}]>"
        elif isinstance(v, bool):
            types[name] = "i1"
        elif isinstance(v, int):
            types[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            types[name] = "fp32"
    if "IEEE" in consts:  # fp32 products: the interpreter's choice for every dtype, a GPU's for fp32 inputs only
        first = values.get("q_ptr", values.get("x_ptr"))
        first = getattr(first, "base", first)  # (a TMA descriptor's tensor)
        if isinstance(first, torch.Tensor):
            consts["IEEE"] = first.dtype == torch.float32
    return {"module": fn.__module__, "kernel": fn.__name__, "types": types, "constexprs": consts,
            "options": {k: kwargs[k] for k in OPTIONS if k in kwargs}}


def _workloads() -> None:
    """Small bf16 decodes and forwards that launch every kernel: LLaDA- and LLaDA2-format models through
    ``generate`` (the engine, the decision, the confidence pass), their fused forwards, FP8 weights, the MoE's
    sorted path."""
    from conftest import tiny_model
    from test_llada2 import tiny_llada2

    import l2pd
    from l2pd.engine import Engine
    from l2pd.filter import Filter
    from l2pd.models import adapter_for
    from l2pd_kernels import cached_attention, confidence, fused_moe
    from l2pd_kernels import reference as ref

    torch.manual_seed(0)
    prompt = torch.randint(0, 58, (2, 6))
    for model in (tiny_model(0), tiny_llada2(0)):  # fp32 forwards: their tiles must fit shared memory too
        adapter_for(model).forward(prompt, fused=True)
    for model in (tiny_model(0).to(torch.bfloat16), tiny_llada2(0).to(torch.bfloat16)):
        ad = adapter_for(model)
        ad.forward(prompt, fused=True)
        engine = Engine(model, max_batch=2, backend="triton", fused=True)
        for p in prompt.tolist():
            engine.submit(p, max_new_tokens=8, block_length=4, strategy="threshold", threshold=0.5, cache="dual",
                          refresh="window")
        engine.run()
        kw = dict(max_new_tokens=8, block_length=4, backend="triton")
        for strategy, extra in (("margin", {}), ("persistence", {}),
                                ("learn2pd", {"filter": Filter(4, hidden=8, kind="history", threshold=0.5)}),
                                ("learn2pd", {"filter": Filter(4, hidden=8, threshold=0.5)})):
            l2pd.generate(model, prompt, strategy=strategy, **extra, **kw)
    logits = torch.randn(1, 2, 20000, dtype=torch.bfloat16)  # a vocabulary split across programs, then merged
    confidence(logits, stats=True)
    confidence(logits, temperature=0.7, seed=3)
    q = torch.randn(1, 8, 4, 64, dtype=torch.bfloat16).transpose(1, 2)  # laid out [B, L, H, D]; 96 keys, split
    kv = torch.randn(1, 4, 96, 64, dtype=torch.bfloat16)
    cached_attention(q, kv, kv.clone(), splits=3)
    cached_attention(q.float(), kv.float(), kv.float(), splits=3)  # fp32 products (fp32 models)
    x = torch.randn(300, 48)  # 900 pairs, sorted: the align kernels and the tiled GEMMs (GPU tiles, 64 rows)
    ids, w = ref.moe_route(torch.randn(300, 8), 3, "softmax")
    experts = torch.randn(8, 48, 48), torch.randn(8, 48, 24)
    shared = torch.randn(48, 48), torch.randn(48, 24)
    for dt in (torch.bfloat16, torch.float32):  # 4-byte tiles must fit shared memory as well
        for n, scan in ((300, False), (20, True)):
            fused_moe(x[:n].to(dt), *(t.to(dt) for t in experts), ids[:n], w[:n], scan=scan,
                      shared_weights=tuple(t.to(dt) for t in shared))
    from l2pd_kernels import moe

    moe.TMA, old_tma = "1", moe.TMA  # the routed experts' tiles by TMA (Hopper), in both paths
    moe.ALIGN_CHUNKED_PAIRS, old_chunked = 0, moe.ALIGN_CHUNKED_PAIRS  # and the pairs sorted in chunks
    old_cols = moe.DOWN_COLS, moe.DOWN_COLS_PAIRS
    try:
        for n, scan in ((300, False), (20, True)):
            fused_moe(x[:n].bfloat16(), *(t.bfloat16() for t in experts), ids[:n], w[:n], scan=scan,
                      shared_weights=tuple(t.bfloat16() for t in shared))
        # down programs over several column tiles each (as from 8,192 pairs): 256 columns
        moe.DOWN_COLS, moe.DOWN_COLS_PAIRS = 4, 0
        wide = torch.randn(300, 256, dtype=torch.bfloat16)
        fused_moe(wide, torch.randn(8, 48, 256, dtype=torch.bfloat16), torch.randn(8, 256, 24, dtype=torch.bfloat16),
                  ids, w, scan=False, shared_weights=(torch.randn(48, 256, dtype=torch.bfloat16),
                                                      torch.randn(256, 24, dtype=torch.bfloat16)))
    finally:
        moe.TMA, moe.ALIGN_CHUNKED_PAIRS, (moe.DOWN_COLS, moe.DOWN_COLS_PAIRS) = old_tma, old_chunked, old_cols
    from l2pd.models import decoder
    from l2pd_kernels import skinny_matmul

    decoder.MOE_NORM, old_norm = True, decoder.MOE_NORM  # the experts' rows combined inside the next norm
    try:
        for dt in (torch.bfloat16, torch.float32):
            adapter_for(tiny_llada2(0).to(dt)).forward(prompt, fused=True)
    finally:
        decoder.MOE_NORM = old_norm
    # a router's product with fp32 output (the forward's on CUDA only)
    skinny_matmul(torch.randn(20, 96, dtype=torch.bfloat16), torch.randn(40, 96, dtype=torch.bfloat16), torch.float32)
    for kind in ("fp8", "w8a8"):  # e4m3 weights; and e4m3 activations, quantized in the norm or on their own
        adapter_for(l2pd.quantize(tiny_model(1).to(torch.bfloat16), kind)).forward(prompt, fused=True)
    # e4m3 experts (widened; with a8 against e4m3 rows on FP8 tensor cores), with a shared expert among them for few
    # pairs; both paths, by TMA too
    q13, s13 = ref.quantize_fp8(experts[0].reshape(-1, 48))
    q2, s2 = ref.quantize_fp8(experts[1].reshape(-1, 24))
    fp8_experts = dict(scales=(s13.view(8, 48), s2.view(8, 48)))
    moe.TMA = "1"
    try:
        for n, scan in ((300, False), (20, True)):
            for a8 in (False, True):  # e4m3 rows too
                fused_moe(x[:n].bfloat16(), q13.view(8, 48, 48), q2.view(8, 48, 24), ids[:n], w[:n], scan=scan,
                          a8=a8, shared_weights=(q13.view(8, 48, 48)[0], q2.view(8, 48, 24)[0]),
                          shared_scales=(fp8_experts["scales"][0][0], fp8_experts["scales"][1][0]), **fp8_experts)
    finally:
        moe.TMA = old_tma
    # the q/k/v product with rope_qkv's work in its programs: head_dim 128 (LLaDA-8B's, LLaDA2.0-mini's), full
    # and partial RoPE with per-head norms into pool rows, bf16 and e4m3
    from l2pd_kernels import linear_rope_qkv

    xb = torch.randn(1, 5, 96, dtype=torch.bfloat16)
    wb = torch.randn(8 * 128, 96, dtype=torch.bfloat16) / 10
    kc = torch.zeros(2, 2, 9, 128, dtype=torch.bfloat16)
    slots, rows = torch.arange(5), torch.zeros(5, dtype=torch.int64)
    nw = dict(q_norm=torch.ones(128, dtype=torch.bfloat16), k_norm=torch.ones(128, dtype=torch.bfloat16))
    for half, extra in ((64, {}), (32, dict(rows=rows, **nw))):
        cs = torch.rand(1, 5, half)
        cache = kc if extra else kc[:1].contiguous()  # pool rows, or one cache row per batch row
        linear_rope_qkv(xb, wb, 4, 2, cs, cs, cache, cache.clone(), slots, **extra)
    w8, s8 = ref.quantize_fp8(wb)
    for a8 in (False, True):
        linear_rope_qkv(xb, w8, 4, 2, cs, cs, kc, kc.clone(), slots, rows=rows, scale=s8, a8=a8, **nw)
    # an e4m3 K/V cache: written by the fused product (partial RoPE, norms; and in the graphed step's TMA tiles
    # below) and by rope_qkv into pool rows, read by the pool attention (128 keys a loop, split) and in one pass
    from l2pd_kernels import pool_attention, rope_qkv

    k8, ks = torch.zeros(2, 2, 9, 128, dtype=torch.float8_e4m3fn), torch.ones(2, 2, 9)
    linear_rope_qkv(xb, w8, 4, 2, cs, cs, k8, k8.clone(), slots, rows=rows, scale=s8, a8=True, **nw, k_scale=ks,
                    v_scale=ks.clone())
    qkv = torch.randn(1, 5, 8, 128, dtype=torch.bfloat16)
    rope_qkv(qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:], cs, cs, k8, k8.clone(), slots, rows=rows, k_scale=ks,
             v_scale=ks.clone())
    kv8, kv_scale = ref.quantize_kv(kv.float())
    seg = torch.tensor([[0, 8, 0, 96]])
    for split in ({}, dict(block_n=128, splits=2, key_chunk=128)):
        pool_attention(q[:1], kv8, kv8.clone(), seg, k_scale=kv_scale, v_scale=kv_scale.clone(), **split)
    from l2pd_kernels import skinny

    skinny.SPLIT_K, old = 4, skinny.SPLIT_K  # each head's K shared by 4 programs (LLaDA2.0-mini's few heads)
    try:
        linear_rope_qkv(torch.randn(1, 5, 4096, dtype=torch.bfloat16), torch.randn(8 * 128, 4096, dtype=torch.bfloat16)
                        / 64, 4, 2, cs, cs, kc, kc.clone(), slots, rows=rows, **nw)
    finally:
        skinny.SPLIT_K = old
    # a product with a bias in its epilogue (Dream's q/k/v): bf16 and fp32 weights, e4m3 ones against e4m3 rows
    from l2pd_kernels import linear_w8a8

    xb2 = torch.randn(5, 96, dtype=torch.bfloat16)
    for dt in (torch.bfloat16, torch.float32):
        skinny.skinny_matmul(xb2.to(dt), torch.randn(40, 96, dtype=dt), bias=torch.randn(40, dtype=dt))
    w8b, s8b = ref.quantize_fp8(torch.randn(40, 96))
    linear_w8a8(xb2, w8b, s8b, bias=torch.randn(40, dtype=torch.bfloat16))
    # the few-row products' TMA path (Hopper only): each kind of tile ``pick_tma`` gives on an H200, by TMA and
    # by pointers, and the q/k/v product with RoPE in its transposed 128-column tiles
    skinny.TMA, old = "1", skinny.TMA
    try:
        x32 = torch.randn(32, 512, dtype=torch.bfloat16)
        for n, k, gate in ((4096, 12288, False), (12288, 4096, False), (12288, 4096, True), (18944, 3584, True)):
            bn, bk, warps, stages, swap = skinny.pick_tma(32, n, k, gate, 132)
            w = torch.randn((2 if gate else 1) * 2 * bn, 512, dtype=torch.bfloat16)
            for tma in (True, False):  # a graph's launches load by TMA, eager ones by pointers
                skinny._launch(x32, w, torch.empty(32, 2 * bn, dtype=torch.bfloat16), 2 * bn, gate,
                               cfg=(bn, bk, warps, stages), swap=swap, tma=tma)
        cs32, k40 = torch.rand(1, 32, 64), torch.zeros(1, 2, 40, 128, dtype=torch.bfloat16)
        linear_rope_qkv(x32[None], torch.randn(8 * 128, 512, dtype=torch.bfloat16) / 20, 4, 2, cs32, cs32, k40,
                        k40.clone(), torch.arange(32))
        k40, s40 = k40.to(torch.float8_e4m3fn), torch.ones(1, 2, 40)
        w8, s8 = ref.quantize_fp8(torch.randn(8 * 128, 512) / 20)
        linear_rope_qkv(x32[None], w8, 4, 2, cs32, cs32, k40, k40.clone(), torch.arange(32), scale=s8, a8=True,
                        k_scale=s40, v_scale=s40.clone())
    finally:
        skinny.TMA = old


def record() -> list[dict]:
    """The distinct kernel launches of ``_workloads`` under the interpreter, with the GPU's MoE tiles."""
    from triton.runtime.interpreter import InterpretedFunction

    from l2pd_kernels import moe

    cases, seen = [], set()
    real, cpu_tile = InterpretedFunction.run, moe.CPU_TILE

    def run(self, *args, grid, warmup, **kwargs):
        case = _case(self.fn, args, kwargs)
        key = json.dumps(case, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            cases.append(case)
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run, moe.CPU_TILE = run, 0
    try:
        with torch.no_grad():
            _workloads()
    finally:
        InterpretedFunction.run, moe.CPU_TILE = real, cpu_tile
    return cases


def targets(case: dict) -> list[int]:
    """The compute capabilities ``case`` must compile for: its own ``targets`` where it names them, else 90, and
    80 unless it reads or writes e4m3 or loads by TMA."""
    if "targets" in case:
        return case["targets"]
    return [90] if any("fp8" in t or "tensordesc" in t for t in case["types"].values()) else [90, 80]


SHARED_MEMORY = {90: 232448, 80: 166912}  # bytes one program may use: H100/H200, A100


def compile_case(case: dict) -> str:
    """'ok', or why ``case`` does not compile for one of its ``targets``, or needs more shared memory than the
    target has (a launch would fail with "out of resource"); run without the interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    sig = {name: "constexpr" if name in case["constexprs"] else case["types"][name] for name in fn.arg_names}
    for cc in targets(case):
        consts = dict(case["constexprs"])
        if cc >= 90 and "PDL" in consts:  # Hopper launches with programmatic dependent launch (``device.pdl``)
            consts["PDL"] = 2
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                    target=GPUTarget("cuda", cc, 32), options=case["options"])
        except Exception as exc:  # the compiler's message is the finding
            return f"sm_{cc}: {type(exc).__name__}: {str(exc)[-1500:]}"
        if kernel.metadata.shared > SHARED_MEMORY[cc]:
            return f"sm_{cc}: {kernel.metadata.shared} bytes of shared memory, {SHARED_MEMORY[cc]} available"
    return "ok"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under TRITON_INTERPRET=1")
def test_every_kernel_launch_compiles_for_hopper_and_the_a100():
    cases = record()
    kernels = {c["kernel"] for c in cases}
    # the workloads reach every kernel of the forward and the decision
    assert {"_rms_norm_kernel", "_rope_qkv_kernel", "_skinny_kernel", "_pool_attention_kernel", "_decide_kernel",
            "_partial_kernel", "_merge_kernel", "_gate_up_kernel", "_down_kernel", "_route_kernel",
            "_align_count_kernel", "_align_place_kernel", "_align_hist_kernel", "_align_scatter_kernel",
            "_quantize_rows_kernel", "_combine_kernel",
            "_skinny_rope_kernel"} <= kernels, sorted(kernels)
    assert {c["kernel"] for c in cases if c["constexprs"].get("TMA")} == {"_skinny_kernel", "_skinny_rope_kernel",
                                                                         "_gate_up_kernel", "_down_kernel"}
    assert any(c["kernel"] == "_rms_norm_kernel" and c["constexprs"].get("MOE_K") for c in cases)
    assert {c["constexprs"].get("A8") for c in cases if c["kernel"] == "_skinny_kernel" and c["constexprs"].get("BIAS")
            } == {False, True}
    assert any(c["kernel"] == "_down_kernel" and c["constexprs"].get("COLS", 1) > 1 and c["constexprs"].get("TMA")
               for c in cases)
    assert {c["kernel"] for c in cases if c["constexprs"].get("KV8")} == {  # the e4m3 K/V cache's writers, readers
        "_rope_qkv_kernel", "_skinny_rope_kernel", "_pool_attention_kernel"}
    # bf16 launches compile the tensor-core products a GPU runs, fp32 ones the fp32 products
    for kernel in ("_pool_attention_kernel", "_skinny_rope_kernel"):
        assert {c["constexprs"]["IEEE"] for c in cases if c["kernel"] == kernel} == {False, True}
    assert any(not c["constexprs"]["IEEE"] and c["constexprs"].get("KV8") for c in cases
               if c["kernel"] == "_pool_attention_kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], input=json.dumps(cases), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    failed = {f"{c['kernel']} {c['constexprs']}": r for c, r in zip(cases, results) if r != "ok"}
    assert not failed, failed


if __name__ == "__main__":  # the child: compile the cases on stdin, print one JSON list of results
    sys.path.insert(0, ROOT)
    print(json.dumps([compile_case(c) for c in json.load(sys.stdin)]))
