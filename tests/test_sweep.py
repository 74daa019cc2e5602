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


def test_choose_picks_per_rule_and_overall_by_the_stated_rule():
    rows = [_row("steps", None, 0.950, 256, block=32), _row("steps", None, 0.980, 256, block=128),
            _row("threshold", 0.9, 0.970, 2.0), _row("threshold", 0.99, 0.976, 2.5),
            _row("threshold", 0.99, 0.977, 2.4, block=128), _row("learn2pd", 0.95, 0.978, 2.3, block=128),
            _row("margin", 0.9, 0.960, 1.5), dict(_row("persistence", 0.9, 0.975, 3.0), persist=2)]
    picks = sw.choose(rows, budget=0.5)  # from the best `steps` (98.0%): at least 97.5%
    assert picks["threshold"]["threshold"] == 0.99 and picks["threshold"]["block_length"] == 128
    assert picks["learn2pd"]["mean_nfe"] == 2.3 and picks["persistence/2"]["within_budget"]
    assert not picks["margin"]["within_budget"] and picks["margin"]["accuracy"] == 0.960
    assert picks["overall"]["strategy"] == "learn2pd"  # 2.3 forwards: the fewest within the budget
    rows[5]["mean_nfe"] = 2.4  # a tie on forwards: the more accurate wins
    rows[4]["accuracy"] = 0.979
    assert sw.choose(rows, budget=0.5)["overall"]["strategy"] == "threshold"
    picks = sw.choose(rows, budget=0.0)  # nobody within: the most accurate rule's most accurate row, flagged
    assert picks["overall"]["strategy"] == "threshold" and not picks["overall"]["within_budget"]
    with pytest.raises(ValueError, match="steps"):
        sw.choose(rows[2:])


def test_tune_with_rules_stores_the_default_decoding(monkeypatch):
    from l2pd import Filter

    seen = {}

    def fake_sweep(model, tok, problems, configs, **kw):
        seen["configs"] = configs
        table = {("steps", 128): (0.99, 256), ("steps", 64): (0.98, 256), ("learn2pd", 128): (0.986, 2.4),
                 ("threshold", 128): (0.987, 2.3), ("threshold", 64): (0.990, 2.2), ("margin", 128): (0.97, 2.0),
                 ("margin", 64): (0.97, 2.0)}
        return [dict(_row(c["strategy"], c["threshold"], *table[c["strategy"], c["block_length"]],
                          block=c["block_length"]), persist=c["persist"]) for c in configs]

    monkeypatch.setattr(sw, "sweep", fake_sweep)
    flt = Filter(block_length=128, hidden=4)
    point = sw.tune(None, None, flt, [sw.Item("q", 1)], [0.98], rules=["threshold", "margin"], blocks=[64, 128])
    kinds = sorted((c["strategy"], c["block_length"]) for c in seen["configs"])
    assert kinds == [("learn2pd", 128), ("margin", 64), ("margin", 128), ("steps", 64), ("steps", 128),
                     ("threshold", 64), ("threshold", 128)]
    assert point["default"] == {"strategy": "threshold", "threshold": 0.98, "block_length": 64, "eotp": "accepted"}
    assert flt.threshold == 0.98 and point["picks"]["learn2pd"]["mean_nfe"] == 2.4
    assert not point["picks"]["margin"]["within_budget"]
    with pytest.raises(ValueError, match="training-free"):
        sw.tune(None, None, flt, [sw.Item("q", 1)], [0.98], rules=["learn2pd"])


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
    rows_file = tmp_path / "tune.jsonl"
    argv = ["tune", "--filter", str(tmp_path / "f"), "--problems", "2", "--batch-size", "2", "--taus", "0.9",
            "--gen-length", "32", "--device", "cpu", "--rules", "threshold", "--rows", str(rows_file)]
    assert main(argv) == 0
    info = json.loads((tmp_path / "f" / "filter.json").read_text())
    point = info["operating_point"]
    assert set(point["picks"]) == {"learn2pd", "threshold"} and point["default"]["block_length"] == 32
    assert point["default"]["strategy"] in ("learn2pd", "threshold")
    assert "default decoding: " in capsys.readouterr().out
    assert len(rows_file.read_text().splitlines()) == 3  # steps, learn2pd, threshold
    assert main(argv) == 0 and len(rows_file.read_text().splitlines()) == 3  # resumed, nothing rerun


def test_the_demo_shows_a_stored_training_free_default():
    from l2pd import Filter
    from l2pd.evaluate import DEMO_STRATEGIES, demo_strategies, format_table

    assert demo_strategies(None) == DEMO_STRATEGIES
    flt = Filter(block_length=32, hidden=4, meta={"operating_point": {"default": {
        "strategy": "margin", "threshold": 0.95, "block_length": 32, "eotp": "accepted"}}})
    rows = demo_strategies(flt)
    assert rows[:-1] == DEMO_STRATEGIES and rows[-1] == (
        "default: margin 0.95 + EoTP", {"strategy": "margin", "threshold": 0.95, "eotp": "accepted"})
    flt.meta["operating_point"]["default"]["strategy"] = "learn2pd"  # the filter's rows show it already
    assert demo_strategies(flt) == DEMO_STRATEGIES
    row = dict(config="default: threshold 0.985 + EoTP", cache="none", accuracy=1.0, mean_nfe=2.0,
               tokens_per_s=1.0, nfe_speedup=1.0, wall_speedup=1.0)
    table = format_table([row]).splitlines()
    assert len({len(line) for line in table}) == 1 and "default: threshold 0.985 + EoTP  none" in table[2]


def test_sweep_prints_each_rule_s_pick():
    from l2pd.cli.sweeps import format_picks

    rows = [_row("steps", None, 0.98, 256, block=128), _row("threshold", 0.99, 0.977, 2.4, block=128),
            _row("margin", 0.9, 0.96, 1.5)]
    text = format_picks(rows, 0.5).splitlines()
    assert "98.0%" in text[0]
    assert text[1:] == ["  margin        tau 0.9, block 32, none: 96.0% at 1.50 forwards"
                        "  (none within: its most accurate)",
                        "  threshold     tau 0.99, block 128, none: 97.7% at 2.40 forwards",
                        "  overall       tau 0.99, block 128, none: 97.7% at 2.40 forwards"]
    assert format_picks(rows[1:], 0.5) == "" and format_picks(rows[:1], 0.5) == ""
