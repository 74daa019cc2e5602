"""The decode engine: every request gets exactly what ``generate`` gives its prompt alone, whatever shares
its iterations and whenever it joined; cancellation, deadlines, stop strings, the token budget, failures.

Bundled models (trained, so their greedy answers are the ones a user checks), CPU, reference ops; the
kernel path of the packed forward runs under TRITON_INTERPRET=1 on a tiny model.
"""

import functools
import random

import pytest
import torch

from l2pd.engine import Engine, EngineClosed
from tests.conftest import needs_kernels, tiny_model

# the reference decision ops on both sides (the interpreter would make these tests slow); the kernel path has
# its own test at the end
Engine = functools.partial(Engine, backend="torch")


@pytest.fixture(scope="module")
def bundled():
    from l2pd.demo import load
    from l2pd.demo.task import split
    from l2pd.demo.tokenizer import prompt_text

    model, tok = load(family="llada", device="cpu")  # exact fp32 arithmetic
    prompts = [tok(prompt_text(tok, p.question))["input_ids"] for p in split("test", 5)]
    prompts[1] = prompts[1][4:]  # lengths differ
    prompts[3] = prompts[3][:30]
    return model, tok, prompts


def _alone(model, prompt, **options):
    """``generate`` on one prompt: the answer up to its first end of text."""
    out = model.generate(torch.tensor([prompt]), backend="torch", **options)[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    return out[: out.index(eos)] if eos in out else out


CONFIGS = [
    dict(max_new_tokens=96, cache="dual", refresh="window"),  # learn2pd with the bundled filter (block 128)
    dict(max_new_tokens=70, cache="prefix", strategy="threshold", threshold=0.9, block_length=32),
    dict(max_new_tokens=64, cache="none", strategy="steps", block_length=16, steps=32, eotp=False),
    dict(max_new_tokens=80, cache="dual", refresh="tail", strategy="threshold", eotp="predicted", block_length=32),
    dict(max_new_tokens=50, cache="dual", refresh="full", strategy="threshold", threshold=0.7, block_length=24,
         eotp=True),
]


def test_engine_matches_generate_alone_across_strategies_and_caches(bundled):
    model, _, prompts = bundled
    engine = Engine(model, max_batch=3, filter=model.l2pd_filter)  # fewer slots than requests: rows join mid-way
    jobs = [(p, c, engine.submit(p, **c)) for c in CONFIGS for p in prompts[:3]]
    engine.run()
    for p, c, req in jobs:
        assert req.finish_reason in ("stop", "length")
        assert req.tokens == _alone(model, p, **c), (len(p), c)
        assert req.forwards > 0
    counters = engine.counters
    assert counters["admitted"] == counters["finished"] == len(jobs)
    assert counters["forwards"] == sum(r.forwards for _, _, r in jobs)
    assert not engine.rows and not engine.waiting


def test_tokens_never_depend_on_arrival_order_or_batch(bundled):
    """Property: random arrival times (requests submitted between iterations), random pool sizes and token
    budgets; every request's tokens equal its prompt's tokens alone."""
    model, _, prompts = bundled
    options = [dict(max_new_tokens=48 + 8 * i, strategy="threshold", block_length=16, cache="dual",
                    refresh=("window", "full", "tail")[i % 3], eotp=bool(i % 2)) for i in range(4)]
    want = {(i, j): _alone(model, p, **o) for i, p in enumerate(prompts) for j, o in enumerate(options)}
    for trial in range(3):
        rng = random.Random(int(torch.randint(0, 2**31 - 1, (1,))))
        engine = Engine(model, max_batch=rng.choice([1, 2, 5]), max_step_tokens=rng.choice([64, 400, 8192]))
        arrivals = list(want)
        rng.shuffle(arrivals)
        submitted = []
        while arrivals or engine.load():
            for _ in range(rng.choice([0, 0, 1, 3])):
                if arrivals:
                    i, j = arrivals.pop()
                    submitted.append(((i, j), engine.submit(prompts[i], **options[j])))
            engine.step()
        assert len(submitted) == len(want)
        for key, req in submitted:
            assert req.tokens == want[key], (trial, key)


def test_batch_generate_refreshes_every_row_in_its_first_iteration(bundled):
    """``Engine.generate`` (all prompts at once) lifts the token budget for the call: no refresh is deferred, the
    rows' tokens are those of ``generate`` alone, and the serving budget is back afterwards."""
    model, _, prompts = bundled
    opts = dict(max_new_tokens=48, strategy="threshold", block_length=16, cache="dual", refresh="full")
    engine = Engine(model, max_batch=5, max_step_tokens=64)
    reqs = engine.generate(prompts, **opts)
    assert engine.counters["deferred_refreshes"] == 0 and engine.max_step_tokens == 64
    assert [r.tokens for r in reqs] == [_alone(model, p, **opts) for p in prompts]


def test_padded_iterations_give_the_same_tokens(bundled):
    """Iterations padded to the CUDA graphs' buckets (padding rows and tokens on the pool's spare row) change
    no request's tokens (the graphs replay exactly this padded iteration)."""
    model, _, prompts = bundled
    opts = [dict(max_new_tokens=40 + 8 * i, strategy="threshold", block_length=16, cache="dual",
                 refresh=("window", "full", "tail")[i % 3]) for i in range(3)]
    engine = Engine(model, max_batch=5, pad_buckets=True)
    jobs = [(p, o, engine.submit(p, **o)) for o in opts for p in prompts]
    engine.run()
    for p, o, req in jobs:
        assert req.tokens == _alone(model, p, **o)
    assert engine.canvas[-1].ne(model.config.mask_token_id).all()  # the spare row never holds a mask


def test_padding_wider_than_a_narrow_pool_stays_in_the_spare_row(bundled):
    """``generate``'s engine is as wide as its canvas; the padding tokens of a large iteration (up to 1/8 of its
    tokens) may outnumber the spare row's slots: they cycle through them, and no request's tokens change."""
    model, tok, _ = bundled
    from l2pd.demo.task import split
    from l2pd.demo.tokenizer import prompt_text

    prompts = [tok(prompt_text(tok, p.question))["input_ids"] for p in split("test", 40)]
    opts = dict(max_new_tokens=32, strategy="threshold", block_length=16, cache="none")
    engine = Engine(model, max_batch=40, max_length=max(map(len, prompts)) + 32, max_block_length=16,
                    max_step_tokens=1 << 16, pad_buckets=True)
    jobs = [(p, engine.submit(p, **opts)) for p in prompts]
    widest = []
    pack = engine._pack
    engine._pack = lambda *a, **k: (lambda r: (widest.append(r[1]["sizes"][0]), r)[1])(pack(*a, **k))
    engine.run()
    assert max(widest) - sum(len(p) + 32 for p in prompts) > engine.canvas.shape[1]  # padding past the row
    for p, req in jobs:
        assert req.tokens == _alone(model, p, **opts)


def test_dream_family_matches_generate():
    from l2pd.demo import load
    from l2pd.demo.task import split
    from l2pd.demo.tokenizer import prompt_text

    model, tok = load(family="dream", device="cpu")
    prompts = [tok(prompt_text(tok, p.question))["input_ids"] for p in split("test", 3)]
    prompts[2] = prompts[2][3:]
    engine = Engine(model, max_batch=2, filter=model.l2pd_filter, run_ahead="always")
    configs = [dict(max_new_tokens=64), dict(max_new_tokens=72, strategy="threshold", block_length=32,
                                             cache="dual", refresh="window")]
    jobs = [(p, c, engine.submit(p, **c)) for c in configs for p in prompts]
    engine.run()
    for p, c, req in jobs:
        assert req.tokens == _alone(model, p, **c), c


@pytest.mark.parametrize("run_ahead", ["off", "always"])
def test_block_causal_family_matches_generate(run_ahead):
    """The bundled LLaDA 2.x-format model (mixture of experts, block-causal attention): every strategy and cache
    gives each request what ``generate`` gives its prompt alone (also with every iteration launched ahead)."""
    from l2pd.demo import load
    from l2pd.demo.task import split
    from l2pd.demo.tokenizer import prompt_text

    model, tok = load(family="llada2", device="cpu")
    prompts = [tok(prompt_text(tok, p.question))["input_ids"] for p in split("test", 3)]
    prompts[1] = prompts[1][3:]  # the first block holds a different share of each prompt's tail
    engine = Engine(model, max_batch=2, filter=model.l2pd_filter, run_ahead=run_ahead)
    configs = [dict(max_new_tokens=40),  # learn2pd with the bundled filter
               dict(max_new_tokens=37, strategy="threshold", block_length=8, cache="dual", refresh="window"),
               dict(max_new_tokens=30, strategy="steps", block_length=8, steps=15, cache="none", eotp=False),
               dict(max_new_tokens=45, strategy="threshold", block_length=16, cache="prefix", eotp="predicted"),
               # LLaDA 2.1's token editing: tokens of a block are final only once it ends
               dict(max_new_tokens=40, strategy="threshold", threshold=0.7, block_length=16, cache="dual",
                    refresh="window", edit_threshold=0.3, edit_steps=4)]
    jobs = [(p, c, engine.submit(p, **c)) for c in configs for p in prompts]
    engine.run()
    for p, c, req in jobs:
        assert req.tokens == _alone(model, p, **c), c
        assert req.finish_reason in ("stop", "length")


def test_partial_answers_continue_as_in_generate(bundled):
    """``answer=``: its tokens stay, its masks are decoded; blocks it fills are skipped (no forward), as in
    ``generate``, and the forwards match too. An answer without masks takes no forward at all."""
    model, _, prompts = bundled
    M = model.config.mask_token_id
    opts = dict(max_new_tokens=48, strategy="threshold", block_length=8, eotp=False)
    full = model.generate(torch.tensor([prompts[1]]), backend="torch", **opts)[0, len(prompts[1]):].tolist()
    given = [M if 8 <= i < 20 or 32 <= i < 40 else t for i, t in enumerate(full)]  # block 0 given, 2 and 3 too
    engine = Engine(model, max_batch=2)
    jobs = [(p, o, a, engine.submit(p, answer=a, **o)) for o in (dict(opts, cache="dual", refresh="window"),
                                                                 dict(opts, cache="none"))
            for p in prompts[:2] for a in (given, full)]
    engine.run()
    for p, o, a, req in jobs:
        want = model.generate(torch.tensor([p]), backend="torch", answer=torch.tensor([a]),
                              return_dict_in_generate=True, **o)
        out = want.sequences[0, len(p):].tolist()
        eos = model.config.eos_token_id
        assert req.tokens == (out[: out.index(eos)] if eos in out else out)
        assert req.forwards == want.forwards and (req.forwards == 0) == (a is full)
    with pytest.raises(ValueError, match="answer"):
        engine.submit(prompts[0], answer=given[:10], **opts)


def test_sampling_with_a_seed_matches_generate_at_batch_one(bundled):
    model, _, prompts = bundled
    opts = dict(max_new_tokens=40, strategy="threshold", block_length=16, temperature=0.8, seed=1234,
                cache="dual")
    engine = Engine(model, max_batch=4)
    reqs = [engine.submit(p, **opts) for p in prompts[:3]]
    engine.run()
    for p, r in zip(prompts, reqs):
        assert r.tokens == _alone(model, p, **opts)


def test_events_stream_every_final_token_once_in_order(bundled):
    model, _, prompts = bundled
    seen, ends = [], []

    def on_event(req, tokens):
        seen.extend(tokens)
        if req.finish_reason is not None:
            ends.append(req.finish_reason)

    engine = Engine(model, max_batch=2)
    req = engine.submit(prompts[0], on_event=on_event, max_new_tokens=64, strategy="threshold", block_length=16)
    engine.run()
    assert seen == req.tokens and ends == [req.finish_reason] and req.done.is_set()
    assert req.first_token is not None and req.finished >= req.first_token
    seen.clear()  # a request that ends at its token budget, inside a block: its last tokens come once too
    req = engine.submit(prompts[0], on_event=on_event, max_new_tokens=20, strategy="threshold", block_length=8)
    engine.run()
    assert req.finish_reason == "length" and len(req.tokens) == 20 and seen == req.tokens


def test_cancel_frees_the_row_at_the_next_iteration(bundled):
    model, _, prompts = bundled
    engine = Engine(model, max_batch=1)
    a = engine.submit(prompts[0], max_new_tokens=128, strategy="steps", block_length=32)  # 128 forwards
    b = engine.submit(prompts[1], max_new_tokens=32, strategy="threshold", block_length=32)
    engine.step()
    engine.step()
    assert a.finish_reason is None and 0 in engine.rows
    a.cancel()
    engine.step()  # a leaves, b takes its slot in the same iteration
    assert a.finish_reason == "cancelled" and a.done.is_set()
    assert engine.rows[0].request is b
    engine.run()
    assert b.tokens == _alone(model, prompts[1], max_new_tokens=32, strategy="threshold", block_length=32)
    assert engine.counters["cancelled"] == 1


def test_deadline_drops_a_request(bundled):
    model, _, prompts = bundled
    engine = Engine(model, max_batch=2)
    req = engine.submit(prompts[0], max_new_tokens=64, strategy="steps", timeout=0.0)
    engine.run()
    assert req.finish_reason == "timeout" and engine.counters["timed_out"] == 1


def test_stop_strings_end_the_request(bundled):
    model, tok, prompts = bundled
    full = _alone(model, prompts[0], max_new_tokens=96, strategy="threshold", block_length=32)
    text = tok.decode(full)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine = Engine(model, max_batch=2, tokenizer=tok)
    req = engine.submit(prompts[0], stop=[stop, "never-said"], max_new_tokens=96, strategy="threshold",
                        block_length=32)
    engine.run()
    assert req.finish_reason == "stop" and req.stop_hit == stop
    assert req.tokens == full[: len(req.tokens)] and len(req.tokens) < len(full)
    assert stop in tok.decode(req.tokens)


def test_a_failing_request_leaves_the_others_alone(bundled):
    model, _, prompts = bundled

    def explode(req, tokens):
        raise RuntimeError("client went away badly")

    engine = Engine(model, max_batch=3)
    bad = engine.submit(prompts[0], on_event=explode, max_new_tokens=64, strategy="threshold", block_length=16)
    good = engine.submit(prompts[1], max_new_tokens=64, strategy="threshold", block_length=16)
    engine.run()
    assert bad.finish_reason == "error" and "client went away" in bad.error
    assert good.tokens == _alone(model, prompts[1], max_new_tokens=64, strategy="threshold", block_length=16)


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=5000), "exceeds"),
    (dict(strategy="fast"), "strategy"),
    (dict(strategy="oracle"), "oracle"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(block_length=512), "block_length"),
    (dict(top_p=0.5), "top_p"),
    (dict(stop=[3]), "stop"),
    (dict(edit_threshold=-0.5), "edit_threshold"),
    (dict(edit_steps=3), "edit_steps"),
])
def test_bad_requests_are_refused_by_name(bundled, bad, match):
    model, _, prompts = bundled
    engine = Engine(model, max_batch=1)
    with pytest.raises(ValueError, match=match):
        engine.submit(prompts[0], **bad)
    with pytest.raises(ValueError, match="mask token"):
        engine.submit([5, model.config.mask_token_id, 6])
    with pytest.raises(ValueError, match="non-empty"):
        engine.submit([])
    assert engine.load() == 0


