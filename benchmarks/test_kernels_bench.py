"""Microbenchmarks of the decision kernels on a GPU: `pytest benchmarks/ --benchmark-only`.

Shapes: vocabulary 126464 (LLaDA), block 32, bf16 logits, batch 1/8/32/64. Baselines measured in the same
run: the PyTorch reference ops, the kernels replayed from a CUDA graph (``graph``, the decode loop's path at
small batch), the public float64 decision with its per-row host syncs, and a plain
device copy of the logits (the bandwidth floor). Each benchmark synchronises the device around every call;
`extra_info` holds triton.testing.do_bench medians and the bandwidth figures.
"""

import pytest
import torch
from baselines import public_style_decide
from harness import block_routing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")
V, L, MASK, EOS = 126464, 32, 126336, 126081
BATCHES = [1, 8, 32, 64]


def _case(B):
    torch.manual_seed(0)
    logits = torch.randn(B, L, V, device="cuda", dtype=torch.bfloat16) * 4
    canvas = torch.full((B, 512 + 256), MASK, device="cuda", dtype=torch.int64)
    canvas[:, :512] = 5
    return logits, canvas


def _run(benchmark, fn, extra, graph_extra=None):
    import triton.testing

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=30, warmup_rounds=5, iterations=1)
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    benchmark.extra_info.update(do_bench_median_ms=ms, **{k: v(ms) if callable(v) else v for k, v in extra.items()})
    if graph_extra:  # device time alone: the calls replayed from a CUDA graph, no Python launch cost
        gms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        benchmark.extra_info.update(cudagraph_median_ms=gms, **{k: v(gms) for k, v in graph_extra.items()})


@cuda
@pytest.mark.parametrize("B", BATCHES)
def test_copy_floor(benchmark, B):
    logits, _ = _case(B)
    out = torch.empty_like(logits)
    nbytes = logits.numel() * logits.element_size()
    bw = {"copy_GBps_read_plus_write": lambda ms: 2 * nbytes / ms / 1e6}
    _run(benchmark, lambda: out.copy_(logits), bw, {"graph_" + k: v for k, v in bw.items()})


