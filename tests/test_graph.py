"""CUDA-graph replay of the whole step gives the eager path's greedy tokens (GPU only; skipped on the CPU).

Every strategy and cache on the bundled model, every refresh mode, the graphs reused across calls with new
prompts, and a model of another class with the official module tree through ``l2pd.patch``.
"""

import pytest
import torch

import l2pd
from l2pd.decode import release
from l2pd.demo.task import split
from l2pd.evaluate import encode_prompts
from tests.conftest import FILTER32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def bundled():
    from l2pd.demo import load

    return load(device="cuda")


def _prompts(tok, offset, n=24):
    return encode_prompts(tok, [p.question for p in split("test", n, offset)], "cuda")


def _kw(strategy, cache, refresh):
    kw = dict(max_new_tokens=128, block_length=32, strategy=strategy, cache=cache, refresh=refresh)
    if strategy == "steps":
        kw["steps"] = 32  # four tokens per forward: more than one step per block, fewer forwards
    if strategy == "learn2pd":  # the bundled filter is a block-128 one: the block-32 filter of the same model
        kw.update(eotp=True, filter=l2pd.Filter.from_pretrained(FILTER32))
    if strategy == "threshold":
        kw.update(threshold=0.9, eotp="predicted")
    return kw


@pytest.mark.parametrize("strategy", ["steps", "threshold", "learn2pd"])
@pytest.mark.parametrize("cache,refresh", [("none", "full"), ("prefix", "full"), ("prefix", "tail"),
                                           ("dual", "full"), ("dual", "tail"), ("dual", "window")])
def test_graphed_equals_eager(bundled, strategy, cache, refresh):
    model, tok = bundled
    kw = _kw(strategy, cache, refresh)
    release(model)
    first = _prompts(tok, 0)
    # other prompts and padding per row, same shapes (a kept stepper serves one shape)
    second = tuple(t.roll(5, 0) for t in first)
    outs = []
    for ids, mask in (first, first, second):  # eager warm-up, capture, then replay on new prompts
        outs.append(model.generate(ids, mask, cuda_graph=True, return_dict_in_generate=True, **kw))
    assert outs[-1].path == "graph", (outs[-1].graphed, outs[-1].forwards)
    for out, (ids, mask) in zip(outs, (first, first, second)):
        eager = model.generate(ids, mask, cuda_graph=False, return_dict_in_generate=True, **kw)
        assert eager.path == "eager"
        assert torch.equal(out.sequences, eager.sequences)
        assert torch.equal(out.nfe, eager.nfe)


def test_graphed_official_module_tree(bundled):
    from tests.test_patch import ForeignLLaDA

    model, tok = bundled
    foreign = l2pd.patch(ForeignLLaDA(model))
    ids, mask = _prompts(tok, 0, 8)
    kw = _kw("steps", "dual", "tail")
    outs = [foreign.generate(ids, mask, return_dict_in_generate=True, **kw) for _ in range(3)]
    assert outs[-1].path == "graph"
    ours = model.generate(ids, mask, cuda_graph=False, **kw)
    assert all(torch.equal(o.sequences, ours) for o in outs)


def test_packed_weights_same_logits_and_state_dict():
    from l2pd.models.llada import llada_forward, pack_weights, unpack_weights
    from tests.conftest import tiny_model

    model = tiny_model(seed=3).cuda()
    tf = model.model.transformer
    ids = torch.randint(0, 58, (2, 9), device="cuda")
    before = llada_forward(tf, model.config, ids)
    names = sorted(model.state_dict())
    assert pack_weights(tf)
    assert sorted(model.state_dict()) == names
    torch.testing.assert_close(llada_forward(tf, model.config, ids), before, rtol=1e-4, atol=1e-4)
    # load_state_dict copies into the views, so the packed buffers follow
    other = tiny_model(seed=4).cuda()
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(llada_forward(tf, model.config, ids),
                               llada_forward(other.model.transformer, other.config, ids), rtol=1e-4, atol=1e-4)
    unpack_weights(tf)
    assert "_l2pd_qkv" not in vars(tf.blocks[0])


