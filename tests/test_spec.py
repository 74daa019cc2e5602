"""generate's arguments resolve into one checked DecodeSpec: the defaults, the filter's operating point and
the Hugging Face conventions in one place."""

import math

import pytest
import torch

from l2pd import Filter
from l2pd.models import adapter_for
from l2pd.spec import DecodeSpec, resolve
from tests.conftest import EOS, MASK, tiny_model


@pytest.fixture(scope="module")
def adapter():
    return adapter_for(tiny_model(seed=2, max_sequence_length=1024))


def test_defaults_without_a_filter(adapter):
    spec, ids, mask = resolve(adapter, [[1, 2, 3]])
    assert isinstance(spec, DecodeSpec) and ids.dtype == torch.int64 and mask is None
    assert (spec.strategy, spec.threshold, spec.eotp, spec.block_length, spec.max_new_tokens) == (
        "threshold", 0.9, "off", 32, 256)
    assert (spec.mask_id, spec.eos_id, spec.temperature, spec.seed) == (MASK, EOS, 0.0, None)


def test_the_filter_gives_learn2pd_its_operating_point(adapter):
    flt = Filter(block_length=8, hidden=4, threshold=0.97, meta={"eotp": "accepted"})
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=16)
    assert (spec.strategy, spec.block_length, spec.threshold, spec.eotp, spec.filter) == (
        "learn2pd", 8, 0.97, "accepted", flt)
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, strategy="threshold", max_new_tokens=16)
    assert spec.filter is None and spec.block_length == 32  # the filter's point is learn2pd's only


def _tuned(default):
    return Filter(block_length=8, hidden=4, threshold=0.97,
                  meta={"eotp": "accepted", "operating_point": {"default": default}})


def test_a_tuned_default_rule_is_what_decoding_without_a_strategy_uses(adapter):
    from l2pd.spec import default_decoding

    flt = _tuned({"strategy": "margin", "threshold": 0.985, "block_length": 16, "eotp": "accepted"})
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=32)
    assert (spec.strategy, spec.threshold, spec.block_length, spec.eotp, spec.filter) == (
        "margin", 0.985, 16, "accepted", None)
    assert default_decoding(flt) == "margin (tau 0.985, block 16, EoTP accepted)"
    # what is given wins, one setting at a time
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=32, threshold=0.5, block_length=4)
    assert (spec.strategy, spec.threshold, spec.block_length, spec.eotp) == ("margin", 0.5, 4, "accepted")
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=32, strategy="learn2pd")
    assert (spec.strategy, spec.threshold, spec.block_length, spec.filter) == ("learn2pd", 0.97, 8, flt)
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=32, strategy="threshold")
    assert (spec.strategy, spec.threshold, spec.block_length, spec.eotp) == ("threshold", 0.9, 32, "off")
    flt = _tuned({"strategy": "persistence", "threshold": 0.9, "block_length": 8, "eotp": "off", "persist": 3})
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=16)
    assert (spec.strategy, spec.persist, spec.eotp) == ("persistence", 3, "off")
    flt = _tuned({"strategy": "learn2pd", "threshold": 0.97, "block_length": 8, "eotp": "accepted"})
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=16)
    assert (spec.strategy, spec.threshold, spec.filter) == ("learn2pd", 0.97, flt)
    assert default_decoding(None) == "threshold (tau 0.9, block 32, EoTP off)"


def test_steps_schedule_sampling_and_hugging_face_names(adapter):
    spec, _, _ = resolve(adapter, [[1, 2]], strategy="steps", max_new_tokens=16, block_length=4, steps=8)
    assert math.isinf(spec.threshold) and spec.steps_per_block == 2
    spec, ids, _ = resolve(adapter, [[1, 2]], do_sample=True, max_length=10, num_return_sequences=3)
    assert spec.temperature == 1.0 and spec.seed is not None and spec.max_new_tokens == 8 and ids.shape == (3, 2)
    spec, _, _ = resolve(adapter, inputs=[[1, 2]], eos_token_id=[EOS, 5], eotp=True)
    assert spec.eotp == "accepted" and spec.stops.active


def test_unknown_arguments_are_refused_by_name(adapter):
    with pytest.raises(ValueError, match=r"\['top_p'\]"):
        resolve(adapter, [[1, 2]], kwargs={"top_p": 0.9})


def test_compact_is_accepted_and_has_no_effect(adapter):
    with pytest.warns(DeprecationWarning, match="compact=False has no effect"):
        resolve(adapter, [[1, 2]], compact=False)


@pytest.mark.parametrize("family", ["llada", "dream", "llada2"])
def test_each_bundled_default_is_the_stored_rule_s_pick(adapter, family):
    import l2pd.demo

    flt = Filter.from_pretrained(l2pd.demo.FAMILIES[family][1])
    point = flt.meta["operating_point"]
    within = [p for p in point["picks"].values() if p["within_budget"]]
    best = min(within, key=lambda p: (p["mean_nfe"], -p["accuracy"]))
    assert point["default"] == {k: best[k] for k in ("strategy", "threshold", "block_length", "eotp", "persist")
                                if k in best}
    assert flt.threshold == point["picks"]["learn2pd"]["threshold"]  # --strategy learn2pd keeps its own tau
    spec, _, _ = resolve(adapter, [[1, 2]], filter=flt, max_new_tokens=16)
    assert (spec.strategy, spec.threshold, spec.block_length, spec.eotp) == (
        best["strategy"], best["threshold"], best["block_length"], best["eotp"])
