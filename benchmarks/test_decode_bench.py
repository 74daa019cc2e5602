"""End-to-end speed on an 8B-shaped LLaDA (random bf16 weights built on the GPU): `pytest benchmarks/ --benchmark-only`.

Prompt 512 + 256 new tokens, block 32, dual cache. Measured in the same run and stored in ``extra_info``:
the weight-read floor of one forward (weight bytes over the copy bandwidth) and the bf16 matmul rate (an
8192^3 product, in bursts and sustained for 3 s), from which each case's ratio to the floor and share of
the compute limit (the dual steps' arithmetic: 32 query tokens per row per step) follow.

- ``test_step``: one dual-cache step at batch 1: the eager forward without the fused kernels (the plain
  PyTorch path), eager with them, and replayed from the step's CUDA graph, with the skinny matmul kernel
  (the default), with cuBLAS for every product (``graph_cublas``) and with e4m3 weights and activations
  (``graph_w8a8``, next to the bf16 floor and its own).
- ``test_generate``: ``generate`` at a forced number of tokens per forward (strategy ``steps`` with
  ``steps = 256 / TPF``) at batch 1, 8, 32 and 64, refresh ``full`` (Fast-dLLM's) and ``window``; one timed
  decode per round after a cheap decode that captures the graphs.
- ``test_long_canvas``: ``generate`` at 8 tokens per forward on canvases 512 + 256 and 3,072 + 1,024 (window refresh),
  bf16 and e4m3 (``w8a8``) weights, and ``w8a8-kv8`` (with an e4m3 K/V cache too), batch 1 and 8 (and 64 on the
  short canvas); at batch 1 bf16 the engine's attention
  with its keys split across programs where few programs run (``split``, the default) and in one pass (``one-pass``);
  next to a floor that counts the weights a forward reads (not the embedding table) plus the K/V a step reads.
Skipped without a GPU. ``benchmarks/decode_8b.py`` prints the same figures as a table, with the tail refresh,
the eager baseline loop and a profile.
"""

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="8B-shaped benchmarks need a CUDA GPU")


@pytest.fixture(scope="module")
def model_and_floors():
    from decode_8b import build_model, floors

    from l2pd.models.llada import pack_weights

    model = build_model()
    pack_weights(model.model.transformer)
    fl = floors(model)
    yield model, fl
    del model
    torch.cuda.empty_cache()


@cuda
@pytest.mark.parametrize("path", ["eager_unfused", "eager_fused", "graph", "graph_cublas", "graph_w8a8"])
def test_step(benchmark, model_and_floors, request, path, monkeypatch):
    from decode_8b import EngineStep, device_ms

    import l2pd_kernels.skinny

    model, fl = model_and_floors
    if path == "graph_cublas":
        monkeypatch.setattr(l2pd_kernels.skinny, "MAX_ROWS", 0)
    if path == "graph_w8a8":  # e4m3 weights and activations, against the bf16 floor and its own
        model = request.getfixturevalue("w8a8_model")
    graphs = path.startswith("graph")
    st = EngineStep(model, 1, "dual", "full", path != "eager_unfused", graphs)
    for _ in range(3):  # a graphed step: the first call runs eagerly, the second captures
        st.step()

    benchmark.pedantic(st.step, rounds=30, warmup_rounds=3, iterations=1)  # the iteration, read-back included
    ms = device_ms(st.replay if graphs else st.step)
    own_floor = _read_bytes(model) / fl["copy_GBps"] / 1e6
    benchmark.extra_info.update(device_median_ms=ms, floor_ms=fl["floor_ms"], over_floor=ms / fl["floor_ms"],
                                copy_GBps=fl["copy_GBps"], own_weight_floor_ms=own_floor,
                                over_own_weight_floor=ms / own_floor)
    del st
    torch.cuda.empty_cache()


