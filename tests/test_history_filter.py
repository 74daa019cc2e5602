"""The history filter: a shared filter that also reads each position's guess history (run length of its
guess, previous confidence, change). Kernel against reference over consecutive forwards (the history
buffers evolve), hand-made histories, collection channels equal to what decoding keeps, training, the
versioned layout, and the engine and generate agreeing."""

import functools
import json
import os

import pytest
import torch

from l2pd.collect import collect, load_shards, replay
from l2pd.decode import generate
from l2pd.engine import Engine
from l2pd.filter import Filter
from l2pd.train import train_filter
from l2pd_kernels import reference as ref
from tests.conftest import needs_kernels, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F = len(ref.HISTORY_FEATURES)


def _history(B, T):
    return (torch.full((B, T), -1, dtype=torch.int64, device=DEV), torch.zeros(B, T, dtype=torch.int32, device=DEV),
            torch.zeros(B, T, dtype=torch.float32, device=DEV))


def _weights(H=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [(torch.randn(H, F, generator=g), torch.randn(H, generator=g) * 0.1),
         (torch.randn(1, H, generator=g) * 0.5, torch.randn(1, generator=g) * 0.1)]
    return [(a.to(DEV), b.to(DEV)) for a, b in w]


def test_history_features_by_hand():
    """A guess kept three forwards, one that changes every forward, and the first forward (no history)."""
    hist = _history(2, 6)
    seq = [torch.tensor([[5, 1, 2], [4, 4, 4]]), torch.tensor([[5, 2, 2], [4, 4, 4]]),
           torch.tensor([[5, 3, 2], [4, 4, 4]])]
    probs = [torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.2, 0.3]]), torch.tensor([[0.6, 0.3, 0.8], [0.2, 0.3, 0.4]]),
             torch.tensor([[0.9, 0.4, 0.7], [0.3, 0.4, 0.5]])]
    seen = []
    for tok, p in zip(seq, probs):
        seen.append(ref.update_history(hist, tok.to(DEV), p.to(DEV), 2))
    run0, prev0 = seen[0]
    assert run0.tolist() == [[1, 1, 1], [1, 1, 1]] and prev0.abs().sum() == 0  # no history yet
    run2, prev2 = seen[2]
    assert run2.tolist() == [[3, 1, 3], [3, 3, 3]]  # position 1 changes its guess every forward
    torch.testing.assert_close(prev2.cpu(), probs[1])
    assert hist[0][:, :2].eq(-1).all() and hist[0][:, 5].eq(-1).all()  # only the block's positions move
    shared = torch.zeros(2, 3, len(ref.SHARED_FEATURES), device=DEV)
    conf = probs[2].to(DEV)
    x = ref.history_features(shared, conf, torch.full((2, 3), 20, device=DEV), prev2)
    assert x.shape == (2, 3, F)
    assert (x[..., -3] == 1).all()  # the run length is capped at RUN_CAP
    torch.testing.assert_close(x[..., -1], conf - prev2)


