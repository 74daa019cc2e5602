"""The training-free rules beside the threshold: margin (top-1 minus top-2 probability) and persistence
gating (a guess unchanged for m forwards). Kernel against reference (fresh random inputs, odd sizes, per-row
params), the history buffer's semantics on hand-made steps, and the rules inside generate and the engine."""

import os

import pytest
import torch

from l2pd_kernels import reference as ref

KERNELS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
MASK, EOS = 9, 8


def _case(B=3, L=7, T=23, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
    canvas = torch.randint(0, 8, (B, T), generator=g)
    canvas[:, 5:] = MASK
    canvas[0, 7] = 3  # a decided position inside the block
    token = torch.randint(0, 9, (B, L), generator=g)
    prob = torch.rand(B, L, generator=g)
    prob[1, 2] = prob[1, 4]  # a tie
    margin = prob * torch.rand(B, L, generator=g)
    hist = (torch.randint(-1, 9, (B, T), generator=g), torch.randint(0, 4, (B, T), generator=g).to(torch.int32))
    return [t.to(DEV) for t in (canvas, token, prob, margin)], tuple(h.to(DEV) for h in hist)


@pytest.mark.skipif(not KERNELS, reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("rule", ["margin", "persistence"])
@pytest.mark.parametrize("eotp", ["off", "accepted"])
@pytest.mark.parametrize("per_row", [False, True])
def test_rule_kernel_matches_reference(rule, eotp, per_row):
    from l2pd_kernels import decide

    (canvas, token, prob, margin), hist = _case()
    B = token.shape[0]
    kw = dict(threshold=0.4, mask_id=MASK, eos_id=EOS, eotp=eotp, rule=rule, persist=2, margin=margin)
    if per_row:
        rows = torch.tensor([2, 0, 1], device=DEV)
        params = torch.tensor([[(5 << 20) | 1, 0], [(6 << 20) | 2, 1], [(5 << 20) | 0, 2]], device=DEV)
        kw.update(rows=rows, params=params)
    outs = []
    for fn in (decide, ref.decide):
        c = canvas.clone()
        h = tuple(x.clone() for x in hist)
        res = fn(c, token, prob, block_start=5, k=1, history=h if rule == "persistence" else None, **kw)
        outs.append((res, c, h))
    (ra, ca, ha), (rb, cb, hb) = outs
    for x, y in zip(ra, rb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(ca, cb, rtol=0, atol=0)
    for x, y in zip(ha, hb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert B == 3


def test_persistence_history_semantics():
    """The run length counts forwards with the same guess (this one included); a guess that changes every
    step never passes; the fallback still makes progress; positions outside the block are untouched."""
    T = 12
    canvas = torch.full((1, T), MASK)
    canvas[0, :4] = 1
    hist = (torch.full((1, T), -1), torch.zeros(1, T, dtype=torch.int32))
    prob = torch.tensor([[0.95, 0.96, 0.2, 0.97]])
    kw = dict(block_start=4, k=0, threshold=0.9, mask_id=MASK, eos_id=EOS, rule="persistence", persist=2,
              history=hist)
    # forward 1: every run is 1: nothing passes (k=0: no fallback)
    ref.decide(canvas, torch.tensor([[5, 6, 7, 3]]), prob, **kw)
    assert (canvas[0, 4:8] == MASK).all() and hist[1][0, 4:8].tolist() == [1, 1, 1, 1]
    # forward 2: positions 4 and 5 keep their guess (run 2, confident): accepted; 6 kept but unsure; 7 changed
    ref.decide(canvas, torch.tensor([[5, 6, 7, 4]]), prob, **kw)
    assert canvas[0, 4:8].tolist() == [5, 6, MASK, MASK]
    assert hist[1][0, 4:8].tolist() == [2, 2, 2, 1] and hist[0][0, 4:8].tolist() == [5, 6, 7, 4]
    assert hist[0][0, :4].tolist() == [-1] * 4 and hist[0][0, 8:].tolist() == [-1] * 4
    # a guess that changes every forward never passes, however confident
    for t in range(5):
        ref.decide(canvas, torch.tensor([[5, 6, 7, t]]), torch.tensor([[1.0, 1.0, 0.2, 1.0]]), **kw)
        assert canvas[0, 7] == MASK
    # persist=1 is the threshold rule
    c2 = canvas.clone()
    ref.decide(c2, torch.tensor([[0, 0, 2, 9]]), torch.tensor([[0.0, 0.0, 0.95, 0.1]]),
               **{**kw, "persist": 1})
    assert c2[0, 6] == 2


def test_margin_rule_reads_the_top2_gap():
    canvas = torch.full((1, 8), MASK)
    prob = torch.tensor([[0.9, 0.9, 0.6, 0.5]])
    margin = torch.tensor([[0.85, 0.2, 0.5, 0.45]])
    ref.decide(canvas, torch.tensor([[1, 2, 3, 4]]), prob, margin=margin, block_start=0, k=0, threshold=0.4,
               mask_id=MASK, eos_id=EOS, rule="margin")
    assert canvas[0, :4].tolist() == [1, MASK, 3, 4]


def test_rules_refuse_missing_inputs():
    canvas = torch.full((1, 8), MASK)
    t, p = torch.zeros(1, 4, dtype=torch.long), torch.rand(1, 4)
    kw = dict(block_start=0, k=1, threshold=0.5, mask_id=MASK, eos_id=EOS)
    with pytest.raises(ValueError, match="margin"):
        ref.decide(canvas, t, p, rule="margin", **kw)
    with pytest.raises(ValueError, match="history"):
        ref.decide(canvas, t, p, rule="persistence", **kw)
    with pytest.raises(ValueError, match="rule"):
        ref.decide(canvas, t, p, rule="vibes", **kw)
    bad = (torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="int32"):
        ref.decide(canvas, t, p, rule="persistence", history=bad, **kw)


@pytest.fixture(scope="module")
def bundled():
    from l2pd.demo import load
    from l2pd.demo.task import split
    from l2pd.demo.tokenizer import prompt_text

    model, tok = load(family="llada", device="cpu")  # exact fp32 arithmetic
    prompts = [tok(prompt_text(tok, p.question), add_special_tokens=False)["input_ids"] for p in split("test", 3)]
    return model, prompts


def test_persistence_of_one_is_the_threshold_rule_in_generate(bundled):
    model, prompts = bundled
    ids = torch.tensor([prompts[0]])
    kw = dict(max_new_tokens=64, block_length=32, threshold=0.9, eotp=True, backend="torch",
              return_dict_in_generate=True)
    a = model.generate(ids, strategy="threshold", **kw)
    b = model.generate(ids, strategy="persistence", persist=1, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.nfe, b.nfe)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_rules_decode_batches_like_single_rows_and_the_engine_agrees(bundled, cache):
    """Left-padded batches with compaction (the history moves with its row) give each row's single decode;
    the engine gives the same tokens."""
    from l2pd.engine import Engine

    model, prompts = bundled
    eos = model.config.eos_token_id
    for opts in (dict(strategy="persistence", persist=2, threshold=0.8), dict(strategy="margin", threshold=0.6)):
        opts = dict(opts, max_new_tokens=64, block_length=32, eotp=True, cache=cache, backend="torch")
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), eos)
        mask = torch.zeros(len(prompts), P, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):], mask[r, P - len(p):] = torch.tensor(p), 1
        batch = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **opts)
        engine = Engine(model, max_batch=2, backend="torch")
        reqs = [engine.submit(p, **{k: v for k, v in opts.items() if k != "backend"}) for p in prompts]
        engine.run()
        for r, p in enumerate(prompts):
            one = model.generate(torch.tensor([p]), return_dict_in_generate=True, **opts)
            assert torch.equal(batch.sequences[r, P:], one.sequences[0, len(p):]), (opts, r)
            assert batch.nfe[r] == one.nfe[0]
            ans = one.sequences[0, len(p):].tolist()
            assert reqs[r].tokens == (ans[: ans.index(eos)] if eos in ans else ans), (opts, r)
        assert 1 < float(batch.nfe.float().mean()) < 64  # it decoded in parallel, and not in one go