@cuda
@pytest.mark.parametrize("B", BATCHES)
def test_confidence_kernel(benchmark, B):
    from l2pd_kernels import confidence

    logits, _ = _case(B)
    nbytes = logits.numel() * logits.element_size()
    bw = {"read_GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, lambda: confidence(logits, suppress=MASK), bw, {"graph_" + k: v for k, v in bw.items()})


@cuda
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("path", ["kernels", "graph", "reference", "public"])
def test_step_decision(benchmark, B, path):
    """confidence + decide (threshold 0.9, EoTP) for one block step."""
    from l2pd_kernels import confidence, decide
    from l2pd_kernels import reference as ref

    logits, canvas = _case(B)
    if path == "public":
        def fn():
            public_style_decide(logits, canvas.clone(), 512, MASK, 0.9)
    elif path == "graph":  # what the decode loop runs at small batch: both kernels replayed from a CUDA graph
        from l2pd_kernels.graph import DecisionGraph

        work = canvas.clone()
        graph = DecisionGraph(work, tuple(logits.shape), logits.dtype, suppress=MASK, threshold=0.9,
                              mask_id=MASK, eos_id=EOS, eotp="accepted")

        def fn():
            work.copy_(canvas)  # the same fresh canvas as the other paths' clone
            graph(logits, 512, 1)
    else:
        conf, dec = (confidence, decide) if path == "kernels" else (ref.confidence, ref.decide)

        def fn():
            tok, prob = conf(logits, suppress=MASK)
            dec(canvas.clone(), tok, prob, block_start=512, k=1, threshold=0.9, mask_id=MASK, eos_id=EOS,
                eotp="accepted")
    _run(benchmark, fn, {"batch": B, "path": path})


# LLaDA-8B's linear layers (N, K), packed as the forward runs them; "gate_up" includes the SiLU-gate product
SKINNY = {"qkv": (12288, 4096), "out": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
          "head": (126464, 4096)}


@cuda
@pytest.mark.parametrize("rows", [8, 32, 64])
@pytest.mark.parametrize("layer", list(SKINNY))
@pytest.mark.parametrize("path", ["cublas", "skinny", "skinny-pointers"])
def test_skinny_matmul(benchmark, rows, layer, path, monkeypatch):
    """A cached step's linear layer at few rows: F.linear (cuBLAS; + silu_mul for gate_up) against the
    skinny kernel as shipped (on Hopper ``pick_tma``'s tiles, loaded by TMA in the graph-replayed figures and by
    pointers in the eager ones) and with the pointer path's own tiles (``L2PD_SKINNY_TMA=0``), as weight-read
    bandwidth (the copy of the same bytes is ``test_copy_floor``'s figure)."""
    import torch.nn.functional as F

    from l2pd_kernels import gate_up_silu, silu_mul, skinny, skinny_matmul

    if path == "skinny-pointers":
        monkeypatch.setattr(skinny, "TMA", "0")

    n, k = SKINNY[layer]
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    if layer == "gate_up":
        fn = (lambda: silu_mul(*F.linear(x, w).chunk(2, -1))) if path == "cublas" else (lambda: gate_up_silu(x, w))
    else:
        fn = (lambda: F.linear(x, w)) if path == "cublas" else (lambda: skinny_matmul(x, w))
    fn()
    nbytes = w.numel() * w.element_size()
    bw = {"weight_read_GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, {"rows": rows, "layer": layer, "path": path}, {"graph_" + k_: v for k_, v in bw.items()})


@cuda
@pytest.mark.parametrize("rows", [32, 768, 2048])
@pytest.mark.parametrize("layer", ["qkv", "out", "down", "head"])
@pytest.mark.parametrize("path", ["bf16", "fp8", "w8a8"])
def test_linear_fp8(benchmark, rows, layer, path):
    """A linear layer of LLaDA-8B with bf16 weights (``l2pd_kernels.linear``), e4m3 weights widened in
    registers (``linear_fp8``) and e4m3 weights and activations (``linear_w8a8``); 32 rows is a cached step at
    batch 1, 768 its block refresh, 2048 a step at batch 64. ``graph_weight_read_GBps``: the weight's bytes
    (FP8: one byte each, plus the scales) over the device time of graph replays."""
    from l2pd_kernels import linear, linear_fp8, linear_w8a8
    from l2pd_kernels.reference import quantize_fp8

    n, k = SKINNY[layer]
    torch.manual_seed(0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    if path == "bf16":
        fn, nbytes = (lambda: linear(x, w)), w.numel() * 2
    else:
        w8, scale = quantize_fp8(w)
        op = linear_fp8 if path == "fp8" else linear_w8a8
        fn, nbytes = (lambda: op(x, w8, scale)), w8.numel() + scale.numel() * 4
    fn()
    bw = {"weight_read_GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, {"rows": rows, "layer": layer, "path": path}, {"graph_" + k_: v for k_, v in bw.items()})


@cuda
@pytest.mark.parametrize("rows", [32, 768, 2048])
@pytest.mark.parametrize("op, width", [("quantize_rows", 4096), ("quantize_rows", 12288), ("rms_norm_fp8", 4096),
                                       ("rms_norm", 4096)])
def test_row_quantization(benchmark, rows, op, width):
    """e4m3 rows for a w8a8 product at LLaDA-8B's widths: ``quantize_rows`` (the attention output, 4,096; the
    SiLU product, 12,288) and the norm that quantizes its own output (``rms_norm_fp8``, with the residual add),
    next to the same norm without it (``rms_norm``); 32 rows is a batch-1 step, 768 its block refresh, 2048 a
    step at batch 64. ``graph_GBps``: bytes read and written over the device time of graph replays."""
    from l2pd_kernels import quantize_rows, rms_norm, rms_norm_fp8

    torch.manual_seed(0)
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    if op == "quantize_rows":
        fn, nbytes = (lambda: quantize_rows(x)), rows * width * 3
    else:
        delta, w = torch.randn_like(x), torch.rand(width, device="cuda", dtype=torch.bfloat16) + 0.5
        norm = rms_norm_fp8 if op == "rms_norm_fp8" else rms_norm
        fn = lambda: norm(x, w, 1e-5, delta=delta)  # noqa: E731
        nbytes = rows * width * (2 * 4 + (1 if op == "rms_norm_fp8" else 0))  # x, delta read; sum, normed written
    fn()
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, {"rows": rows, "op": op, "width": width}, {"graph_" + k_: v for k_, v in bw.items()})


def _pool_case(rows: int, queries: int, keys: int = 768, H: int = 32, D: int = 128, Hkv: int | None = None):
    """The engine's attention at LLaDA-8B shapes (or ``Hkv`` K/V heads): ``rows`` requests of ``queries`` fed
    tokens each over ``keys`` cached positions (one layer), packed as the engine packs them."""
    torch.manual_seed(0)
    Hkv = Hkv or H
    q = torch.randn(1, rows * queries, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(rows + 1, Hkv, keys + 256, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    seg = torch.tensor([(r * queries, queries, r, keys) for r in range(rows)], device="cuda")
    return q, k, v, seg, 2 * rows * Hkv * keys * D * 2  # K and V bytes read


@cuda
@pytest.mark.parametrize("shape", ["llada-8b", "llada2-mini"])
@pytest.mark.parametrize("splits", [1, 2, 4, 8, 12, 16])
@pytest.mark.parametrize("merge_rows", [4, 16])
@pytest.mark.parametrize("keys", [768, 4096])
def test_pool_attention_split(benchmark, shape, splits, merge_rows, keys):
    """A batch-1 cached step's pool attention (32 queries over 768 or 4,096 keys: canvases 512 + 256 and
    3,072 + 1,024) with its keys split across programs and merged: at LLaDA-8B shapes (32 heads) and
    LLaDA2.0-mini's (16 heads over 4 K/V heads), whose 16 programs leave most SMs idle in one pass;
    ``merge_rows``: the (token, head) pairs per merging program."""
    from l2pd_kernels.attention import pool_attention, pool_tiles

    heads = {"llada-8b": (32, 32), "llada2-mini": (16, 4)}[shape]
    q, k, v, seg, nbytes = _pool_case(1, 32, keys, H=heads[0], Hkv=heads[1])
    tiles = pool_tiles(seg.cpu()).cuda()
    if splits == 1 and merge_rows != 4:
        pytest.skip("one pass: no merge")
    chunk = -(-keys // splits // 64) * 64  # whole 64-key loops (8 asked of 768: 6 chunks of 128)
    fn = lambda: pool_attention(q, k, v, seg, tiles, splits=-(-keys // chunk), key_chunk=chunk,  # noqa: E731
                                merge_rows=merge_rows)
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k_: v_ for k_, v_ in bw.items()})


@cuda
@pytest.mark.parametrize("rows, keys", [(64, 768), (64, 4096), (1, 768), (1, 4096)])
@pytest.mark.parametrize("tile", [64, 32])
@pytest.mark.parametrize("gq", [1, 2, 4])
@pytest.mark.parametrize("max_splits", [8, 16])
def test_pool_attention_gqa(benchmark, rows, keys, tile, gq, max_splits):
    """LLaDA2.0-mini's attention (16 query heads over 4 K/V heads) in a cached step: ``rows`` requests of 32
    queries, in query tiles of ``tile``, with ``gq`` query heads of one K/V head per program (each K/V tile
    loaded serves them all; ``pool_heads_per_program``). Where the programs leave SMs idle (batch 1) the keys
    split as ``pool_split_plan`` splits them, into at most ``max_splits`` chunks (its cap: 8)."""
    import triton

    from l2pd_kernels.attention import pool_attention, pool_tiles
    from l2pd_kernels.device import sm_count

    if tile * gq > 128:
        pytest.skip("more than 128 rows a program")
    q, k, v, seg, nbytes = _pool_case(rows, 32, keys, H=16, Hkv=4)
    tiles = pool_tiles(seg.cpu(), tile).cuda()
    programs, sms = tiles.shape[0] * (16 // gq), sm_count(q.device)
    if programs > sms and max_splits != 8:
        pytest.skip("one pass: no split")
    splits = min(max_splits, sms // programs, triton.cdiv(keys, 64)) if programs <= sms else 1
    chunk = triton.cdiv(triton.cdiv(keys, max(splits, 1)), 64) * 64
    splits = triton.cdiv(keys, chunk)
    benchmark.extra_info.update(splits=splits, programs=programs * splits)
    kw = dict(splits=splits, key_chunk=chunk, merge_rows=4) if splits > 1 else {}
    fn = lambda: pool_attention(q, k, v, seg, tiles, block_m=tile, heads_per_program=gq, **kw)  # noqa: E731
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k_: v_ for k_, v_ in bw.items()})


@cuda
@pytest.mark.parametrize("rows, queries", [(1, 32), (64, 32), (64, 64), (8, 768)])
@pytest.mark.parametrize("config", ["n32-w4", "n64-w4", "n64-w8", "n32-w4-s3", "m64-n64-w4", "m64-n64-w8",
                                    "m128-n64-w8", "sdpa", "kv-copy"])
def test_pool_attention(benchmark, rows, queries, config):
    """The pool attention kernel's launch settings against SDPA on the same rows as a dense batch (its K/V
    already contiguous per row: what ``generate`` runs) and a copy of the K/V bytes (the memory floor)."""
    from l2pd_kernels.attention import pool_attention, pool_tiles

    q, k, v, seg, nbytes = _pool_case(rows, queries)
    keys = int(seg[0, 3])
    if config == "sdpa":
        qd = q[0].reshape(q.shape[1], rows, queries, q.shape[3]).transpose(0, 1).contiguous()
        kd, vd = k[:rows, :, :keys].contiguous(), v[:rows, :, :keys].contiguous()
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)  # noqa: E731
    elif config == "kv-copy":
        src = torch.cat([k[:rows, :, :keys].reshape(-1), v[:rows, :, :keys].reshape(-1)])
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731  (reads and writes: twice the bytes of the attention's read)
        nbytes = 2 * nbytes
    else:
        parts = {p[0]: int(p[1:]) for p in config.split("-")}  # m: queries per tile, n: keys per loop, w: warps
        tiles = pool_tiles(seg.cpu(), parts.get("m", 32)).cuda()
        kw = dict(block_m=parts.get("m", 32), block_n=parts["n"], num_warps=parts["w"], num_stages=parts.get("s"))
        fn = lambda: pool_attention(q, k, v, seg, tiles, **kw)  # noqa: E731
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k_: v_ for k_, v_ in bw.items()})


@cuda
@pytest.mark.parametrize("batch, keys", [(1, 768), (1, 4096), (8, 768), (8, 4096), (64, 768), (64, 4096)])
@pytest.mark.parametrize("config", ["split", "one-pass", "sdpa", "kv-copy"])
def test_cached_attention(benchmark, batch, keys, config):
    """A cached step's attention at LLaDA-8B shapes (32 heads of 128, block 32 queries per row over every key of
    a 512 + 256 or 3,072 + 1,024 canvas; one layer): the split-key kernel with its plan, the same kernel in one
    pass, SDPA (``generate``'s path before it) and a copy of the K/V bytes (the memory floor)."""
    from l2pd_kernels import cached_attention
    from l2pd_kernels.attention import split_plan
    from l2pd_kernels.device import sm_count

    torch.manual_seed(0)
    H, D = 32, 128
    q = torch.randn(batch, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(batch, H, keys, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    nbytes = 2 * k.numel() * k.element_size()
    if config == "sdpa":
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    elif config == "kv-copy":
        src, dst = torch.cat([k.reshape(-1), v.reshape(-1)]), torch.empty(2 * k.numel(), device="cuda",
                                                                             dtype=k.dtype)
        fn = lambda: dst.copy_(src)  # noqa: E731  (reads and writes: twice the attention's bytes)
        nbytes = 2 * nbytes
    else:
        splits = None if config == "split" else 1
        fn = lambda: cached_attention(q, k, v, splits=splits)  # noqa: E731
    benchmark.extra_info["splits"] = split_plan(batch * H, keys, sm_count(q.device))[0]
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k_: v_ for k_, v_ in bw.items()})


def _moe_layer(tokens: int):
    """A LLaDA2.0-mini MoE layer's inputs (256 experts of width 512, top-8, hidden 2048, bf16): x, experts, ids
    and weights routed alike in blocks of 32 tokens (as a decode step's masks are), a shared expert (gate|up,
    down), drawn last so that the routed inputs are the same with or without it."""
    torch.manual_seed(0)
    E, D, inter = 256, 2048, 512
    w13 = torch.randn(E, 2 * inter, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    w2 = torch.randn(E, D, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16)
    ids, w = block_routing(tokens)
    s13 = torch.randn(2 * inter, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    s2 = torch.randn(D, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    return x, w13, w2, (s13, s2), ids, w


@cuda
@pytest.mark.parametrize("tokens", [32, 256, 2048])
@pytest.mark.parametrize("path", ["kernel", "kernel-pointers", "kernel-tma", "kernel-down-cols1",
                                  "kernel-down-cols2", "kernel-down-cols4", "reference", "touched-copy"])
def test_fused_moe(benchmark, tokens, path, monkeypatch):
    """A LLaDA2.0-mini MoE layer's routed experts (256 of width 512, top-8, hidden 2048, bf16) for ``tokens``
    tokens routed alike in blocks of 32 (as a decode step's masks are): the Triton kernels as shipped (on
    Hopper the experts' tiles load by TMA, but in the scan path's eager launches: 32 tokens), with pointer loads
    only (``L2PD_MOE_TMA=0``), with TMA loads in every launch (``=1``), with each down program of the sorted
    path over 1, 2 or 4 column tiles at any count (``L2PD_MOE_DOWN_COLS``; 256 and 2,048 tokens; as shipped: 4
    from 8,192 pairs), the PyTorch reference (a loop
    over experts) and a copy of the touched experts' bytes (the read floor)."""
    from l2pd_kernels import fused_moe, moe
    from l2pd_kernels import reference as ref

    if path.startswith("kernel-down-cols"):
        if moe.scans(tokens * 8):
            pytest.skip("the scan path: one column tile a program")
        monkeypatch.setattr(moe, "DOWN_COLS", int(path[-1]))
        monkeypatch.setattr(moe, "DOWN_COLS_PAIRS", 0)
    elif path != "kernel":
        monkeypatch.setattr(moe, "TMA", {"kernel-pointers": "0", "kernel-tma": "1"}.get(path, moe.TMA))
    x, w13, w2, _, ids, w = _moe_layer(tokens)
    touched = ids.unique()
    nbytes = int(touched.numel()) * w13[0].numel() * 3 // 2 * 2  # gate, up and down of each, in bf16
    if path.startswith("kernel"):
        fn = lambda: fused_moe(x, w13, w2, ids, w)  # noqa: E731
    elif path == "reference":
        fn = lambda: ref.fused_moe(x, w13, w2, ids, w)  # noqa: E731
    else:
        src = torch.cat([w13[touched].reshape(-1), w2[touched].reshape(-1)])
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731  (reads and writes: twice the bytes)
        nbytes *= 2
    benchmark.extra_info["touched_experts"] = int(touched.numel())
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k: v for k, v in bw.items()} if path.startswith("kernel") else None)


@cuda
@pytest.mark.parametrize("tokens", [32, 256, 2048])
@pytest.mark.parametrize("path", ["bf16", "fp8", "fp8-k2", "w8a8"])
def test_fused_moe_fp8(benchmark, tokens, path, monkeypatch):
    """The same layer's routed experts as e4m3 weights with channel scales (``l2pd.quantize``'s), widened in the
    kernels' registers, against the bf16 experts they came from; "fp8-k2": tiles twice as deep
    (``L2PD_MOE_FP8_K=2``); "w8a8": against e4m3 rows (x's quantized inside the call, as without the norm's).
    GBps over the bytes of the touched experts as each holds them (the floor's numerator)."""
    from l2pd_kernels import fused_moe, moe
    from l2pd_kernels import reference as ref

    x, w13, w2, _, ids, w = _moe_layer(tokens)
    E, two_i, D = w13.shape
    touched = int(ids.unique().numel())
    kw = {}
    if path != "bf16":
        monkeypatch.setattr(moe, "FP8_K", 2 if path == "fp8-k2" else 1)
        q13, s13 = ref.quantize_fp8(w13.reshape(-1, D))
        q2, s2 = ref.quantize_fp8(w2.reshape(-1, two_i // 2))
        w13, w2 = q13.view(E, two_i, D), q2.view(E, D, two_i // 2)
        kw["scales"] = (s13.view(E, two_i), s2.view(E, D))
        kw["a8"] = path == "w8a8"
    nbytes = touched * (w13[0].numel() * 3 // 2 * w13.element_size() + (two_i + D) * 4 * (path != "bf16"))
    fn = lambda: fused_moe(x, w13, w2, ids, w, **kw)  # noqa: E731
    benchmark.extra_info["touched_experts"] = touched
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k: v for k, v in bw.items()})


@cuda
@pytest.mark.parametrize("tokens", [256, 2048, 4096])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_moe_align(benchmark, tokens, path):
    """Sorting a LLaDA2.0-mini layer's (token, expert) pairs by expert into runs of whole 64-row tiles (256
    experts, top-8): the two Triton kernels against the PyTorch reference (a sort and a dozen small ops)."""
    from l2pd_kernels import reference as ref
    from l2pd_kernels.moe import align

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (tokens, 8), device="cuda")
    fn = (lambda: align(ids, 256, 64)) if path == "kernel" else (lambda: ref.moe_align(ids, 256, 64))
    rate = {"pairs_per_us": lambda ms: tokens * 8 / ms / 1e3}
    _run(benchmark, fn, rate, {"graph_" + k: v for k, v in rate.items()})  # in a forward it runs graphed


@cuda
@pytest.mark.parametrize("tokens", [32, 128, 2048])
@pytest.mark.parametrize("path", ["inside", "apart"])
def test_moe_shared_expert(benchmark, tokens, path):
    """The shared expert run by the MoE kernels beside the routed experts (``shared_weights``), against the
    forward's other way: its own gated MLP (two few-row or cuBLAS products) and its output added in the
    combine. Graphed medians are what a decode step pays."""
    from l2pd_kernels import fused_moe, linear, linear_gate_up_silu

    x, w13, w2, (s13, s2), ids, w = _moe_layer(tokens)
    if path == "inside":
        fn = lambda: fused_moe(x, w13, w2, ids, w, shared_weights=(s13, s2))  # noqa: E731
    else:
        fn = lambda: fused_moe(x, w13, w2, ids, w, shared=linear(linear_gate_up_silu(x, s13), s2))  # noqa: E731
    rate = {"tokens_per_ms": lambda ms: tokens / ms}
    _run(benchmark, fn, rate, {"graph_" + k: v for k, v in rate.items()})


@cuda
@pytest.mark.parametrize("tokens", [32, 2048])
@pytest.mark.parametrize("path", ["in-norm", "combine-then-norm", "reference"])
def test_rms_norm_expert_rows(benchmark, tokens, path):
    """A LLaDA2.0-mini MoE layer's output (8 rows a token and the shared expert's, hidden 2048, bf16) into the
    next layer's residual add and RMSNorm: combined inside the norm's kernel (``rms_norm`` with ``ExpertRows``;
    the forward's ``L2PD_MOE_NORM=1``) against the combine kernel and then the norm (the default), and the
    PyTorch reference. Graphed medians are what a decode step pays."""
    from l2pd_kernels import fused_moe, moe_combine, rms_norm
    from l2pd_kernels import reference as ref

    x, w13, w2, shared, ids, w = _moe_layer(tokens)
    rows = fused_moe(x, w13, w2, ids, w, shared_weights=shared, combine=False)
    resid = torch.randn_like(x)
    norm_w = torch.ones(x.shape[1], device="cuda", dtype=x.dtype)
    fn = {"in-norm": lambda: rms_norm(resid, norm_w, 1e-6, delta=rows),
          "combine-then-norm": lambda: rms_norm(resid, norm_w, 1e-6, delta=moe_combine(rows)),
          "reference": lambda: ref.rms_norm(resid, norm_w, 1e-6, delta=rows)}[path]
    nbytes = (rows.rows.numel() + 3 * resid.numel()) * resid.element_size()  # the rows, x, the sum, the normed
    bw = {"GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k: v for k, v in bw.items()} if path != "reference" else None)


@cuda
@pytest.mark.parametrize("shape", ["llada-8b", "llada2-mini"])
@pytest.mark.parametrize("path", ["fused", "apart"])
def test_linear_rope_qkv(benchmark, shape, path):
    """A batch-1 step's q/k/v product (32 rows) and ``rope_qkv`` in one launch (``linear_rope_qkv``, one head
    per program) against the two launches (``linear``, then ``rope_qkv`` on its column slices): LLaDA-8B (32
    query and key/value heads of 128, K 4,096, full RoPE) and LLaDA2.0-mini (16 and 4 heads, K 2,048, partial
    RoPE, per-head norms). The graph replays one weight, so it stays in L2: the step study
    (``benchmarks/studies/step_rules.py --settings unfused-rope,fused-rope``) is the measure that counts."""
    from l2pd_kernels import linear, linear_rope_qkv, rope_qkv

    torch.manual_seed(0)
    H, HKV, K, half, norm = {"llada-8b": (32, 32, 4096, 64, False), "llada2-mini": (16, 4, 2048, 32, True)}[shape]
    D, S = 128, 32
    x = torch.randn(1, S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn((H + 2 * HKV) * D, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    ang = torch.rand(1, S, half, device="cuda") * 6.28
    cos, sin = ang.cos(), ang.sin()
    k_out = torch.zeros(1, HKV, 768, D, device="cuda", dtype=torch.bfloat16)
    v_out = torch.zeros_like(k_out)
    slots = torch.arange(S, device="cuda") + 512
    kw = dict(q_norm=torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5,
              k_norm=torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5) if norm else {}

    def apart():
        q, k, v = linear(x, w).split([H * D, HKV * D, HKV * D], -1)
        return rope_qkv(q.view(1, S, H, D), k.view(1, S, HKV, D), v.view(1, S, HKV, D), cos, sin, k_out, v_out,
                        slots, **kw)

    fn = apart if path == "apart" else lambda: linear_rope_qkv(x, w, H, HKV, cos, sin, k_out, v_out, slots, **kw)
    nbytes = w.numel() * w.element_size()
    bw = {"weight_GBps": lambda ms: nbytes / ms / 1e6}
    _run(benchmark, fn, bw, {"graph_" + k_: v_ for k_, v_ in bw.items()})


@cuda
@pytest.mark.parametrize("tokens", [32, 2048])
@pytest.mark.parametrize("path", ["in-rope", "apart"])
def test_rope_qk_norm(benchmark, tokens, path):
    """LLaDA2.0-mini's per-head q/k norms (16 query, 4 key/value heads of 128, partial RoPE on 64 dims) inside
    ``rope_qkv``, against two ``rms_norm`` launches on the strided q and k before it."""
    from l2pd_kernels import rms_norm, rope_qkv

    torch.manual_seed(0)
    H, HKV, Dh = 16, 4, 128
    qkv = torch.randn(1, tokens, (H + 2 * HKV) * Dh, device="cuda", dtype=torch.bfloat16)
    q = qkv[..., : H * Dh].view(1, tokens, H, Dh)
    k = qkv[..., H * Dh: (H + HKV) * Dh].view(1, tokens, HKV, Dh)
    v = qkv[..., (H + HKV) * Dh:].view(1, tokens, HKV, Dh)
    ang = torch.rand(1, tokens, 32, device="cuda") * 6.28
    cos, sin = ang.cos(), ang.sin()
    k_out = torch.zeros(1, HKV, tokens, Dh, device="cuda", dtype=torch.bfloat16)
    v_out = torch.zeros_like(k_out)
    slots = torch.arange(tokens, device="cuda")
    wq = torch.rand(Dh, device="cuda", dtype=torch.bfloat16) + 0.5
    wk = torch.rand(Dh, device="cuda", dtype=torch.bfloat16) + 0.5
    if path == "in-rope":
        fn = lambda: rope_qkv(q, k, v, cos, sin, k_out, v_out, slots, q_norm=wq, k_norm=wk)  # noqa: E731
    else:
        fn = lambda: rope_qkv(rms_norm(q, wq, 1e-6)[0], rms_norm(k, wk, 1e-6)[0], v, cos, sin,  # noqa: E731
                              k_out, v_out, slots)
    rate = {"tokens_per_ms": lambda ms: tokens / ms}
    _run(benchmark, fn, rate, {"graph_" + k_: v_ for k_, v_ in rate.items()})
