"""The policy-gradient objective (l2pd.reinforce): its decode is generate's when greedy, its starting filter is a
confidence threshold, its loss is REINFORCE's, the baseline removes the gradient when every decode scores the
same, and bad settings are refused."""

import pytest
import torch

from l2pd.decode import generate
from l2pd.demo.task import split
from l2pd.evaluate import encode_prompts
from l2pd.filter import Filter
from l2pd.loading import load_model
from l2pd.models import adapter_for
from l2pd.reinforce import Rollout, logit, policy_loss, rollout, threshold_filter, train_policy
from l2pd_kernels import reference as ref


@pytest.fixture(scope="module", params=["llada", "dream"])
def bundled(request):
    return load_model(None, "cpu", family=request.param)


def _noisy_filter(L, seed):
    flt = threshold_filter(L, 16, confidence_at=0.999, tau=0.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from a pure threshold: the hidden units decide too
        for p in flt.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return flt


@pytest.mark.parametrize("tau", [0.3, 0.9])
def test_greedy_rollout_is_generate(bundled, tau):
    """Greedy, the policy's decode gives generate's tokens and per-row forwards (learn2pd, EoTP, no cache),
    over prompts of different lengths (left padding) and two blocks."""
    model, tok = bundled
    ids, mask = encode_prompts(tok, [p.question for p in split("test", 3, offset=7)], "cpu")
    assert not mask.all()  # the prompts differ in length
    flt = _noisy_filter(16, seed=1)
    ro = rollout(adapter_for(model), ids, mask, flt, tau=tau, gen_length=32, greedy=True)
    out = generate(model, ids, mask, max_new_tokens=32, block_length=16, strategy="learn2pd", filter=flt,
                   threshold=tau, eotp="accepted", cache="none", return_dict_in_generate=True, backend="torch")
    assert torch.equal(ro.sequences, out.sequences)
    assert ro.forwards.tolist() == out.nfe.tolist()
    assert sum(len(rows) for rows, *_ in ro.steps) == int(ro.forwards.sum())


def test_threshold_filter_is_a_threshold():
    flt = threshold_filter(32, 8, confidence_at=0.97, tau=0.6)
    x = torch.rand(4, 32, len(ref.HISTORY_FEATURES))
    conf = x[..., ref.HISTORY_FEATURES.index("confidence")]
    conf[0, :4] = torch.tensor([0.9, 0.969, 0.971, 0.999])
    away = (conf - 0.97).abs() > 1e-4
    accept = torch.sigmoid(flt(x)[..., 0]) > 0.6
    assert torch.equal(accept[away], (conf > 0.97)[away])
    assert accept[0, :4].tolist() == [False, False, True, True]


def test_policy_loss_is_reinforce():
    """The loss equals -mean(advantage * sum of Bernoulli log-probabilities of the free choices), with the
    logits (z - logit(tau)) / temperature; forced and decided positions do not count."""
    torch.manual_seed(0)
    flt = Filter(8, 6, 1, 0.5, kind="history")
    steps, ref_total = [], 0.0
    advantage = torch.tensor([0.5, -1.0, 2.0])
    for rows in (torch.tensor([0, 1, 2]), torch.tensor([2])):
        x = torch.randn(len(rows), 8, len(ref.HISTORY_FEATURES))
        free = torch.rand(len(rows), 8) > 0.3
        chosen = torch.rand(len(rows), 8) > 0.5
        steps.append((rows, x, free, chosen))
        u = (flt(x)[..., 0] - logit(0.7)) / 0.4
        lp = torch.distributions.Bernoulli(logits=u).log_prob(chosen.float())
        ref_total = ref_total + (advantage[rows] * (lp * free).sum(-1)).sum()
    ro = Rollout(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, dtype=torch.long), steps)
    loss = policy_loss(flt, ro, advantage, 0.7, 0.4)
    torch.testing.assert_close(loss, -ref_total / 3)
    g = torch.autograd.grad(loss, list(flt.parameters()))
    g_ref = torch.autograd.grad(-ref_total / 3, list(flt.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_training_moves_the_filter_only_through_advantages():
    """Every decode right and no cost: equal rewards, zero advantages, the filter stays as it started. With a
    reward that differs, it moves; the result is a history filter that saves and loads."""
    model, tok = load_model(None, "cpu")
    problems = split("train", 4)
    start = threshold_filter(16, 8, confidence_at=0.9, slope=10.0, seed=2)  # a soft policy: decodes differ
    kw = dict(block_length=16, gen_length=32, samples=3, prompts_per_step=2, iterations=2, lr=1e-2, log=lambda m: None)
    same = train_policy(model, tok, problems, start, cost=0.0, checker=lambda text, answer: True, **kw)
    for a, b in zip(same.state_dict().values(), start.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = train_policy(model, tok, problems, start, cost=0.05, **kw)
    assert any(not torch.equal(a, b) for a, b in zip(moved.state_dict().values(), start.state_dict().values()))
    assert moved.kind == "history" and len(moved.meta["curve"]) == 2 and moved.meta["eotp"] == "accepted"


def test_bad_settings_are_refused():
    model, tok = load_model(None, "cpu")
    problems = split("train", 2)
    for kw, msg in ((dict(samples=1), "samples"), (dict(tau=1.0), "tau"), (dict(gen_length=40), "multiple"),
                    (dict(temperature=0.0), "temperature"), (dict(cost=-1.0), "cost")):
        with pytest.raises(ValueError, match=msg):
            train_policy(model, tok, problems, **{"block_length": 16, "gen_length": 32, "iterations": 1, **kw})
    with pytest.raises(ValueError, match="history filter"):
        train_policy(model, tok, problems, Filter(16, 8, 1, 0.5, kind="shared"), block_length=16, gen_length=32)


def test_cli_trains_a_filter_that_decodes(tmp_path):
    from l2pd.cli import main

    out = tmp_path / "f"
    assert main(["train-filter", "--objective", "sequence", "--out", str(out), "--iterations", "2",
                 "--prompts-per-step", "2", "--samples", "2", "--block-length", "16", "--gen-length", "32",
                 "--device", "cpu"]) == 0
    flt = Filter.from_pretrained(out)
    assert flt.kind == "history" and flt.threshold == 0.5 and flt.meta["objective"] == "policy gradient"
    model, tok = load_model(None, "cpu")
    ids, mask = encode_prompts(tok, [split("test", 1)[0].question], "cpu")
    seq = generate(model, ids, mask, max_new_tokens=32, filter=str(out), backend="torch")
    assert seq.shape == (1, ids.shape[1] + 32) and not (seq == adapter_for(model).mask_id).any()
