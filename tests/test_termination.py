"""Decoding always ends: within the per-block cap, with no mask token left, and rows of a padded batch decode
as they would alone (greedy), over random strategies, thresholds, temperatures, caches, shapes and padding."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2pd import Filter
from l2pd.decode import generate
from tests.conftest import EOS, MASK, tiny_model

MODEL = tiny_model(seed=3)


@st.composite
def cases(draw):
    block = draw(st.integers(1, 6))
    gen = draw(st.integers(1, 12))
    strategy = draw(st.sampled_from(["steps", "threshold", "learn2pd"]))
    return dict(
        lengths=draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)),
        kw=dict(
            max_new_tokens=gen, block_length=block, strategy=strategy,
            threshold=draw(st.one_of(st.none(), st.floats(0, 2))),
            temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 5.0, 1e6])),
            cache=draw(st.sampled_from(["none", "prefix", "dual"])),
            refresh=draw(st.sampled_from(["full", "tail", "window"])),
            eotp=draw(st.sampled_from(["off", "accepted", "predicted"])),
            steps=draw(st.one_of(st.none(), st.integers(1, 2 * gen))),
            backend=draw(st.sampled_from(["torch", "torch", "torch", "auto"])),
            seed=draw(st.integers(0, 2**31 - 1)),
        ),
        filter_seed=draw(st.integers(0, 1000)) if strategy == "learn2pd" else None,
    )


def _batch(prompts):
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), EOS)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p) :] = p
        mask[r, P - len(p) :] = 1
    return ids, mask


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_decoding_terminates_within_the_cap(case):
    kw = dict(case["kw"])
    if case["filter_seed"] is not None:
        torch.manual_seed(case["filter_seed"])
        kw["filter"] = Filter(block_length=kw["block_length"], hidden=8)
    torch.manual_seed(len(case["lengths"]))
    prompts = [torch.randint(0, 58, (n,)) for n in case["lengths"]]
    ids, mask = _batch(prompts)
    out = generate(MODEL, ids, mask, return_dict_in_generate=True, **kw)
    G, P = kw["max_new_tokens"], ids.shape[1]
    answer = out.sequences[:, P:]
    assert answer.shape == (len(prompts), G)
    assert not bool((answer == MASK).any())
    assert out.forwards <= G and int(out.nfe.max()) <= G  # no block takes more forwards than its length
    assert math.isfinite(out.seconds)
    if kw["temperature"] == 0:
        for r, p in enumerate(prompts):
            alone = generate(MODEL, p[None], return_dict_in_generate=True, **kw)
            assert torch.equal(answer[r], alone.sequences[0, len(p) :]), r
            assert int(out.nfe[r]) == int(alone.nfe[0])


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=float("inf")), "temperature=inf must be finite"),
    (dict(temperature=float("nan")), "temperature=nan must be finite"),
    (dict(temperature="hot"), "temperature='hot' must be a number"),
    (dict(threshold=float("nan")), "threshold=nan must be finite"),
    (dict(threshold=float("inf")), "threshold=inf must be finite"),
    (dict(threshold=-0.1), "threshold=-0.1 must be >= 0"),
    (dict(steps=0), "steps=0 must be > 0"),
    (dict(steps=2.5), "steps=2.5 must be a positive integer"),
    (dict(block_length=True), "block_length=True must be a positive integer"),
    (dict(max_new_tokens=4.0), "max_new_tokens=4.0 must be a positive integer"),
])
def test_bad_numbers_are_refused(bad, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        generate(MODEL, torch.randint(0, 58, (1, 4)), **{**dict(max_new_tokens=4, block_length=2), **bad})


def test_a_rule_that_accepts_too_little_is_capped(monkeypatch):
    """A decision that accepts nothing below the cap's k: the last allowed forward of each block fills it."""
    import l2pd.decode
    from l2pd_kernels import reference

    def stalling(canvas, token, prob, *, block_start, k, **kw):
        if k < token.shape[1]:  # accept nothing
            left = (canvas[:, block_start : block_start + token.shape[1]] == MASK).sum(-1)
            return torch.zeros_like(left), left, torch.full_like(left, -1)
        return reference.decide(canvas, token, prob, block_start=block_start, k=k, **kw)

    monkeypatch.setattr(l2pd.decode, "select_ops", lambda backend, device: (reference.confidence, stalling))
    out = generate(MODEL, torch.randint(0, 58, (2, 4)), max_new_tokens=10, block_length=4, strategy="threshold",
                   return_dict_in_generate=True)
    assert out.forwards == 4 + 4 + 2  # each block (4, 4, then 2 tokens) ends at its own length
    assert not bool((out.sequences == MASK).any())