def test_graphs_captured_in_another_thread(bundled):
    """A shape run eagerly in one thread and met again in another is captured there only after an eager run of
    its own (a thread's first cuBLAS call creates its handle, which a capture must not do): generate() called
    from a second thread, as a server's or a UI's worker does, decodes as the first thread did."""
    import threading

    model, tok = bundled
    ids, mask = _prompts(tok, 0, 8)
    kw = dict(max_new_tokens=64, block_length=32, strategy="threshold", threshold=0.9, cache="dual",
              return_dict_in_generate=True)
    release(model)
    first = model.generate(ids, mask, cuda_graph=True, **kw)  # every shape's first use: eager, this thread
    got = {}

    def other():
        try:
            got["out"] = [model.generate(ids, mask, cuda_graph=True, **kw) for _ in range(2)]
        except Exception as exc:  # (reported below, with the thread's error)
            got["error"] = exc

    t = threading.Thread(target=other, daemon=True)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive()
    assert "error" not in got, got.get("error")
    assert got["out"][-1].graphed > 0
    for out in got["out"]:
        assert torch.equal(out.sequences, first.sequences) and torch.equal(out.nfe, first.nfe)


def test_graphs_read_a_filter_changed_in_place(bundled):
    """A captured graph reads the filter's weights from their copy on the GPU; after the filter is trained in
    place (an optimizer's step), a replay decodes as a fresh filter with the new weights does."""
    model, tok = bundled
    ids, mask = _prompts(tok, 0, 8)
    flt = l2pd.Filter.from_pretrained(FILTER32)
    kw = dict(max_new_tokens=64, block_length=32, strategy="learn2pd", eotp=True, cache="dual",
              return_dict_in_generate=True)
    release(model)
    for _ in range(3):  # eager, capture, replay
        out = model.generate(ids, mask, filter=flt, cuda_graph=True, **kw)
    assert out.path == "graph"
    with torch.no_grad():
        flt.layers[0].bias.sub_(3.0)
    fresh = l2pd.Filter.from_pretrained(FILTER32)
    fresh.load_state_dict(flt.state_dict())
    got = model.generate(ids, mask, filter=flt, cuda_graph=True, **kw)
    want = model.generate(ids, mask, filter=fresh, cuda_graph=False, **kw)
    assert got.graphed > 0 and not torch.equal(out.nfe, want.nfe)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.nfe, want.nfe)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_graphed_equals_eager_as_rows_finish(bundled, cache):
    """Rows that finish early leave the iterations (fewer rows, their own graphs); tokens stay the same."""
    model, tok = bundled
    ids, mask = _prompts(tok, 0, 24)
    kw = dict(max_new_tokens=256, block_length=32, strategy="learn2pd", eotp=True, cache=cache,
              filter=l2pd.Filter.from_pretrained(FILTER32), return_dict_in_generate=True)
    release(model)
    outs = [model.generate(ids, mask, cuda_graph=True, **kw) for _ in range(3)]
    kept = model.generate(ids, mask, cuda_graph=False, **kw)
    assert outs[-1].graphed > 0
    for out in outs:
        assert torch.equal(out.sequences, kept.sequences)
        assert torch.equal(out.nfe, kept.nfe)