def test_background_loop_and_draining_stop(bundled):
    model, _, prompts = bundled
    engine = Engine(model, max_batch=2)
    engine.start()
    reqs = [engine.submit(p, max_new_tokens=40, strategy="threshold", block_length=16) for p in prompts[:3]]
    engine.stop(drain=60)
    assert all(r.done.is_set() and r.finish_reason in ("stop", "length") for r in reqs)
    with pytest.raises(EngineClosed):
        engine.submit(prompts[0])


def test_generate_from_several_threads_at_once(bundled):
    """generate() keeps one engine on the model; calls from several threads at once take turns on it, and
    each gets the answers it gets alone (they once shared its iterations, and two of four came back wrong)."""
    import threading

    model, _, prompts = bundled
    batches = [torch.tensor([p[:30] for p in prompts[i : i + 2]]) for i in (0, 2, 1)]
    kw = dict(max_new_tokens=32, block_length=32, strategy="threshold", threshold=0.9, cache="dual", backend="torch")
    want = [model.generate(ids, **kw) for ids in batches]
    got = [None] * len(batches)

    def run(i):
        got[i] = model.generate(batches[i], **kw)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)  # (a deadlock fails here rather than hanging the run)
    assert not any(t.is_alive() for t in threads)
    assert all(g is not None and torch.equal(g, w) for g, w in zip(got, want))


