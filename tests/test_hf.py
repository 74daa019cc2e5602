"""Hugging Face generate conventions: do_sample, max_length, num_return_sequences, GenerationConfig, end ids,
stop strings, input forms, refused arguments, streaming, and the patched signature."""

import inspect

import numpy as np
import pytest
import torch

import l2pd
from l2pd.decode import generate
from tests.conftest import EOS, MASK, tiny_model

MODEL = tiny_model(seed=4)
IDS = torch.randint(0, 58, (1, 5), generator=torch.Generator().manual_seed(0))


def _gen(**kw):
    return generate(MODEL, IDS, **{**dict(max_new_tokens=8, block_length=4), **kw})


def test_do_sample_and_temperature():
    greedy = _gen()
    assert torch.equal(_gen(do_sample=False, temperature=0.8), greedy)  # do_sample=False is greedy
    assert torch.equal(_gen(do_sample=True, seed=3), _gen(temperature=1.0, seed=3))  # default temperature 1
    with pytest.raises(ValueError, match="do_sample=True needs temperature > 0"):
        _gen(do_sample=True, temperature=0.0)


def test_max_length_and_num_return_sequences():
    out = generate(MODEL, IDS, max_length=13, block_length=4)
    assert out.shape == (1, 13)
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        generate(MODEL, IDS, max_length=5)
    many = _gen(num_return_sequences=3)
    assert many.shape == (3, 13) and all(torch.equal(r, many[0]) for r in many)  # greedy: the same answer
    sampled = _gen(num_return_sequences=4, temperature=5.0, seed=1)
    assert len({tuple(r.tolist()) for r in sampled}) > 1  # rows draw their own samples


def test_generation_config():
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=6, do_sample=False, temperature=0.7, return_dict_in_generate=True)
    out = generate(MODEL, IDS, block_length=3, generation_config=cfg)
    assert out.sequences.shape == (1, 11)
    assert torch.equal(generate(MODEL, IDS, block_length=3, generation_config=cfg, max_new_tokens=3).sequences,
                       generate(MODEL, IDS, block_length=3, max_new_tokens=3))  # explicit arguments win
    with pytest.raises(ValueError, match="num_beams"):
        generate(MODEL, IDS, generation_config=GenerationConfig(num_beams=4))


def test_autoregressive_only_arguments_are_refused():
    with pytest.raises(ValueError, match=r"does not support \['top_p'\]"):
        _gen(top_p=0.9)
    with pytest.raises(ValueError, match="max_new_token"):
        _gen(max_new_token=3)
    assert torch.equal(_gen(num_beams=1, use_cache=True), _gen())  # neutral values are accepted


def test_input_forms_and_bad_ids():
    want = _gen()
    assert torch.equal(_gen_ids(IDS[0].tolist()), want)
    assert torch.equal(_gen_ids(IDS.numpy()), want)
    assert torch.equal(_gen_ids(np.asarray(IDS[0].tolist(), dtype=np.int32)), want)
    for bad, match in [([[1, 2], [3]], "tensor, array or list"), (torch.zeros(0, 4, dtype=torch.long), "no rows"),
                       (torch.zeros(2, 0, dtype=torch.long), "empty prompt"), ([[1, 64]], "outside the vocabulary"),
                       ([[-1, 2]], "outside the vocabulary"), (torch.ones(1, 3), "integer token ids")]:
        with pytest.raises(ValueError, match=match):
            _gen_ids(bad)


def _gen_ids(ids):
    return generate(MODEL, ids, max_new_tokens=8, block_length=4)


def test_extra_end_ids_cut_the_answer():
    answer = _gen(max_new_tokens=12)[0, 5:]
    stop = int(answer[3])  # a token the greedy answer holds
    first = int((answer == stop).nonzero()[0, 0])
    out = _gen(max_new_tokens=12, eos_token_id=[EOS, stop], return_dict_in_generate=True)
    got = out.sequences[0, 5:]
    assert torch.equal(got[: first + 1], answer[: first + 1])
    assert bool((got[first + 1 :] == EOS).all())
    assert not bool((got == MASK).any())


def test_stop_strings_and_streaming_on_the_bundled_model():
    import l2pd.demo
    from l2pd.demo.tokenizer import prompt_text

    model, tok = l2pd.demo.load(device="cpu")
    q = "Mia has 45 apples. She gets 17 more apples at the market. How many apples does Mia have now?"
    ids = tok(prompt_text(tok, q), add_special_tokens=False, return_tensors="pt").input_ids
    P = ids.shape[1]
    kw = dict(max_new_tokens=96, block_length=32, strategy="threshold", eotp="accepted")
    full = model.generate(ids, **kw)
    text = tok.decode(full[0, P:], skip_special_tokens=True)
    assert "####" in text
    cut = model.generate(ids, stop_strings="####", tokenizer=tok, **kw)
    assert tok.decode(cut[0, P:], skip_special_tokens=True) == text[: text.index("####") + 4]
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, stop_strings="####", **kw)

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = model.generate(ids, streamer=rec, **kw)
    assert rec.puts[0] == ids[0].tolist() and rec.ended  # the prompt first, as transformers does
    streamed = [t for put in rec.puts[1:] for t in put]
    answer = out[0, P:].tolist()
    eos = answer.index(tok.eos_token_id)
    assert streamed == answer[: eos + 1]  # every answer token once, in order, up to the end of text
    assert len(rec.puts) > 2  # more than one piece: tokens arrive as they become final, not at the end
    with pytest.raises(ValueError, match="one sequence"):
        model.generate(ids.repeat(2, 1), streamer=rec, **kw)


def test_patched_generate_shows_its_arguments():
    model = l2pd.patch(tiny_model(seed=0))
    params = list(inspect.signature(model.generate).parameters)
    assert params[:2] == ["input_ids", "attention_mask"] and "model" not in params
    assert "num_return_sequences" in params and "block_length" in params