@pytest.mark.parametrize("kind", ["rich", "shared", "history"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_graphed_rich_filter_equals_eager(bundled, cache, kind):
    """A filter that reads margins, entropies and the step index (the step comes from device memory in a
    graph), dense or shared per position, or also each guess's history (buffers in device memory): replayed
    steps decide as eager ones do."""
    from l2pd.filter import RICH_INPUTS, SHARED_FEATURES, Filter

    model, tok = bundled
    torch.manual_seed(0)
    if kind == "rich":
        flt = Filter(32, 32, inputs=RICH_INPUTS, threshold=0.6).eval()  # random weights: any decision will do
    elif kind == "shared":
        flt = Filter(32, 32, inputs=SHARED_FEATURES, kind="shared", threshold=0.6).eval()
    else:
        flt = Filter(32, 32, kind="history", threshold=0.6).eval()
    with torch.no_grad():
        flt.layers[-1].bias.fill_(0.4)  # scores around tau: some positions pass, some wait
    kw = dict(max_new_tokens=128, block_length=32, strategy="learn2pd", filter=flt, eotp=True, cache=cache)
    release(model)
    first = _prompts(tok, 0)
    outs = [model.generate(*first, cuda_graph=True, return_dict_in_generate=True, **kw) for _ in range(3)]
    assert outs[-1].path == "graph"
    eager = model.generate(*first, cuda_graph=False, return_dict_in_generate=True, **kw)
    for out in outs:
        assert torch.equal(out.sequences, eager.sequences) and torch.equal(out.nfe, eager.nfe)
    assert float(eager.nfe.float().mean()) < 100  # the filter accepted more than the one-token fallback


@pytest.mark.parametrize("run_ahead", ["always", "auto"])
@pytest.mark.parametrize("strategy", ["steps", "threshold", "learn2pd"])
def test_graphed_run_ahead_gives_the_same_tokens(bundled, monkeypatch, strategy, run_ahead):
    """Iterations launched onto their graphs before the last one is read back (the engine's run-ahead) give the
    tokens and forwards of the engine without it, on a padded batch whose rows finish at different times."""
    model, tok = bundled
    kw = dict(_kw(strategy, "dual", "window"), return_dict_in_generate=True)
    ids, mask = _prompts(tok, 0)
    outs, counters = {}, {}
    for mode in ("off", run_ahead):
        monkeypatch.setenv("L2PD_RUN_AHEAD", mode)
        release(model)
        for _ in range(2):  # eager, then captured
            model.generate(ids, mask, **kw)
        engine = model._l2pd_engine[1]
        before = dict(engine.counters)
        outs[mode] = model.generate(ids, mask, **kw)
        counters[mode] = {k: engine.counters[k] - before[k] for k in ("ahead", "ahead_wasted")}
    release(model)
    # ('always': an iteration whose rows partly went on leaves the others one iteration behind, so the batch
    # meets new shapes, run eagerly first)
    assert outs[run_ahead].path == "graph" if run_ahead == "auto" else outs[run_ahead].graphed > 0
    assert torch.equal(outs[run_ahead].sequences, outs["off"].sequences)
    assert torch.equal(outs[run_ahead].nfe, outs["off"].nfe)
    assert counters["off"]["ahead"] == 0
    if run_ahead == "always" or strategy == "steps":
        assert counters[run_ahead]["ahead"] > 0


def test_eager_engine_pads_as_its_graphs_would(monkeypatch):
    """Without graphs, an engine on CUDA pads an iteration to the graphs' buckets wherever a graph could run it
    (cuBLAS picks its kernel by the rows, so an unpadded eager decode could differ from the graphed one), and
    not where none could (sampling) or where told not to."""
    from l2pd.engine import Engine
    from tests.conftest import tiny_model

    model = tiny_model(seed=3).to("cuda")
    seen = []
    for pad_buckets, temperature in ((None, 0.0), (None, 0.7), (False, 0.0)):
        engine = Engine(model, max_batch=2, cuda_graphs=False, pad_buckets=pad_buckets)
        pack = engine._pack
        case = (pad_buckets, temperature)
        monkeypatch.setattr(engine, "_pack", lambda *a, _p=pack, _c=case, **kw: seen.append((*_c, kw["pad"]))
                            or _p(*a, **kw))
        engine.submit([3, 4, 5], max_new_tokens=8, strategy="steps", block_length=4, temperature=temperature)
        engine.run()
    pads = {(b, t): {p for b_, t_, p in seen if (b_, t_) == (b, t)} for b, t, _ in seen}
    assert pads == {(None, 0.0): {True}, (None, 0.7): {False}, (False, 0.0): {False}}