def test_generate_from_inside_a_decode_callback_is_refused(bundled):
    """A callback that calls generate on the same model would step the engine inside its own iteration (and,
    holding its lock, could not wait for it): a clear error instead, and the engine still decodes after."""
    model, _, prompts = bundled
    ids = torch.tensor([prompts[0][:30]])
    kw = dict(max_new_tokens=32, block_length=32, strategy="threshold", cache="dual", backend="torch")

    def on_step(*args, **kwargs):
        model.generate(ids, **kw)

    with pytest.raises(RuntimeError, match="from inside one of its own iterations"):
        model.generate(ids, on_step=on_step, **kw)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw))
    # the same from a request's callback on a running engine's loop (it would wait for itself)
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        errors = []

        def on_event(req, tokens):
            if not errors:
                try:
                    engine.generate([prompts[1]], max_new_tokens=16)
                except RuntimeError as exc:
                    errors.append(str(exc))

        engine.submit(prompts[0], max_new_tokens=32, on_event=on_event).wait(60)
        assert errors and "from inside one of its own iterations" in errors[0]
    finally:
        engine.stop(drain=60)


def test_batch_generate_on_a_running_engine_waits_for_the_loop(bundled):
    model, _, prompts = bundled
    import threading

    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        options = dict(max_new_tokens=40, strategy="threshold", block_length=16)
        got = []
        caller = threading.Thread(target=lambda: got.extend(engine.generate(prompts[:3], **options)), daemon=True)
        caller.start()
        caller.join(timeout=300)  # (it waits for the loop: a deadlock fails here rather than hanging the run)
        assert not caller.is_alive() and len(got) == 3
        for p, r in zip(prompts, got):
            assert r.finish_reason in ("stop", "length") and r.tokens == _alone(model, p, **options)
    finally:
        engine.stop(drain=60)


