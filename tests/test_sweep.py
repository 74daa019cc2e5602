"""l2pd sweep / tune: the grid, resuming, the Pareto frontier, the operating-point rule, the plot, the CLI."""

import json
import math

import pytest

import l2pd.sweep as sw
from l2pd.cli import main
from tests.conftest import FILTER32, tiny_model


def _row(strategy, tau, acc, nfe, block=32):
    return dict(strategy=strategy, threshold=tau, eotp="accepted", block_length=block, cache="none", problems=100,
                accuracy=acc, stderr=0.01, mean_nfe=nfe, tokens_per_s=1.0, seconds=1.0)


def test_grid_gives_steps_no_tau():
    g = sw.grid(["steps", "threshold"], [0.9, 0.99], ["off", "accepted"], [32, 64], ["none"])
    assert len(g) == 2 * 2 * 1 + 2 * 2 * 2
    assert all(c["threshold"] is None for c in g if c["strategy"] == "steps")


def test_pareto_marks_only_undominated_rows():
    rows = sw.pareto([_row("a", 0.9, 0.90, 2.0), _row("b", 0.9, 0.95, 3.0), _row("c", 0.9, 0.94, 4.0),
                      _row("d", 0.9, 0.95, 3.0)])
    assert [r["pareto"] for r in rows] == [True, True, False, True]


def test_sweep_resumes_without_rerunning(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(model, tok, problems, **kw):
        calls.append(kw["threshold"] if "threshold" in kw else None)
        return dict(problems=len(problems), accuracy=0.5, mean_nfe=3.0, tokens_per_s=1.0, seconds=0.1)

    monkeypatch.setattr(sw, "evaluate", fake_evaluate)
    out = str(tmp_path / "rows.jsonl")
    configs = sw.grid(["threshold"], [0.9, 0.99], ["accepted"], [32], ["none"])
    problems = [sw.Item("q", 1)] * 4

    model = tiny_model(seed=0)
    sw.sweep(model, None, problems, configs[:1], out=out, progress=False)
    rows = sw.sweep(model, None, problems, configs, out=out, progress=False)
    assert calls == [0.9, 0.99] and len(rows) == 2  # the first configuration was read back, not rerun
    assert rows[0]["stderr"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="checker"):
        sw.sweep(model, None, problems, configs, checker="nope")


def test_tune_follows_the_stated_rule(monkeypatch):
    from l2pd import Filter

    rows = [_row("steps", None, 0.960, 256), _row("learn2pd", 0.99, 0.950, 3.0), _row("learn2pd", 0.995, 0.956, 4.0),
            _row("learn2pd", 0.998, 0.962, 7.0)]
    monkeypatch.setattr(sw, "sweep", lambda *a, **k: [dict(r) for r in rows])
    flt = Filter(block_length=32, hidden=4)
    point = sw.tune(None, None, flt, [sw.Item("q", 1)], [0.99, 0.995, 0.998], budget=0.5)
    assert flt.threshold == 0.995 and point["mean_nfe"] == 4.0 and flt.meta["eotp"] == "accepted"
    point = sw.tune(None, None, flt, [sw.Item("q", 1)], [0.99, 0.995, 0.998], budget=0.1)
    assert flt.threshold == 0.998 and "within 0.1 points" in point["rule"]
    rows[3]["accuracy"] = 0.90  # none within the budget: the most accurate
    point = sw.tune(None, None, flt, [sw.Item("q", 1)], [0.99, 0.995, 0.998], budget=0.1)
    assert flt.threshold == 0.995 and "none qualified" in point["rule"]


def test_checkers_and_problem_files(tmp_path):
    assert sw.CHECKERS["hash-number"]("so #### 12", 12) and not sw.CHECKERS["hash-number"]("12", 12)
    assert sw.CHECKERS["last-number"]("it is 1,200.", 1200)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": 3}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match='line 2: a sweep needs an "answer"'):
        sw.load_problems(str(path))


def test_aup_of_hand_made_points():
    # one point: its rectangle; W = 1 at y_max
    assert sw.aup([(2.0, 90.0)], 90.0) == pytest.approx(180.0)
    # a second point 2 points lower: trapezoid with its weight exp(-3 (1 - 88/90))
    w = math.exp(-3 * (1 - 88 / 90)) * 88
    assert sw.aup([(4.0, 88.0), (2.0, 90.0)], 90.0) == pytest.approx(180.0 + 2 * (90 + w) / 2)
    # a point more than 5 points below the least parallel one is left out
    assert sw.aup([(2.0, 90.0), (9.0, 80.0)], 90.0) == pytest.approx(180.0)
    with pytest.raises(ValueError):
        sw.aup([], 90.0)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is the optional extra l2pd[plot]")
    rows = sw.pareto([_row("threshold", 0.9, 0.9, 2.0), _row("threshold", 0.99, 0.95, 3.0),
                      _row("learn2pd", 0.99, 0.94, 4.0)])
    sw.plot(rows, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_and_tune_from_the_command_line(tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("L2PD_BACKEND", "torch")  # the commands, not the kernels, are under test
    out = tmp_path / "rows.jsonl"
    argv = ["sweep", "--problems", "2", "--strategies", "threshold,learn2pd", "--taus", "0.9", "--eotp", "accepted",
            "--blocks", "128", "--gen-length", "128", "--device", "cpu", "--out", str(out), "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["strategy"] for r in rows} == {"threshold", "learn2pd"} and all("pareto" in r for r in rows)
    assert all(r["tokens_per_forward"] > 0 for r in rows)
    assert all(r.get("aup", 0) > 0 for r in rows) or all(r["accuracy"] == 0 for r in rows)
    assert len(out.read_text().splitlines()) == 2
    shutil.copytree(FILTER32, tmp_path / "f")  # block 32: tune's `steps` baseline is 32 forwards, not 128
    assert main(["tune", "--filter", str(tmp_path / "f"), "--problems", "2", "--batch-size", "2", "--taus",
                 "0.9,0.99", "--gen-length", "32", "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert info["operating_point"]["tau"] in (0.9, 0.99) and info["threshold"] == info["operating_point"]["tau"]