@cuda
@pytest.mark.parametrize("refresh", ["full", "window"])
@pytest.mark.parametrize("tpf", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 8, 32, 64])
def test_generate(benchmark, model_and_floors, batch, tpf, refresh):
    from decode_8b import G, L, P

    from l2pd.decode import generate, release
    from l2pd.engine import HEAD_ROWS, HEAD_ROWS_MIN

    model, fl = model_and_floors
    ids = torch.randint(0, 126000, (batch, P), device="cuda")
    kw = dict(max_new_tokens=G, block_length=L, strategy="steps", cache="dual", refresh=refresh,
              return_dict_in_generate=True)
    for _ in range(2):  # capture every shape with a cheap decode (two forwards per block)
        generate(model, ids, steps=2 * (G // L), **kw)
    if HEAD_ROWS and batch * L >= HEAD_ROWS_MIN:  # and the measured decode once: the head's row counts, each a graph
        generate(model, ids, steps=G // tpf, **kw)
    outs = []
    benchmark.pedantic(lambda: outs.append(generate(model, ids, steps=G // tpf, **kw)),
                       rounds=3 if batch == 1 else 1, iterations=1)
    sec = sorted(o.seconds for o in outs)[len(outs) // 2]
    forwards = outs[0].forwards
    limit = batch * tpf / (fl["flops_per_token"] * batch * L / (fl["matmul_TFLOPs"] * 1e12))
    sustained = limit * fl["matmul_TFLOPs_sustained"] / fl["matmul_TFLOPs"]
    tok_s = batch * G / sec
    benchmark.extra_info.update(
        tokens_per_s=tok_s, ms_per_forward=sec / forwards * 1e3, over_floor=sec / forwards * 1e3 / fl["floor_ms"],
        share_of_compute_limit=tok_s / limit, share_of_sustained_compute_limit=tok_s / sustained,
        forwards=forwards, graphed=outs[0].graphed, floor_ms=fl["floor_ms"],
        matmul_TFLOPs=fl["matmul_TFLOPs"], matmul_TFLOPs_sustained=fl["matmul_TFLOPs_sustained"])
    release(model)
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def w8a8_model():
    """A second 8B-shaped model, quantized to e4m3 weights and activations (``l2pd.quantize(model, 'w8a8')``)."""
    from decode_8b import build_model

    import l2pd

    model = l2pd.quantize(build_model(), "w8a8")
    yield model
    del model
    torch.cuda.empty_cache()


def _read_bytes(model) -> int:
    """Bytes a forward reads of the weights: every parameter and buffer (FP8 weights and their scales) but the
    embedding table, of which a forward reads only the fed rows."""
    embed = model.model.transformer.wte.weight
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) - embed.numel() * embed.element_size()


# at batch 8 and 64 the grid is full: "split" runs one pass there; batch 64 at 3,072 + 1,024 would hold 137 GB of
# K/V at LLaDA-8B shapes (32 layers x 2 x 64 rows x 4,096 positions x 4,096 x 2 bytes), more than an H200 has
_LONG = [("bf16", 1, "split"), ("bf16", 1, "one-pass"), ("bf16", 8, "split"), ("bf16", 64, "split"),
         ("w8a8", 1, "split"), ("w8a8", 8, "split"), ("w8a8", 64, "split"),
         ("w8a8-kv8", 1, "split"), ("w8a8-kv8", 8, "split"), ("w8a8-kv8", 64, "split")]
LONG_CASES = [(w, b, a, p, n) for p, n in [(512, 256), (3072, 1024)] for w, b, a in _LONG if b < 64 or p + n <= 768]
# what an e4m3 K/V cache makes room for: batch 64 at 3,072 + 1,024 (70 GB of K/V), against batch 32 with bf16 K/V
LONG_CASES += [("w8a8", 32, "split", 3072, 1024), ("w8a8-kv8", 64, "split", 3072, 1024)]


@cuda
@pytest.mark.parametrize("weights, batch, attention, prompt, new", LONG_CASES)
def test_long_canvas(benchmark, model_and_floors, request, prompt, new, weights, batch, attention, monkeypatch):
    from decode_8b import L

    import l2pd
    from l2pd.decode import generate, release

    monkeypatch.setenv("L2PD_POOL_SPLIT", "1" if attention == "split" else "0")  # read at each forward
    model, fl = model_and_floors
    if weights != "bf16":  # built on first use: a bf16-only selection never builds the second model
        model = request.getfixturevalue("w8a8_model")
    kv8 = weights.endswith("-kv8")
    l2pd.quantize(model, "native", kv_cache="fp8" if kv8 else "native")
    cfg = model.config
    ids = torch.randint(0, 126000, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, block_length=L, strategy="steps", cache="dual", refresh="window",
              return_dict_in_generate=True)
    generate(model, ids, steps=2 * (new // L), **kw)  # captures every shape (two forwards per block)
    outs = []
    benchmark.pedantic(lambda: outs.append(generate(model, ids, steps=new // 8, **kw)),
                       rounds=3 if batch == 1 else 1, iterations=1)
    sec = sorted(o.seconds for o in outs)[len(outs) // 2]
    forwards = outs[0].forwards
    # a step reads the weights once (``_read_bytes``) and every cached K/V position of every row (e4m3: a byte a
    # value and a 4-byte scale a head)
    head_dim = cfg.d_model // cfg.n_heads
    per_head = head_dim + 4 if kv8 else 2 * head_dim
    kv_bytes = 2 * cfg.n_layers * batch * cfg.n_kv_heads * (prompt + new) * per_head
    weight_floor = _read_bytes(model) / fl["copy_GBps"] / 1e6
    bf16_floor = _read_bytes(model_and_floors[0]) / fl["copy_GBps"] / 1e6
    floor = weight_floor + kv_bytes / fl["copy_GBps"] / 1e6
    ms = sec / forwards * 1e3
    benchmark.extra_info.update(tokens_per_s=batch * new / sec, ms_per_forward=ms, forwards=forwards,
                                graphed=outs[0].graphed, weight_floor_ms=weight_floor, floor_with_kv_ms=floor,
                                bf16_weight_floor_ms=bf16_floor, over_weight_floor=ms / weight_floor,
                                over_floor_with_kv=ms / floor, over_bf16_weight_floor=ms / bf16_floor)
    release(model)
    torch.cuda.empty_cache()
