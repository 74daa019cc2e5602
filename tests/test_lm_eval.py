"""The lm-evaluation-harness model: end to end through `l2pd lm-eval` and `simple_evaluate` on the bundled
model and task (offline), generate_until with stop sequences and batches, and the Monte-Carlo loglikelihood."""

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[test,eval]'")

from lm_eval.api.instance import Instance  # noqa: E402

from l2pd.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    from l2pd.lm_eval_model import L2PDLM

    # the decision's reference ops: these tests are about the harness (the kernels have their own, under
    # the interpreter, where one decode costs a minute)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("L2PD_BACKEND", "torch")
        yield L2PDLM(strategy="learn2pd", device="cpu", batch_size=2, mc_num=16, mc_batch=8)


def _question(i=0):
    from l2pd.demo.task import split

    return split("test", i + 1)[i]


def test_cli_end_to_end_on_three_problems(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("L2PD_BACKEND", "torch")  # the harness, not the kernels, is under test
    argv = ["lm-eval", "--model", "l2pd", "--model_args", "strategy=learn2pd,cache=dual", "--device", "cpu",
            "--tasks", "l2pd_word_problems", "--apply_chat_template", "--limit", "3", "--output_path", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "l2pd_word_problems" in out and "forwards per answer" in out
    files = list(tmp_path.rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())["results"]["l2pd_word_problems"]
    assert res["acc,none"] == 1.0  # the bundled model solves these three


def test_simple_evaluate_with_the_registered_model():
    from l2pd import lm_eval_model

    out = lm_eval.simple_evaluate(model="l2pd", model_args="strategy=threshold,eotp=accepted", device="cpu",
                                  tasks=["l2pd_word_problems"], limit=2, apply_chat_template=True,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=lm_eval_model.TASKS_DIR))
    assert out["results"]["l2pd_word_problems"]["acc,none"] == 1.0
    assert lm_eval_model.LAST[-1].stats["answers"] == 2


def test_generate_until_cuts_at_until_in_batches(lm):
    ctxs = [lm.apply_chat_template([{"role": "user", "content": _question(i).question}]) for i in range(3)]
    reqs = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 64}), i) for i, c in enumerate(ctxs)]
    full = [Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 64}), i) for i, c in enumerate(ctxs)]
    cut, whole = lm.generate_until(reqs, disable_tqdm=True), lm.generate_until(full, disable_tqdm=True)
    for a, b in zip(cut, whole):
        assert "\n" not in a and b.startswith(a) and len(a) < len(b)


def test_loglikelihood_is_exact_for_one_token_and_prefers_the_right_answer(lm):
    p = _question()
    ctx = lm.apply_chat_template([{"role": "user", "content": p.question}])
    ids = lm.tokenizer(ctx, add_special_tokens=False).input_ids
    first = lm.tokenizer.decode(lm.tokenizer(p.solution, add_special_tokens=False).input_ids[:1])
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, first), 0)], disable_tqdm=True)
    tok = lm.tokenizer(first, add_special_tokens=False).input_ids
    assert len(tok) == 1
    seq = torch.tensor(ids + [lm.model.config.mask_token_id])
    want = torch.log_softmax(lm._forward_logits(seq[None])[0, -1], -1)[tok[0]]
    assert math.isclose(ll, float(want), rel_tol=1e-5, abs_tol=1e-5)
    wrong = p.solution.replace(f"#### {p.answer}", f"#### {p.answer + 7}")
    reqs = [Instance("loglikelihood", {}, (ctx, s), i) for i, s in enumerate([p.solution, wrong])]
    (right_ll, right_greedy), (wrong_ll, wrong_greedy) = lm.loglikelihood(reqs, disable_tqdm=True)
    assert right_ll > wrong_ll and not wrong_greedy
    again = lm.loglikelihood(reqs[:1], disable_tqdm=True)[0][0]
    assert again == pytest.approx(right_ll, abs=2.0)  # another Monte-Carlo draw: close, not equal
    with pytest.raises(NotImplementedError, match="masked-diffusion"):
        lm.loglikelihood_rolling([])


def test_unknown_model_args_are_refused():
    from l2pd.lm_eval_model import L2PDLM

    with pytest.raises(ValueError, match="temprature"):
        L2PDLM(device="cpu", temprature=0.5)
