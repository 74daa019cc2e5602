import os

import pytest
import torch
from safetensors.torch import load_file

import l2pd
from l2pd.collect import collect, replay
from l2pd.decode import generate
from l2pd.filter import Filter, model_fingerprint
from l2pd.train import train_filter
from l2pd_kernels.reference import decide
from tests.conftest import EOS, MASK, tiny_model


def _scaled(model, scale):
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(scale)
    return model


def _recorded(model, ids, mask, **decode):
    """What a replay should hold for the decode ``decode`` of 8 new tokens at block 4: labels (argmax equals the
    one-token-per-step answer), masks and step indices of every (row, step) with masked positions."""
    final = generate(model, ids, mask, max_new_tokens=8, block_length=4, strategy="steps")[:, 5:]
    seen = []

    def on_step(s, step, token, prob, canvas):
        masked = canvas[:, s : s + 4] == MASK
        seen.append((masked.clone(), (token == final[:, s - 5 : s - 1]) & masked, step))

    generate(model, ids, mask, max_new_tokens=8, block_length=4, on_step=on_step,
             **({"target": final} if decode.get("strategy") == "oracle" else {}), **decode)
    labels = torch.cat([lab[m.any(-1)] for m, lab, _ in seen])
    masked = torch.cat([m[m.any(-1)] for m, _, _ in seen])
    steps = torch.cat([torch.full((int(m.any(-1).sum()),), k) for m, _, k in seen]).int()
    return labels, masked, steps


def test_replay_labels_are_argmax_equals_final():
    model = tiny_model(seed=5)
    ids = torch.randint(0, 58, (2, 5))
    mask = torch.ones_like(ids)
    want_labels, want_masked, _ = _recorded(model, ids, mask, strategy="oracle")
    data = replay(model, ids, mask, 8, 4)
    assert torch.equal(data["labels"], want_labels) and torch.equal(data["masked"], want_masked)
    assert data["features"].shape == (len(want_labels), 4)
    assert ((data["features"] == 1.0) | want_masked).all()  # decoded positions read as certain


def test_threshold_policy_replays_the_threshold_decode_with_the_same_labels(tmp_path):
    model = tiny_model(seed=5)
    ids = torch.randint(0, 58, (3, 5))
    mask = torch.ones_like(ids)
    labels, masked, steps = _recorded(model, ids, mask, strategy="threshold", threshold=0.3)
    data = replay(model, ids, mask, 8, 4, policy="threshold:0.3")
    assert torch.equal(data["labels"], labels)
    assert torch.equal(data["masked"], masked)
    assert torch.equal(data["step"], steps)
    oracle = replay(model, ids, mask, 8, 4)
    assert not torch.equal(oracle["masked"], data["masked"])  # another decode's states
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(4)]
    kw = dict(gen_length=8, block_length=4, batch_size=2, shard_size=4, progress=False)
    assert collect(model, prompts, str(tmp_path / "t"), policy="threshold:0.3", **kw)["policy"] == "threshold:0.3"
    assert "policy" not in collect(model, prompts, str(tmp_path / "o"), **kw)  # oracle folders read as before
    flt = train_filter(str(tmp_path / "t"), hidden=8, max_epochs=5, log=lambda *a: None)
    assert flt.meta["collect_policy"] == "threshold:0.3"
    with pytest.raises(ValueError, match="other settings"):
        collect(model, prompts, str(tmp_path / "o"), policy="threshold:0.3", **kw)
    for bad in ("threshold", "threshold:0", "threshold:x", "steps", "threshold:1.5"):
        with pytest.raises(ValueError, match="policy"):
            collect(model, prompts, str(tmp_path / "bad"), policy=bad, **kw)


def test_replay_terminates_when_the_model_never_converges():
    model = _scaled(tiny_model(seed=6), 0.0)  # argmax is always token 0
    ids = torch.randint(1, 58, (1, 4))
    target = torch.full((1, 12), 7)  # never predicted
    out = generate(model, ids, max_new_tokens=12, block_length=4, strategy="oracle", target=target,
                   return_dict_in_generate=True)
    assert out.forwards == 3  # each block filled with the answer after one fruitless step
    assert torch.equal(out.sequences[:, 4:], target)


def _trained_filter(tmp_path, model, n=8):
    prompts = [torch.randint(0, 58, (int(torch.randint(3, 7, ())),)).tolist() for _ in range(n)]
    collect(model, prompts, str(tmp_path / "data"), gen_length=8, block_length=4, batch_size=4, shard_size=4,
            progress=False)
    return train_filter(str(tmp_path / "data"), hidden=16, max_epochs=50, log=lambda *a: None)


