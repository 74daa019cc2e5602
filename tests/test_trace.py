"""l2pd trace: the record, the self-contained page, the CLI; tracing never changes the decode; the page in a
headless browser when one is installed."""

import json
import os
import re
import shutil
import subprocess

import pytest

import l2pd.demo
from l2pd.cli import main
from l2pd.trace import TRACE_VERSION, render_html, trace

Q = "Mia has 45 apples. She gets 17 more apples at the market. How many apples does Mia have now?"


@pytest.fixture(scope="module")
def bundled():
    return l2pd.demo.load(device="cpu")


@pytest.mark.parametrize("strategy,extra", [("steps", {"max_new_tokens": 32, "steps": 8}),
                                            ("threshold", {"threshold": 0.9}),
                                            ("learn2pd", {})])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_tracing_does_not_change_the_decode(bundled, strategy, extra, cache):
    from l2pd.demo.tokenizer import prompt_text

    model, tok = bundled
    kw = dict(strategy=strategy, cache=cache, eotp="accepted", **extra)
    rec = trace(model, tok, Q, **kw)
    ids = tok(prompt_text(tok, Q), add_special_tokens=False, return_tensors="pt").input_ids
    plain = model.generate(ids, return_dict_in_generate=True, **kw)
    assert rec["answer_ids"] == plain.sequences[0, ids.shape[1]:].tolist()
    assert rec["forwards"] == plain.forwards == len(rec["steps"])
    assert sum(rec["forwards_per_block"].values()) == rec["forwards"]
    assert all(f is not None and 0 <= f < rec["forwards"] for f in rec["fixed_at"])  # every position fixed once
    assert (strategy == "learn2pd") == ("filter_score" in rec["steps"][0])


def test_record_and_page(bundled):
    model, tok = bundled
    a = trace(model, tok, Q, eotp="accepted")
    b = trace(model, tok, Q, strategy="threshold", threshold=0.9, eotp="off")
    assert a["version"] == TRACE_VERSION and "#### 62" in a["answer_text"]
    assert any(a["eotp_filled"]) and not any(b["eotp_filled"])  # EoTP fills only where it is on
    page = render_html([a, b])
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loaded from the network
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
                      .replace("<\\/", "</"))
    assert [r["forwards"] for r in data] == [a["forwards"], b["forwards"]]
    assert page.count('class="cells"') == 2
    with pytest.raises(ValueError, match="on_step"):
        trace(model, tok, Q, on_step=print)
    with pytest.raises(ValueError, match="non-empty"):
        trace(model, tok, "  ")


def test_cli_writes_page_json_and_png(tmp_path, capsys):
    out = tmp_path / "t" / "trace.html"
    argv = ["trace", "--prompt", Q, "--eotp", "accepted", "--out", str(out), "--vs", "strategy=threshold,threshold=0.9",
            "--device", "cpu", "--png", str(tmp_path / "t" / "trace.png")]
    assert main(argv) == 0
    records = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert len(records) == 2 and records[1]["config"]["strategy"] == "threshold"
    assert (tmp_path / "t" / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert "forwards" in capsys.readouterr().out
    assert main(["trace", "--prompt", Q, "--vs", "colour=red", "--out", str(out)]) == 2


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium here (Debian: apt install chromium)")
def test_page_renders_in_a_headless_browser(bundled, tmp_path):
    from l2pd.trace import write_html

    model, tok = bundled
    a = trace(model, tok, Q, eotp="accepted")
    b = trace(model, tok, Q, strategy="threshold", threshold=0.9, eotp="accepted")
    path = tmp_path / "trace.html"
    write_html([a, b], str(path))
    res = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", f"file://{path}"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Uncaught" not in res.stderr and "console.error" not in res.stderr
    cells = [len(re.findall(r'class="cell', box)) for box in re.findall(r'id="cells\d">(.*?)</div>', res.stdout, re.S)]
    want = [min(len(r["answer_ids"]), r["end_of_text"] + 1) for r in (a, b)]
    assert cells == want
    assert f'id="stepval">{max(a["forwards"], b["forwards"])}<' in res.stdout


@pytest.mark.parametrize("kind,inputs", [("shared", ("confidence",)), ("dense", ("confidence", "margin", "entropy",
                                                                                  "step"))])
def test_trace_of_richer_filters_shows_the_scores_they_decide_with(bundled, kind, inputs):
    import torch

    from l2pd.filter import Filter

    model, tok = bundled
    torch.manual_seed(0)
    flt = Filter(32, 16, kind=kind, inputs=inputs, threshold=0.5).eval()  # random weights
    with torch.no_grad():
        flt.layers[-1].bias.fill_(0.5)  # scores around tau: some positions pass, some wait
    rec = trace(model, tok, Q, strategy="learn2pd", filter=flt, eotp="accepted")
    step = rec["steps"][0]
    scores = step["filter_score"]
    assert len(scores) == 32 and all(0 <= s <= 1 for s in scores)
    passed = [j for j, (m, s) in enumerate(zip(step["masked"], scores)) if m and s > 0.5]
    assert passed and all(rec["fixed_at"][j] == 0 for j in passed)  # what passed tau was fixed then