@needs_kernels
def test_key_split_is_planned_alike_with_and_without_padding(monkeypatch):
    """A graphed iteration is padded (more tokens, rows and attention tiles); its key split must be planned as
    for the same iteration unpadded, since the split changes the attention's sums (a graphed decode would
    otherwise differ from its eager form): the plan sees bucketed counts either way."""
    import l2pd_kernels.attention as att

    plans = []
    monkeypatch.setattr(att, "pool_split_plan", lambda *a, **k: plans.append(a[0]) or (1, 0))
    model = tiny_model(seed=3, n_kv_heads=2, d_model=64, n_heads=4)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [5, 6, 7]]
    seen, tiles = [], []
    for pad in (False, True):
        plans.clear()
        engine = Engine(model, max_batch=3, backend="triton", fused=True, pad_buckets=pad, cuda_graphs=False)
        real = []
        body = engine._body
        engine._body = lambda dev, meta, *a, _r=real, _b=body: _r.append(int(meta["sizes"][-1]) // 2) or _b(
            dev, meta, *a)
        for p in prompts:
            engine.submit(p, max_new_tokens=8, strategy="steps", block_length=4, cache="dual", refresh="full")
        engine.run()
        seen.append(list(plans))
        tiles.append(real)
    assert seen[0] and seen[0] == seen[1]
    assert tiles[0] != tiles[1]  # the padded iterations did run more attention tiles