def test_collection_resumes_to_the_same_shards(tmp_path):
    model = tiny_model(seed=7)
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(12)]
    kw = dict(gen_length=8, block_length=4, batch_size=2, shard_size=4, progress=False)
    once = collect(model, prompts, str(tmp_path / "once"), **kw)
    part = collect(model, prompts, str(tmp_path / "twice"), max_shards=1, **kw)
    assert part["shards_done"] == 1 and once["shards_done"] == 3
    done = collect(model, prompts, str(tmp_path / "twice"), **kw)
    assert done["shards_done"] == 3
    for name in sorted(os.listdir(tmp_path / "once")):
        if name.endswith(".safetensors"):
            a, b = load_file(tmp_path / "once" / name), load_file(tmp_path / "twice" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        collect(model, prompts, str(tmp_path / "once"), **{**kw, "gen_length": 12})


def test_filter_round_trip_and_checks(tmp_path):
    model = tiny_model(seed=8)
    flt = _trained_filter(tmp_path, model)
    assert flt.meta["model_fingerprint"] == model_fingerprint(model)
    assert "0.9" in flt.meta["val_metrics"]
    flt.save_pretrained(tmp_path / "f")
    again = Filter.from_pretrained(tmp_path / "f")
    assert again.meta == flt.meta and (again.block_length, again.hidden) == (4, 16)
    for a, b in zip(flt.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    l2pd.patch(model, filter=str(tmp_path / "f"))  # same model: accepted
    other = tiny_model(seed=9)
    with pytest.raises(ValueError, match="trained for model"):
        l2pd.patch(other, filter=again)
    again.check_model(other, allow_other_model=True)
    with pytest.raises(ValueError, match="block_length=4"):
        generate(model, torch.randint(0, 58, (1, 4)), max_new_tokens=8, block_length=8, filter=again)


def test_learn2pd_above_one_equals_steps(tmp_path):
    model = tiny_model(seed=10)
    flt = _trained_filter(tmp_path, model)
    prompt = torch.randint(0, 58, (2, 5))
    kw = dict(max_new_tokens=12, block_length=4)
    a = generate(model, prompt, strategy="steps", **kw)
    b = generate(model, prompt, strategy="learn2pd", filter=flt, threshold=1.01, **kw)
    assert torch.equal(a, b)


def test_learn2pd_batch_with_eotp_equals_rows_alone(tmp_path):
    model = tiny_model(seed=11)
    flt = _trained_filter(tmp_path, model)
    with torch.no_grad():  # make end-of-text likely so that rows stop at different steps
        model.model.transformer.ff_out.weight[EOS] += 0.3 * model.model.transformer.ff_out.weight[:EOS].mean(0)
    prompts = [torch.randint(0, 58, (n,)) for n in (6, 3, 5)]
    ids = torch.full((3, 6), EOS)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 6 - len(p) :], mask[r, 6 - len(p) :] = p, 1
    kw = dict(max_new_tokens=16, block_length=4, strategy="learn2pd", filter=flt, threshold=0.5, eotp=True,
              return_dict_in_generate=True)
    out = generate(model, ids, mask, **kw)
    for r, p in enumerate(prompts):
        alone = generate(model, p[None], **kw)
        assert torch.equal(out.sequences[r, 6:], alone.sequences[0, len(p) :])
        assert out.nfe[r] == alone.nfe[0]


def test_eotp_cuts_exactly_after_end_of_text():
    B, P, T = 2, 2, 14
    canvas = torch.full((B, T), MASK)
    canvas[:, :P] = 3
    canvas[:, P : P + 4] = torch.tensor([10, 11, 12, 13])  # first block decoded
    canvas[0, 6] = 20  # accepted earlier, before the end-of-text to come
    token = torch.tensor([[21, 22, EOS, 23], [24, 25, 26, 27]])
    prob = torch.tensor([[0.1, 0.2, 0.99, 0.95], [0.1, 0.2, 0.3, 0.4]])
    before = canvas.clone()
    n, left, eot = decide(canvas, token, prob, block_start=6, k=1, threshold=0.9, mask_id=MASK, eos_id=EOS,
                          eotp="accepted")
    assert eot.tolist() == [8, -1]
    assert canvas[0, 6].item() == 20 and canvas[0, 7].item() == MASK  # nothing before the cut is lost
    assert canvas[0, 8:].eq(EOS).all()  # everything after it is end-of-text
    assert left.tolist() == [1, 3]
    assert torch.equal(canvas[1, :10], torch.cat([before[1, :9], torch.tensor([27])]))
    assert canvas[1, 10:].eq(MASK).all()
    # "predicted" also cuts at the most confident masked end-of-text guess
    canvas = before.clone()
    token2 = torch.tensor([[21, EOS, 22, EOS], [24, 25, 26, 27]])
    prob2 = torch.tensor([[0.1, 0.5, 0.2, 0.8], [0.1, 0.2, 0.3, 0.4]])
    _, _, eot = decide(canvas, token2, prob2, block_start=6, k=1, threshold=0.99, mask_id=MASK, eos_id=EOS,
                       eotp="predicted")
    # position 9 is accepted (top-1); position 7 is the most confident end-of-text guess still masked
    assert eot.tolist() == [7, -1]
    assert canvas[0, 6].item() == 20 and canvas[0, 7:].eq(EOS).all()


def test_top_level_api():
    assert l2pd.collect is collect and l2pd.train_filter is train_filter and l2pd.Filter is Filter


def test_evaluate_uses_the_patched_filter_and_its_operating_point(monkeypatch):
    """``l2pd.evaluate`` decodes with the filter ``patch`` attached; learn2pd's defaults (block length, tau,
    EoTP mode) come from the filter."""
    import l2pd.demo

    monkeypatch.setenv("L2PD_BACKEND", "torch")  # the decision's PyTorch ops: the kernels have their own tests
    from l2pd.demo.task import split
    from l2pd.evaluate import evaluate

    model, tok = l2pd.demo.load(device="cpu")
    flt = model.l2pd_filter
    assert flt is not None and flt.meta.get("eotp") == "accepted"
    problems = split("test", 2)
    stated = evaluate(model, tok, problems, progress=False, strategy="learn2pd", block_length=flt.block_length,
                      threshold=flt.threshold, eotp=flt.meta["eotp"])
    defaults = evaluate(model, tok, problems, progress=False)  # strategy learn2pd: the filter is there
    assert defaults["nfe"] == stated["nfe"] and defaults["texts"] == stated["texts"]
    assert stated["mean_nfe"] < 64
    no_eotp = evaluate(model, tok, problems, progress=False, eotp="off")
    assert no_eotp["mean_nfe"] > stated["mean_nfe"]  # the stored EoTP mode is what made it short
    l2pd.patch(model, filter=False)  # drops it (filter=None keeps an attached filter)
    with pytest.raises(ValueError, match="needs a filter"):
        evaluate(model, tok, problems, progress=False, strategy="learn2pd")


def test_a_filter_changed_after_a_decode_decodes_with_its_new_weights():
    """The filter's weights on the decoding device are a copy made on first use; a filter trained, loaded or
    moved since then must decode with what it holds now (as a fresh filter with those weights does), not with
    the copy."""
    from l2pd.demo import load
    from l2pd.demo.task import split
    from l2pd.evaluate import encode_prompts

    model, tok = load(device="cpu")
    flt = model.l2pd_filter
    ids, mask = encode_prompts(tok, [p.question for p in split("test", 2)], "cpu")
    kw = dict(max_new_tokens=32, strategy="learn2pd", eotp="accepted", backend="torch",
              return_dict_in_generate=True)
    old = {k: v.clone() for k, v in flt.state_dict().items()}
    new = {k: v.clone() for k, v in old.items()}
    new["layers.0.bias"] -= 3.0  # a filter that accepts far less
    fresh = Filter(flt.block_length, flt.hidden, flt.depth, flt.threshold, inputs=flt.inputs, kind=flt.kind)
    fresh.load_state_dict(new)
    want = generate(model, ids, mask, filter=fresh, **kw)
    for change in ("in place", "loaded", "moved"):
        flt.load_state_dict(old)
        before = generate(model, ids, mask, filter=flt, **kw)
        assert not torch.equal(before.nfe, want.nfe)  # the change shows
        if change == "in place":  # as an optimizer's step
            with torch.no_grad():
                flt.layers[0].bias.sub_(3.0)
        elif change == "loaded":
            flt.load_state_dict(new)
        else:  # new parameter tensors
            flt.layers[0].bias = torch.nn.Parameter(new["layers.0.bias"].clone())
        after = generate(model, ids, mask, filter=flt, **kw)
        assert torch.equal(after.sequences, want.sequences) and torch.equal(after.nfe, want.nfe), change
