"""On-policy filter data: generate(answer=...) continues a partial answer, rollout labels (each state labelled
on its own path), learn2pd-policy collection (DAgger rounds) and training on several folders."""

import pytest
import torch

from l2pd.collect import collect, replay
from l2pd.decode import generate
from l2pd.filter import Filter
from l2pd.train import train_filter
from tests.conftest import MASK, tiny_model

P, G, L = 5, 8, 4


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 58, (n, P), generator=g)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_answer_of_masks_is_a_plain_decode_and_a_full_answer_is_kept(cache):
    model = tiny_model(seed=5)
    ids, mask = _prompts(3)
    kw = dict(max_new_tokens=G, block_length=L, strategy="threshold", threshold=0.3, eotp="accepted", cache=cache)
    plain = generate(model, ids, mask, **kw)
    assert torch.equal(generate(model, ids, mask, answer=torch.full((3, G), MASK), **kw), plain)
    full = torch.randint(0, 58, (3, G))
    out = generate(model, ids, mask, answer=full, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences[:, P:], full) and out.forwards == 0


def test_continuing_a_recorded_state_reaches_the_same_answer():
    """Greedy and without a cache, a decode resumed from any of its own states ends where it ended."""
    model = tiny_model(seed=7)
    ids, mask = _prompts(2, seed=1)
    kw = dict(max_new_tokens=G, block_length=L, strategy="threshold", threshold=0.5, eotp="accepted")
    states = []
    final = generate(model, ids, mask, on_step=lambda s, step, tok, prob, canvas: states.append(canvas[:, P:].clone()),
                     **kw)
    assert len(states) >= 3
    for answer in states:
        assert (answer == MASK).any()
        assert torch.equal(generate(model, ids, mask, answer=answer, **kw), final)


def test_answer_is_checked():
    model = tiny_model(seed=5)
    ids, mask = _prompts(2)
    with pytest.raises(ValueError, match=r"answer must be \[B, max_new_tokens\] = \[2, 8\]"):
        generate(model, ids, mask, max_new_tokens=G, answer=torch.full((2, G + 1), MASK))
    with pytest.raises(ValueError, match="answer: .*outside the vocabulary"):
        generate(model, ids, mask, max_new_tokens=G, answer=torch.full((2, G), 10**6))
    with pytest.raises(ValueError, match="oracle"):
        generate(model, ids, mask, max_new_tokens=G, strategy="oracle", target=torch.zeros(2, G, dtype=torch.long),
                 answer=torch.full((2, G), MASK))


def _threshold_decode_states(model, ids, mask, tau):
    """(final answer, [(masked, guesses)] per forward) of threshold ``tau`` + EoTP."""
    seen = []

    def on_step(s, step, token, prob, canvas):
        seen.append((s - P, canvas[:, s : s + L] == MASK, token.clone()))

    final = generate(model, ids, mask, max_new_tokens=G, block_length=L, strategy="threshold", threshold=tau,
                     eotp="accepted", on_step=on_step)[:, P:]
    return final, seen


def test_rollout_labels_with_the_behaviour_as_the_careful_rule_are_its_own_final_answer():
    """When the continuation is the recorded decode itself, each state's continuation is that decode's final
    answer: the labels are guess == its final answer, at every state (the hand-checkable case)."""
    model = tiny_model(seed=5)
    ids, mask = _prompts(3, seed=2)
    final, seen = _threshold_decode_states(model, ids, mask, 0.3)
    want = torch.cat([((tok == final[:, o : o + L]) & m)[m.any(-1)] for o, m, tok in seen])
    masked = torch.cat([m[m.any(-1)] for _, m, _ in seen])
    data = replay(model, ids, mask, G, L, policy="threshold:0.3", labels="rollout:0.3")
    assert torch.equal(data["masked"].bool(), masked)
    assert torch.equal(data["labels"].bool(), want)


def test_rollout_labels_follow_each_state_not_one_fixed_path():
    """Fast behaviour, careful continuation: a state's labels are its guesses against the careful decode
    continued from that state; at a row's first forward (nothing decided yet) that is the careful decode
    from scratch."""
    model = tiny_model(seed=5)
    ids, mask = _prompts(4, seed=3)
    _, seen = _threshold_decode_states(model, ids, mask, 0.05)
    careful = generate(model, ids, mask, max_new_tokens=G, block_length=L, strategy="threshold", threshold=0.9,
                       eotp="accepted")[:, P:]
    data = replay(model, ids, mask, G, L, policy="threshold:0.05", labels="rollout:0.9")
    o, m, tok = seen[0]  # first forward: every row active, nothing decided
    assert o == 0 and m.all()
    assert torch.equal(data["labels"][: len(ids)].bool(), tok == careful[:, :L])
    assert data["labels"].shape == data["masked"].shape
    assert not (data["labels"].bool() & ~data["masked"].bool()).any()


def test_dagger_round_collects_the_filters_own_decodes_and_trains_on_both(tmp_path):
    model = tiny_model(seed=5)
    prompts = [torch.randint(0, 58, (P,)).tolist() for _ in range(6)]
    kw = dict(gen_length=G, block_length=L, batch_size=3, progress=False)
    r0 = collect(model, prompts, str(tmp_path / "r0"), policy="threshold:0.5", labels="rollout:0.9", **kw)
    assert r0["labels"] == "rollout:0.9" and r0["policy"] == "threshold:0.5"
    flt = train_filter(str(tmp_path / "r0"), hidden=8, max_epochs=5, kind="shared", threshold=0.5,
                       log=lambda *a: None)
    flt.save_pretrained(tmp_path / "f0")
    r1 = collect(model, prompts, str(tmp_path / "r1"), policy="learn2pd:0.5", labels="rollout:0.9",
                 filter=str(tmp_path / "f0"), **kw)
    assert r1["policy_filter"] == Filter.from_pretrained(tmp_path / "f0").digest()
    both = train_filter([str(tmp_path / "r0"), str(tmp_path / "r1")], hidden=8, max_epochs=5, kind="shared",
                        log=lambda *a: None)
    one = train_filter(str(tmp_path / "r0"), hidden=8, max_epochs=5, kind="shared", log=lambda *a: None)
    assert both.meta["train_rows"] + both.meta["val_rows"] > one.meta["train_rows"] + one.meta["val_rows"]
    assert both.meta["collect_policy"] == "threshold:0.5+learn2pd:0.5"
    with pytest.raises(ValueError, match="filter"):
        collect(model, prompts, str(tmp_path / "x"), policy="learn2pd:0.5", **kw)  # no filter
    with pytest.raises(ValueError, match="filter"):
        collect(model, prompts, str(tmp_path / "x"), policy="threshold:0.5", filter=flt, **kw)
    for bad in ("rollout", "rollout:0", "rollout:2", "final:1", "x"):
        with pytest.raises(ValueError, match="labels"):
            collect(model, prompts, str(tmp_path / "x"), labels=bad, **kw)


def test_training_refuses_folders_of_other_settings(tmp_path):
    model = tiny_model(seed=5)
    prompts = [torch.randint(0, 58, (P,)).tolist() for _ in range(4)]
    collect(model, prompts, str(tmp_path / "a"), gen_length=G, block_length=L, batch_size=4, progress=False)
    collect(model, prompts, str(tmp_path / "b"), gen_length=G, block_length=2 * L, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="block_length"):
        train_filter([str(tmp_path / "a"), str(tmp_path / "b")], hidden=8, max_epochs=5, log=lambda *a: None)