@needs_kernels
@pytest.mark.parametrize("split, fused_rope", [(False, False), (True, False), (False, True)])
def test_kernel_path_matches_reference_path(split, fused_rope, monkeypatch):
    """The packed forward through the Triton kernels (pool attention, rope rows, per-row decide) gives the
    reference path's tokens on a tiny random model; ``split``: the pool attention's keys split in two chunks
    and merged (as a batch-1 step on a GPU; here the second chunk is empty); ``fused_rope``: the packed q/k/v
    product does rope_qkv's work in the same launch (``L2PD_FUSED_ROPE``)."""
    import l2pd_kernels
    import l2pd_kernels.attention as att
    from l2pd.models import adapter_for, decoder

    plans, fused = [], []
    if split:
        monkeypatch.setattr(att, "pool_split_plan", lambda *a, **k: plans.append(a) or (2, 64))
    monkeypatch.setattr(decoder, "FUSED_ROPE", fused_rope)
    real = l2pd_kernels.linear_rope_qkv
    monkeypatch.setattr(l2pd_kernels, "linear_rope_qkv", lambda *a, **k: fused.append(1) or real(*a, **k))
    model = tiny_model(seed=3, n_kv_heads=2, d_model=64, n_heads=4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    decoder.pack_layers(adapter_for(model).decoder.layers, cpu=True)  # one q/k/v weight, as on a GPU
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    opts = dict(max_new_tokens=8, strategy="threshold", threshold=0.3, block_length=4, cache="dual",
                refresh="window", eotp=True)
    out = []
    for kernels in (False, True):
        engine = Engine.func(model, max_batch=2, backend="triton" if kernels else "torch", fused=kernels)
        reqs = [engine.submit(p, **opts) for p in prompts]
        engine.run()
        out.append([r.tokens for r in reqs])
    assert out[0] == out[1]
    assert sum(len(t) for t in out[0]) >= 4  # something was decoded on both paths
    assert bool(plans) == split and bool(fused) == fused_rope


def test_stop_ends_every_request_even_beyond_the_free_rows(bundled):
    """Requests still queued when the engine stops (more than it has rows) end as cancelled: no caller waits."""
    model, _, prompts = bundled
    engine = Engine(model, max_batch=1)
    reqs = [engine.submit(p, max_new_tokens=64, strategy="steps", block_length=32) for p in prompts]
    engine.step()
    engine.stop(drain=0)
    assert all(r.done.is_set() for r in reqs) and {r.finish_reason for r in reqs} == {"cancelled"}
    assert not engine.rows and not engine.waiting


AHEAD_CONFIGS = CONFIGS + [
    # only the schedule decides: 'auto' runs ahead on every forward
    dict(max_new_tokens=64, cache="dual", refresh="full", strategy="steps", block_length=32, steps=64, eotp=False),
    dict(max_new_tokens=64, cache="prefix", strategy="steps", block_length=16, steps=16, eotp=True),
    dict(max_new_tokens=64, cache="dual", refresh="window", strategy="persistence", threshold=0.8, block_length=32),
]


def _decode_all(model, prompts, run_ahead, tok=None, **engine_kw):
    """Every prompt under every config on one engine of 2 rows (rows join as others finish): each request's
    (tokens, forwards, finish reason), and the engine's counters."""
    engine = Engine(model, max_batch=2, filter=model.l2pd_filter, run_ahead=run_ahead, tokenizer=tok, **engine_kw)
    reqs = [engine.submit(p, **c) for c in AHEAD_CONFIGS for p in prompts]
    engine.run()
    assert engine._ahead is None  # nothing left in flight once idle
    return [(r.tokens, r.forwards, r.finish_reason) for r in reqs], engine.counters


@pytest.mark.parametrize("run_ahead", ["always", "auto"])
def test_run_ahead_gives_the_same_tokens_and_forwards(bundled, run_ahead):
    """An iteration launched before the last one is read back counts only for the rows still where it supposed;
    the others' part of it (a block without masks, a finished row) changes nothing they read. 'always' runs
    ahead at every iteration it can, so it guesses wrong often; 'auto' only where the schedule alone decides,
    where it guesses wrong only at an answer's end."""
    model, _, prompts = bundled
    want, base = _decode_all(model, prompts[:4], "off")
    got, counters = _decode_all(model, prompts[:4], run_ahead)
    assert got == want
    assert base["ahead"] == 0 and counters["ahead"] > 0
    assert counters["forwards"] == base["forwards"] == sum(f for _, f, _ in got)
    if run_ahead == "always":  # the wrong guesses were exercised
        assert counters["ahead_wasted"] > 0
    single, c = _decode_all(model, prompts[:1], run_ahead)
    assert single == [w for i, w in enumerate(want) if i % 4 == 0]


def test_run_ahead_auto_guesses_right_where_the_schedule_decides(bundled):
    model, _, prompts = bundled
    engine = Engine(model, max_batch=1, run_ahead="auto")
    req = engine.submit(prompts[0], max_new_tokens=64, strategy="steps", block_length=16, steps=8, eotp=False,
                        cache="dual", refresh="window")
    engine.run()
    c = engine.counters
    # every forward but the first is launched ahead (a block's second by its first, the next block's refresh
    # by its second); the one after the answer's end, if launched, counts for nothing
    assert req.forwards > 2 and c["iterations"] == req.forwards
    assert c["ahead"] - c["ahead_wasted"] == req.forwards - 1 and c["ahead_wasted"] <= 1
    engine = Engine(model, max_batch=1, run_ahead="auto")
    engine.submit(prompts[0], max_new_tokens=64, strategy="threshold", threshold=0.9, block_length=16)
    engine.run()
    assert engine.counters["ahead"] == 0  # a threshold decides: no guess


def test_run_ahead_with_stops_cancellation_and_generate(bundled, monkeypatch):
    """A stop string ends a request while its next forward is in flight; a cancelled row's slot is taken by the
    next request; ``generate`` (padded batch, whole canvases) under 'always' equals 'off'."""
    model, tok, prompts = bundled
    full = _alone(model, prompts[0], max_new_tokens=96, strategy="steps", block_length=32, steps=48)
    text = tok.decode(full)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    outs = []
    for mode in ("off", "always"):
        engine = Engine(model, max_batch=2, tokenizer=tok, run_ahead=mode)
        a = engine.submit(prompts[0], stop=[stop], max_new_tokens=96, strategy="steps", block_length=32, steps=48)
        b = engine.submit(prompts[1], max_new_tokens=96, strategy="steps", block_length=32, steps=48)
        c = engine.submit(prompts[2], max_new_tokens=64, strategy="threshold", block_length=32)
        engine.step()
        engine.step()
        b.cancel()  # c takes its slot
        engine.run()
        outs.append([(r.tokens, r.finish_reason) for r in (a, b, c)])
    assert outs[0] == outs[1] and outs[0][0][1] == "stop" and outs[0][1][1] == "cancelled"
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts[:3]], batch_first=True,
                                          padding_value=model.config.eos_token_id).flip(1)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(p)) for p in prompts[:3]], batch_first=True).flip(1)
    res = []
    for mode in ("off", "always"):
        monkeypatch.setenv("L2PD_RUN_AHEAD", mode)
        from l2pd.decode import release

        release(model)
        res.append([model.generate(ids, mask.long(), backend="torch", max_new_tokens=64, cache="dual", eotp=e,
                                   return_dict_in_generate=True, **kw)
                    for e, kw in ((True, dict(strategy="steps", steps=32, block_length=16)),
                                  (False, dict(strategy="threshold", block_length=32)))])
        release(model)
    for a, b in zip(*res):
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.nfe, b.nfe)
    with pytest.raises(ValueError, match="run_ahead"):
        Engine(model, run_ahead="sometimes")


