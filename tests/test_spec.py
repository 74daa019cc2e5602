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