@needs_kernels
@pytest.mark.parametrize("L,LF", [(8, 8), (5, 8), (13, 16)])
@pytest.mark.parametrize("per_row", [False, True])
def test_decide_with_a_history_filter_matches_reference_over_forwards(L, LF, per_row):
    """Four consecutive forwards on the same buffers: tokens that sometimes repeat, ties, -inf margins at a
    decided position; canvas, counts and all three history buffers equal after each."""
    from l2pd_kernels import decide

    torch.manual_seed(L * 31 + LF + per_row)
    B, T, mask_id, s = 3, 40, 99, 10
    fw = _weights()
    canvas = torch.randint(0, 50, (B, T), device=DEV)
    canvas[:, s : s + L] = torch.where(torch.rand(B, L, device=DEV) < 0.8, mask_id, canvas[:, s : s + L])
    states = {"ref": (canvas.clone(), _history(B, T)), "ker": (canvas.clone(), _history(B, T))}
    token = torch.randint(0, 6, (B, L), device=DEV)
    for step in range(4):
        token = torch.where(torch.rand(B, L, device=DEV) < 0.5, token, torch.randint(0, 6, (B, L), device=DEV))
        prob = torch.rand(B, L, device=DEV).to(torch.bfloat16).float()  # bf16 values: ties are common
        prob[0, 1] = prob[0, 2]
        margin, entropy = torch.rand(B, L, device=DEV) * prob, torch.rand(B, L, device=DEV) * 3
        kw = dict(threshold=0.6, mask_id=mask_id, eos_id=7, eotp="accepted", filter_weights=fw, filter_block=LF,
                  filter_kind="history", margin=margin, entropy=entropy, step=step)
        if per_row:  # the engine's layout: each row its own canvas row and words
            kw.update(rows=torch.tensor([2, 0, 1], device=DEV),
                      params=torch.tensor([[(s << 20) | 1, step]] * B, device=DEV))
        outs = {}
        for name, fn in (("ref", ref.decide), ("ker", decide)):
            c, h = states[name]
            outs[name] = fn(c, token, prob, block_start=s, k=1, history=h, **kw)
        for a, b in zip(outs["ref"], outs["ker"]):
            assert torch.equal(a, b), step
        assert torch.equal(states["ref"][0], states["ker"][0]), step
        for a, b in zip(states["ref"][1], states["ker"][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(states["ref"][1][1].max()) >= 2  # some guess persisted


def test_history_filter_needs_its_buffers():
    B, T, L = 2, 20, 4
    canvas = torch.full((B, T), 9)
    kw = dict(block_start=4, k=1, threshold=0.5, mask_id=9, eos_id=8, filter_weights=_weights(), filter_block=L,
              filter_kind="history", margin=torch.rand(B, L), entropy=torch.rand(B, L))
    args = (canvas, torch.zeros(B, L, dtype=torch.long), torch.rand(B, L))
    with pytest.raises(ValueError, match="history filter needs history"):
        ref.decide(*args, **kw)
    with pytest.raises(ValueError, match="history filter needs history"):
        ref.decide(*args, history=_history(B, T)[:2], **kw)


def _collect(tmp_path, model, name="data", **kw):
    prompts = [torch.randint(0, 58, (int(torch.randint(3, 7, ())),)).tolist() for _ in range(12)]
    collect(model, prompts, str(tmp_path / name), gen_length=12, block_length=4, batch_size=6, progress=False, **kw)
    return str(tmp_path / name)


def test_collection_history_is_what_decoding_keeps(tmp_path):
    """Run lengths and previous confidences recorded per (row, forward) equal the decode's own buffers."""
    model = tiny_model(seed=23)
    prompts = torch.randint(0, 58, (3, 5))
    data = replay(model, prompts, torch.ones_like(prompts), 12, 4, policy="threshold:0.4")
    hist = tuple(h.cpu() for h in _history(3, 17))
    runs, prevs = [], []

    def on_step(s, step, token, prob, canvas):
        active = (canvas[:, s : s + 4] == model.config.mask_token_id).any(-1)
        run, prev = ref.update_history(hist, token, prob, s)
        runs.append(run[active])
        prevs.append(prev[active])

    generate(model, prompts, torch.ones_like(prompts), max_new_tokens=12, block_length=4, strategy="threshold",
             threshold=0.4, on_step=on_step)
    assert torch.equal(data["run"], torch.cat(runs))
    torch.testing.assert_close(data["previous"], torch.cat(prevs), rtol=0, atol=0)
    first = data["step"] == 0
    assert (data["run"][first] == 1).all() and (data["previous"][first] == 0).all()
    assert (data["run"][~first] >= 1).all() and int(data["run"].max()) >= 2


def test_history_filter_trains_round_trips_and_decodes_like_the_engine(tmp_path):
    model = tiny_model(seed=25)
    path = _collect(tmp_path, model, policy="threshold:0.5")
    assert load_shards(path)[1]["version"] == 3
    flt = train_filter(path, hidden=16, max_epochs=60, log=lambda *a: None, kind="history", threshold=0.5)
    assert flt.kind == "history" and flt.needs_history and flt.layers[0].in_features == F
    flt.save_pretrained(tmp_path / "h")
    assert json.load(open(tmp_path / "h" / "filter.json"))["version"] == 3
    again = Filter.from_pretrained(tmp_path / "h")
    assert again.inputs == ref.HISTORY_FEATURES and again.digest() == flt.digest()
    prompts = [torch.randint(0, 58, (n,)).tolist() for n in (4, 6, 5)]
    kw = dict(max_new_tokens=12, block_length=4, strategy="learn2pd", threshold=0.5, eotp=True)
    want = []
    for p in prompts:
        out = generate(model, torch.tensor([p]), filter=again, backend="torch", **kw)[0, len(p):].tolist()
        want.append(out[: out.index(model.config.eos_token_id)] if model.config.eos_token_id in out else out)
    backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for backend in backends:  # interleaved rows at different blocks, each with its own history
        engine = functools.partial(Engine, backend=backend)(model, max_batch=2, filter=again)
        n = 3 if backend == "torch" else 2  # (the interpreter is slow)
        reqs = [engine.submit(p, **kw) for p in prompts[:n]]
        engine.run()
        assert [r.tokens for r in reqs] == want[:n], backend
        if backend == "triton":
            got = generate(model, torch.tensor([prompts[0]]), filter=again, backend="triton", **kw)
            assert got[0, len(prompts[0]):].tolist()[: len(want[0])] == want[0]
    with pytest.raises(ValueError, match="without the guesses' history"):
        old = tmp_path / "old"
        os.makedirs(old)
        for name in os.listdir(path):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file, save_file

                d = load_file(os.path.join(path, name))
                save_file({k: v for k, v in d.items() if k not in ("run", "previous")}, os.path.join(old, name))
            elif name == "collect.json":
                open(old / name, "w").write(open(os.path.join(path, name)).read())
        train_filter(str(old), hidden=8, max_epochs=5, kind="history", log=lambda *a: None)


def test_older_filter_layouts_still_load(tmp_path):
    flt = Filter(4, 8, kind="shared")
    flt.save_pretrained(tmp_path / "s")
    info = json.load(open(tmp_path / "s" / "filter.json"))
    assert info["version"] == 2  # the lowest version that describes it
    assert Filter.from_pretrained(tmp_path / "s").kind == "shared"
    info.update(version=2, kind="history")
    json.dump(info, open(tmp_path / "s" / "filter.json", "w"))
    with pytest.raises(ValueError, match="history"):
        Filter.from_pretrained(tmp_path / "s")