def test_sweep_grid_and_cli_take_the_rules():
    from l2pd.args import Parser  # noqa: F401  (the CLI's parser module)
    from l2pd.cli import build_parser
    from l2pd.sweep import grid

    g = grid(["steps", "margin", "persistence"], [0.8, 0.9], ["accepted"], [32], ["none"], [2, 3])
    assert sum(c["strategy"] == "persistence" for c in g) == 4 and sum(c["strategy"] == "margin" for c in g) == 2
    assert all((c["persist"] is None) == (c["strategy"] != "persistence") for c in g)
    args = build_parser().parse_args(["sweep", "--strategies", "margin,persistence", "--persist", "2,4"])
    assert args.strategies == ["margin", "persistence"] and args.persist == [2, 4]
    args = build_parser().parse_args(["generate", "--prompt", "x", "--strategy", "persistence", "--persist", "3"])
    assert args.persist == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("opts", [dict(strategy="persistence", persist=2, threshold=0.8),
                                  dict(strategy="margin", threshold=0.6)])
def test_graphed_rule_decode_equals_eager(opts):
    from l2pd.demo import load

    model, _ = load(device="cuda")
    ids = torch.randint(3, 600, (4, 40), device="cuda")
    kw = dict(opts, max_new_tokens=96, block_length=32, eotp=True, cache="dual", return_dict_in_generate=True)
    eager = model.generate(ids, cuda_graph=False, **kw)
    for _ in range(3):  # the first call of a shape runs eagerly, the second captures, the third replays
        graphed = model.generate(ids, cuda_graph=True, **kw)
    assert graphed.path == "graph" or graphed.graphed > 0
    assert torch.equal(eager.sequences, graphed.sequences) and torch.equal(eager.nfe, graphed.nfe)
