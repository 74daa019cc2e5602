"""Richer filter inputs: margin and entropy from the confidence pass, the step index, the versioned layout."""

import json
import os

import pytest
import torch

from l2pd.collect import collect, load_shards
from l2pd.decode import generate
from l2pd.filter import RICH_INPUTS, Filter
from l2pd.train import train_filter
from l2pd_kernels import reference as ref
from tests.conftest import EOS, needs_kernels, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def stats64(logits: torch.Tensor, suppress=None):
    """Independent float64 margin / entropy: softmax in float64 over the cleaned logits."""
    x = logits.double()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    x = x.clamp(max=torch.finfo(torch.float32).max)
    if suppress is not None:
        x[..., suppress] = float("-inf")
    margin, entropy = torch.zeros(x.shape[:-1], dtype=torch.float64), torch.zeros(x.shape[:-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in x.shape[:-1]]):
        row = x[tuple(idx)]
        if not torch.isfinite(row).any():
            continue
        p = torch.softmax(row, 0)
        top = torch.sort(p, descending=True).values
        margin[tuple(idx)] = top[0] - (top[1] if len(top) > 1 else 0)
        entropy[tuple(idx)] = -(p[p > 0] * p[p > 0].log()).sum()
    return margin, entropy


def _hard_logits(dtype, V=97):
    x = torch.randn(3, 4, V, dtype=torch.float64) * 4
    x[0, 0, 5] = float("-inf")
    x[0, 1, :] = float("-inf")  # no finite logit: margin 0, entropy 0
    x[0, 2, [3, 50]] = x[0, 2].max() + 2  # a tie at the top: margin 0
    x[1, 0, :] = 0.0  # uniform: entropy log V
    x[1, 1, 7] = float("nan")
    x[1, 2, :] = float("-inf")
    x[1, 2, 11] = 1.0  # one finite logit: margin 1, entropy 0
    x[2, 3, 1] = float("inf")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_stats_match_float64(dtype):
    x = torch.cat([_hard_logits(dtype), (torch.randn(3, 4, 97) * 2).to(dtype)])
    _, _, margin, entropy = ref.confidence(x, stats=True, suppress=13)
    m64, e64 = stats64(x, suppress=13)
    torch.testing.assert_close(margin.double(), m64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), e64, atol=1e-4, rtol=1e-5)
    assert margin[0, 1] == 0 and entropy[0, 1] == 0 and margin[0, 2] == 0
    assert margin[1, 2] == 1 and entropy[1, 2] == 0