def _head_sizes(monkeypatch) -> list:
    """The head over the masked positions (``L2PD_HEAD_ROWS=1``) at any size; returns the list the iterations'
    head rows and block positions are appended to."""
    import l2pd.engine as eng

    monkeypatch.setattr(eng, "HEAD_ROWS", True)
    monkeypatch.setattr(eng, "HEAD_ROWS_MIN", 0)
    sizes = []
    real = eng.Engine._head_rows
    monkeypatch.setattr(eng.Engine, "_head_rows", staticmethod(
        lambda order, meta: (lambda u: sizes.append((u, meta["rows"] * meta["width"])) or u)(real(order, meta))))
    return sizes


@pytest.mark.parametrize("run_ahead", ["off", "always"])
def test_head_over_the_masked_positions_gives_the_same_tokens(bundled, run_ahead, monkeypatch):
    """The LM head over the blocks' still-masked positions only (their count bounded by the host's last read
    back, rounded up to an eighth of the positions; results put back at their positions): every strategy, rule
    and cache gives the tokens and forwards of the head over every position; with iterations launched ahead,
    whose bound lags one read back."""
    import l2pd.engine as eng

    model, _, prompts = bundled
    monkeypatch.setattr(eng, "HEAD_ROWS", False)
    want, _ = _decode_all(model, prompts[:2], run_ahead, pad_buckets=True)
    monkeypatch.setattr(eng, "HEAD_ROWS", True)
    sizes = _head_sizes(monkeypatch)
    got, _ = _decode_all(model, prompts[:2], run_ahead, pad_buckets=True)
    assert got == want
    assert any(0 < u < n for u, n in sizes)  # fewer rows than positions, often
    assert all(u % max(16, n // 8) == 0 and u < n for u, n in sizes if u)


def test_head_over_the_masked_positions_in_every_family(monkeypatch):
    """Dream (logits one position to the left) and the block-causal LLaDA2 family: the same tokens as
    ``generate`` alone with the head over the masked positions; token editing reads every position's guess,
    so its iterations keep the whole head."""
    from l2pd.demo import load
    from l2pd.demo.task import split
    from l2pd.demo.tokenizer import prompt_text

    sizes = _head_sizes(monkeypatch)
    configs = {"dream": [dict(max_new_tokens=64, strategy="threshold", block_length=32, cache="dual",
                              refresh="window")],
               "llada2": [dict(max_new_tokens=40, strategy="threshold", block_length=16, cache="dual",
                               refresh="window"),
                          dict(max_new_tokens=40, strategy="threshold", threshold=0.7, block_length=16,
                               cache="dual", refresh="window", edit_threshold=0.3, edit_steps=4)]}
    for family, confs in configs.items():
        model, tok = load(family=family, device="cpu")
        prompts = [tok(prompt_text(tok, p.question))["input_ids"] for p in split("test", 3)]
        for c in confs:
            sizes.clear()
            engine = Engine(model, max_batch=3, pad_buckets=True)
            jobs = [(p, engine.submit(p, **c)) for p in prompts]
            engine.run()
            for p, req in jobs:
                assert req.tokens == _alone(model, p, **c), (family, c)
            assert any(sizes) and (any(u for u, _ in sizes) == ("edit_threshold" not in c)), (family, sizes)


def test_a_wrong_bound_on_the_masked_positions_is_an_error(bundled, monkeypatch):
    """More masked positions than the head's rows (a bound the host got wrong) fails the iteration by name,
    never a decision over missing logits."""
    import l2pd.engine as eng

    model, _, prompts = bundled
    monkeypatch.setattr(eng.Engine, "_head_rows", staticmethod(lambda order, meta: 1))
    engine = Engine(model, max_batch=2, pad_buckets=True)
    reqs = [engine.submit(p, max_new_tokens=32, strategy="threshold", block_length=16) for p in prompts[:2]]
    with pytest.raises(RuntimeError, match="outnumbered the head's 1 rows"):
        engine.run()
    assert {r.finish_reason for r in reqs} == {"error"}


@needs_kernels
def test_head_over_the_masked_positions_on_the_kernel_path(monkeypatch):
    """The Triton path (confidence, decide, the packed forward) with the head over the masked positions gives
    the reference path's tokens."""
    from l2pd.models import adapter_for, decoder

    sizes = _head_sizes(monkeypatch)
    model = tiny_model(seed=5, n_kv_heads=2, d_model=64, n_heads=4)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    decoder.pack_layers(adapter_for(model).decoder.layers, cpu=True)
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [5, 6, 7]]
    opts = dict(max_new_tokens=8, strategy="threshold", threshold=0.6, block_length=8, cache="dual",
                refresh="window", eotp=True)
    out = []
    for kernels in (False, True):
        engine = Engine.func(model, max_batch=3, backend="triton" if kernels else "torch", fused=kernels,
                             pad_buckets=True)
        reqs = [engine.submit(p, **opts) for p in prompts]
        engine.run()
        out.append([r.tokens for r in reqs])
    assert out[0] == out[1] and sum(map(len, out[0])) >= 4
    assert any(0 < u < n for u, n in sizes)


def test_generate_counts_the_positions_fed_and_the_head_rows(bundled, monkeypatch):
    """``generate``'s output counts the positions its forwards fed (the prompt's first forward included) and
    the rows the LM head ran over: every block position of every forward, or fewer with the head over the
    masked positions, for the same tokens and fed positions."""
    import l2pd.engine as eng

    model, _, prompts = bundled
    ids = torch.tensor([p[:24] for p in prompts[:4]])
    kw = dict(max_new_tokens=64, strategy="threshold", block_length=16, cache="dual", refresh="window",
              return_dict_in_generate=True, backend="torch")
    monkeypatch.setattr(eng, "HEAD_ROWS", False)
    full = model.generate(ids, **kw)
    assert full.fed_tokens >= 4 * (24 + 64)
    assert full.logit_rows >= 16 * full.forwards  # (padded rows included: at least one block a forward)
    monkeypatch.setattr(eng, "HEAD_ROWS", True)
    _head_sizes(monkeypatch)
    fewer = model.generate(ids, **kw)
    assert torch.equal(fewer.sequences, full.sequences) and fewer.fed_tokens == full.fed_tokens
    assert fewer.forwards == full.forwards and fewer.logit_rows < full.logit_rows
