"""The step's cheaper refreshes, and rows of a batch that finish apart (CPU; the bundled model for EoTP)."""

import pytest
import torch

import l2pd
from l2pd.cache import BlockKVCache
from l2pd.demo.task import split
from l2pd.evaluate import encode_prompts
from l2pd.models.llada import llada_forward
from tests.conftest import FILTER32, tiny_model


@pytest.mark.parametrize("refresh", ["tail", "window"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_reduced_refresh_equals_full_on_an_unchanged_canvas(refresh, mode):
    """Nothing changed since the last full refresh: the reduced refresh writes the same K/V and gives the
    same block logits as a full one."""
    model = tiny_model(seed=5)
    tf, cfg = model.model.transformer, model.config
    P, G, L = 7, 24, 8
    ids = torch.randint(0, 58, (2, P + G))
    kv = BlockKVCache.for_model(cfg, 2, P + G, mode, torch.float32, "cpu", refresh)
    s = P + 2 * L  # the third block; the previous one starts at P + L
    full = llada_forward(tf, cfg, ids, cache=kv, logits_slice=(s, s + L))
    k_full, v_full = kv.k.clone(), kv.v.clone()
    lo, hi = kv.refresh_range(P + L, s + L)
    assert (lo, hi) != (0, P + G)
    kv.k[:, :, :, lo:hi] = float("nan")  # the reduced refresh must write every slot it feeds
    kv.v[:, :, :, lo:hi] = float("nan")
    reduced = llada_forward(tf, cfg, ids[:, lo:hi], cache=kv, start=lo, logits_slice=(s - lo, s - lo + L))
    torch.testing.assert_close(reduced, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv.k, k_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv.v, v_full, rtol=1e-5, atol=1e-5)


def test_window_refresh_ranges():
    kv = BlockKVCache(1, 1, 1, 100, 2, mode="dual", refresh="window")
    assert kv.refresh_range(None, 50) == (0, 100)  # the first block refreshes everything
    assert kv.refresh_range(40, 60) == (40, 60)  # then the finished block and the new one
    kv.mode = "prefix"  # prefix steps feed the suffix anyway: window is tail there
    assert kv.refresh_range(40, 60) == (40, 100)
    with pytest.raises(ValueError, match="refresh"):
        BlockKVCache(1, 1, 1, 100, 2, refresh="sometimes")


@pytest.fixture(scope="module")
def bundled():
    return l2pd.demo.load(device="cpu")


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("strategy", ["threshold", "learn2pd"])
def test_rows_that_finish_early_leave_without_changing_any_row(bundled, cache, strategy):
    """Rows of a batch end at different blocks (EoTP) and leave the engine's iterations: every row's answer
    and forwards are those of its prompt alone, and the batch runs no more forwards than its longest row."""
    model, tok = bundled
    # problems of different lengths, so that EoTP ends rows at different blocks
    ids, mask = encode_prompts(tok, [p.question for p in split("test", 6, 3)], "cpu")
    flt = l2pd.Filter.from_pretrained(FILTER32) if strategy == "learn2pd" else None  # block 32: rows end apart
    kw = dict(max_new_tokens=160, block_length=32, strategy=strategy, eotp=True, cache=cache, filter=flt,
              return_dict_in_generate=True, backend="torch")  # the kernels are tested elsewhere
    batch = model.generate(ids, mask, **kw)
    P = ids.shape[1]
    assert len(set(batch.nfe.tolist())) > 1  # the rows do end apart
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        alone = model.generate(ids[r : r + 1, P - n :], **kw)
        assert torch.equal(batch.sequences[r, P:], alone.sequences[0, n:]), r
        assert int(batch.nfe[r]) == int(alone.nfe[0]), r
    assert batch.forwards == int(batch.nfe.max())


def test_evaluate_uses_the_patched_filter(bundled):
    from l2pd.evaluate import evaluate

    model, tok = bundled
    assert model.l2pd_filter is not None
    block = model.l2pd_filter.block_length
    kw = dict(max_new_tokens=block, block_length=block, eotp=True, backend="torch", progress=False)
    r = evaluate(model, tok, split("test", 2), strategy="learn2pd", **kw)
    assert r["problems"] == 2 and r["mean_nfe"] >= 1
    # no strategy: learn2pd, as model.generate does with a filter
    assert evaluate(model, tok, split("test", 2), **kw)["mean_nfe"] == r["mean_nfe"]


def test_a_step_callback_sees_the_batch_in_lockstep(bundled):
    """With ``on_step`` the rows of a left-padded batch decode the same block at the same step: every call
    gets [B, L] tensors and the padded canvas before the decision; a row with nothing left in the block shows
    the mask id and probability 0; the tokens are those of the decode without a callback."""
    model, tok = bundled
    ids, mask = encode_prompts(tok, [p.question for p in split("test", 4, 3)], "cpu")
    B, P = ids.shape
    mask_id = model.config.mask_token_id
    kw = dict(max_new_tokens=96, block_length=32, strategy="threshold", eotp=True, cache="dual",
              return_dict_in_generate=True, backend="torch")
    calls = []

    def on_step(block_start, step, token, prob, canvas):
        masked = canvas[:, block_start : block_start + token.shape[1]] == mask_id
        calls.append((block_start, step, masked.any(-1).clone()))
        assert token.shape == prob.shape == (B, 32) and canvas.shape == (B, P + 96)
        assert torch.equal(canvas[:, :P], ids)  # the batch's frame: prompts as given, padding included
        idle = ~masked.any(-1)
        assert bool((token[idle] == mask_id).all()) and bool((prob[idle] == 0).all())

    free = model.generate(ids, mask, **kw)
    locked = model.generate(ids, mask, on_step=on_step, **kw)
    assert torch.equal(locked.sequences, free.sequences) and torch.equal(locked.nfe, free.nfe)
    assert len(calls) == locked.forwards >= free.forwards
    starts = [s for s, _, _ in calls]
    assert starts == sorted(starts) and set(starts) <= {P, P + 32, P + 64}
    for (s, step, _), (s2, step2, _) in zip(calls, calls[1:]):
        assert step2 == (step + 1 if s2 == s else 0)  # the block's forwards counted from its refresh
    # each forward's running rows are the rows with masks in the block; EoTP ends some rows early
    assert sum(int(active.sum()) for _, _, active in calls) == int(locked.nfe.sum())
    assert any(not bool(active.all()) for _, _, active in calls)  # some forward ran without every row