@needs_kernels
@pytest.mark.parametrize("tune", [dict(lanes=True), dict(lanes=False), dict(lanes=True, programs_per_sm=16),
                                  dict(lanes=False, programs_per_sm=16), dict(lanes=True, programs_per_sm=1)],
                         ids=["lanes", "tile", "lanes-split", "tile-split", "lanes-direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [97, 300])
def test_kernel_stats_match_float64(tune, dtype, V):
    from l2pd_kernels import confidence

    x = torch.cat([_hard_logits(dtype, V), (torch.randn(2, 4, V) * 3).to(dtype)]).to(DEV)
    token, prob, margin, entropy = confidence(x, stats=True, suppress=13, block_v=64, **tune)
    rt, rp = ref.confidence(x, suppress=13)
    assert torch.equal(token, rt)
    torch.testing.assert_close(prob, rp, atol=1e-6, rtol=1e-5)
    m64, e64 = stats64(x.cpu(), suppress=13)
    torch.testing.assert_close(margin.cpu().double(), m64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.cpu().double(), e64, atol=1e-4, rtol=1e-5)
    # sampling changes the token, not the distribution's statistics
    _, _, ms, es = confidence(x, temperature=1.0, seed=3, stats=True, suppress=13, block_v=64, **tune)
    torch.testing.assert_close(ms, margin, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(es, entropy, atol=1e-5, rtol=1e-5)
    # without stats: the same two outputs as before
    t2, p2 = confidence(x, suppress=13, block_v=64, **tune)
    assert torch.equal(t2, token) and torch.equal(p2, prob)


def _random_filter(inputs, LF, H=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = ref.filter_width(inputs, LF)
    return [(torch.randn(H, W, generator=g) * 0.5, torch.randn(H, generator=g) * 0.1),
            (torch.randn(H, H, generator=g) * 0.3, torch.randn(H, generator=g) * 0.1),
            (torch.randn(LF, H, generator=g) * 0.5, torch.randn(LF, generator=g) * 0.1)]


def _decide_matches_reference(L, LF, fw, steps, **filter_kw):
    """Kernel == reference on a random block (masks, tokens, probabilities, margins, entropies), with the step
    passed as an argument and through the device parameters a graphed step uses."""
    from l2pd_kernels import decide

    B, T, mask_id = 3, 60, 99
    fw = [(w.to(DEV), b.to(DEV)) for w, b in fw]
    canvas = torch.randint(0, 50, (B, T), device=DEV)
    canvas[:, 10 : 10 + L] = torch.where(torch.rand(B, L, device=DEV) < 0.6, mask_id, canvas[:, 10 : 10 + L])
    token = torch.randint(0, 50, (B, L), device=DEV)
    prob = torch.rand(B, L, device=DEV)
    margin, entropy = torch.rand(B, L, device=DEV) * prob, torch.rand(B, L, device=DEV) * 3
    for step in steps:
        kw = dict(block_start=10, k=1, threshold=0.5, mask_id=mask_id, eos_id=7, eotp="accepted",
                  filter_weights=fw, filter_block=LF, margin=margin, entropy=entropy, step=step, **filter_kw)
        c_ref, c_ker, c_par = canvas.clone(), canvas.clone(), canvas.clone()
        want = ref.decide(c_ref, token, prob, **kw)
        got = decide(c_ker, token, prob, **kw)
        params = torch.tensor([(10 << 20) | 1, step], device=DEV)  # what a graphed step reads
        by_params = decide(c_par, token, prob, params=params, **kw)
        assert torch.equal(c_ref, c_ker) and torch.equal(c_ref, c_par)
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(want, got, by_params))


@needs_kernels
@pytest.mark.parametrize("inputs", [RICH_INPUTS, ("confidence", "entropy"), ("confidence", "step")],
                         ids=["rich", "entropy", "step"])
@pytest.mark.parametrize("L,LF", [(8, 8), (5, 8), (13, 16)])
def test_decide_with_rich_inputs_matches_reference(inputs, L, LF):
    torch.manual_seed(L * 7 + LF)
    _decide_matches_reference(L, LF, _random_filter(inputs, LF), (0, 3), filter_inputs=inputs)


def test_every_rich_input_changes_the_score():
    inputs, LF = RICH_INPUTS, 8
    fw = _random_filter(inputs, LF)
    prob, masked = torch.rand(2, LF), torch.ones(2, LF, dtype=torch.bool)
    margin, entropy = torch.rand(2, LF), torch.rand(2, LF)

    def score(**over):
        kw = {**dict(margin=margin, entropy=entropy, step=1), **over}
        return ref.filter_logits(ref.filter_features(prob, masked, LF, inputs, **kw), fw)

    base = score()
    for change in (dict(margin=margin + 0.3), dict(entropy=entropy + 0.3), dict(step=4)):
        assert not torch.allclose(score(**change), base)
    with pytest.raises(ValueError, match="'margin'"):
        ref.filter_features(prob, masked, LF, inputs, entropy=entropy)
    with pytest.raises(ValueError, match="ordered subset"):
        ref.check_inputs(("margin", "confidence"))


def _collected(tmp_path, model, n=8):
    prompts = [torch.randint(0, 58, (int(torch.randint(3, 7, ())),)).tolist() for _ in range(n)]
    collect(model, prompts, str(tmp_path / "data"), gen_length=8, block_length=4, batch_size=4, shard_size=4,
            progress=False)
    return str(tmp_path / "data")


def test_collection_holds_the_rich_channels(tmp_path):
    model = tiny_model(seed=21)
    data, manifest = load_shards(_collected(tmp_path, model))
    n = len(data["labels"])
    assert manifest["version"] == 3
    assert data["run"].shape == data["previous"].shape == (n, 4) and int(data["run"].min()) >= 1
    assert data["margin"].shape == data["entropy"].shape == (n, 4) and data["step"].shape == (n,)
    m = data["masked"].bool()
    assert (data["margin"][~m] == 1).all() and (data["entropy"][~m] == 0).all()
    assert (data["margin"][m] <= data["features"][m] + 1e-6).all()  # top-1 minus top-2 <= top-1
    assert (data["entropy"][m] > 0).all() and int(data["step"].max()) >= 1


def _same_decodes(model, flt, again) -> None:
    """A filter and its saved-and-loaded copy decode identically, and (under the interpreter; GPU:
    tests/test_graph.py) the kernels decode as the reference does."""
    prompt = torch.randint(0, 58, (2, 5))
    kw = dict(max_new_tokens=12, block_length=4, strategy="learn2pd", threshold=0.3, eotp=True,
              return_dict_in_generate=True)
    a = generate(model, prompt, filter=flt, backend="torch", **kw)
    b = generate(model, prompt, filter=again, backend="torch", **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.nfe, b.nfe)
    if os.environ.get("TRITON_INTERPRET") == "1":
        c = generate(model, prompt, filter=again, backend="triton", **kw)
        assert torch.equal(a.sequences, c.sequences) and torch.equal(a.nfe, c.nfe)


def test_rich_filter_round_trip_and_decodes(tmp_path):
    model = tiny_model(seed=22)
    path = _collected(tmp_path, model)
    flt = train_filter(path, hidden=16, max_epochs=50, log=lambda *a: None, inputs=RICH_INPUTS)
    assert flt.layers[0].in_features == 3 * 4 + 1
    flt.save_pretrained(tmp_path / "rich")
    info = json.loads((tmp_path / "rich" / "filter.json").read_text())
    assert info["version"] == 2 and info["inputs"] == list(RICH_INPUTS)
    again = Filter.from_pretrained(tmp_path / "rich")
    assert again.inputs == RICH_INPUTS and again.needs_stats
    _same_decodes(model, flt, again)


def test_version_1_filter_still_loads_and_decodes_identically(tmp_path):
    model = tiny_model(seed=23)
    with torch.no_grad():  # make end-of-text likely so that EoTP is exercised too
        model.model.transformer.ff_out.weight[EOS] += 0.3 * model.model.transformer.ff_out.weight[:EOS].mean(0)
    flt = train_filter(_collected(tmp_path, model), hidden=16, max_epochs=50, log=lambda *a: None)
    flt.save_pretrained(tmp_path / "v2")
    old = tmp_path / "v1"
    old.mkdir()
    info = json.loads((tmp_path / "v2" / "filter.json").read_text())
    info["version"] = 1
    del info["inputs"]  # the layout of files written before filters recorded their inputs
    (old / "filter.json").write_text(json.dumps(info))
    (old / "filter.safetensors").write_bytes((tmp_path / "v2" / "filter.safetensors").read_bytes())
    v1 = Filter.from_pretrained(old)
    assert v1.inputs == ("confidence",) and not v1.needs_stats
    prompt = torch.randint(0, 58, (2, 5))
    kw = dict(max_new_tokens=12, block_length=4, strategy="learn2pd", threshold=0.4, eotp=True)
    assert torch.equal(generate(model, prompt, filter=v1, **kw), generate(model, prompt, filter=flt, **kw))


def test_rich_inputs_need_a_rich_collection(tmp_path):
    model = tiny_model(seed=24)
    path = _collected(tmp_path, model)
    from safetensors.torch import load_file, save_file

    for name in os.listdir(path):  # strip the new channels: a version-1 collection
        if name.endswith(".safetensors"):
            d = load_file(os.path.join(path, name))
            save_file({k: d[k] for k in ("features", "labels", "masked")}, os.path.join(path, name))
    train_filter(path, hidden=8, max_epochs=5, log=lambda *a: None)  # confidence only: still trains
    with pytest.raises(ValueError, match="collected without"):
        train_filter(path, hidden=8, max_epochs=5, log=lambda *a: None, inputs=RICH_INPUTS)


def test_shared_features_by_hand():
    conf = torch.tensor([[0.5, 1.0, 0.2, 0.9]])
    masked = torch.tensor([[True, False, True, True]])
    f = ref.shared_features(conf, conf * 0.5, conf * 2, masked, 2, 4)
    names = ref.SHARED_FEATURES
    col = {n: f[0, :, names.index(n)].tolist() for n in names}
    want = {"position": [0, 0.25, 0.5, 0.75], "step": [0.5] * 4, "decided": [0.25] * 4,
            "left": [1.0, 0.5, 1.0, 0.2], "right": [1.0, 0.2, 0.9, 1.0], "masked_before": [0, 0.25, 0.25, 0.5],
            "prefix_min": [1.0, 0.5, 0.5, 0.2], "margin": [0.25, 0.5, 0.1, 0.45], "entropy": [1.0, 2.0, 0.4, 1.8]}
    for name, values in want.items():
        assert col[name] == pytest.approx(values), name


@needs_kernels
@pytest.mark.parametrize("L,LF", [(8, 8), (5, 8), (13, 16), (32, 32)])
def test_decide_with_a_shared_filter_matches_reference(L, LF):
    torch.manual_seed(L + LF)
    H, F = 16, len(ref.SHARED_FEATURES)
    fw = [(torch.randn(H, F), torch.randn(H) * 0.1), (torch.randn(1, H) * 0.5, torch.randn(1) * 0.1)]
    _decide_matches_reference(L, LF, fw, (0, 2), filter_kind="shared")


def test_shared_filter_trains_round_trips_and_decodes(tmp_path):
    model = tiny_model(seed=25)
    flt = train_filter(_collected(tmp_path, model), hidden=16, max_epochs=80, log=lambda *a: None, kind="shared")
    assert flt.kind == "shared" and flt.layers[0].in_features == len(ref.SHARED_FEATURES)
    assert flt.layers[-1].out_features == 1 and flt.needs_stats
    flt.save_pretrained(tmp_path / "shared")
    again = Filter.from_pretrained(tmp_path / "shared")
    assert again.kind == "shared" and again.inputs == ref.SHARED_FEATURES
    _same_decodes(model, flt, again)
    with pytest.raises(ValueError, match="shared filter reads"):
        Filter(4, 8, kind="shared", inputs=("confidence", "margin"))
