"""Every common mistake ends in one clear line (exit status 2 from the CLI) that names the file, the line or
the argument, and is caught before any long work."""

import json
import os
import re
import shutil

import pytest
import torch

from l2pd.cli import main
from l2pd.collect import collect
from l2pd.train import train_filter
from tests.conftest import tiny_model


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2pd: error:") and err.count("\n") == 1, err  # one line
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture
def bundled(tmp_path):
    import l2pd.demo

    folder = tmp_path / "model"
    shutil.copytree(l2pd.demo.MODEL_DIR, folder)
    shutil.copytree(l2pd.demo.FILTER_DIR, tmp_path / "filter")
    return folder


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors(bundled, capsys):
    _truncate(bundled / "model.safetensors")
    _fails(["generate", "--model", str(bundled), "--prompt", "hi", "--device", "cpu"], capsys,
           "model.safetensors", "truncated or corrupt")


def test_truncated_filter(bundled, capsys):
    _truncate(bundled.parent / "filter" / "filter.safetensors")
    _fails(["eval", "--problems", "1", "--filter", str(bundled.parent / "filter"), "--device", "cpu"], capsys,
           "filter.safetensors", "truncated or corrupt")


@pytest.mark.parametrize("text, needle", [("{}", "lacks ['d_model'"), ("{", "not valid JSON at line 1"),
                                          ("[1, 2]", "expected a JSON object")])
def test_bad_config_json(bundled, capsys, text, needle):
    (bundled / "config.json").write_text(text)
    _fails(["generate", "--model", str(bundled), "--prompt", "hi", "--device", "cpu"], capsys, "config.json", needle)


def test_config_that_does_not_match_the_weights(bundled, capsys):
    cfg = json.loads((bundled / "config.json").read_text())
    cfg["d_model"] *= 2
    (bundled / "config.json").write_text(json.dumps(cfg))
    _fails(["generate", "--model", str(bundled), "--prompt", "hi", "--device", "cpu"], capsys,
           "do not match config.json")


@pytest.mark.parametrize("lines, needle", [
    (['{"prompt": "a"}', '{"question": "b"}'], 'line 2: expected an object with a "prompt" string, got keys'),
    (['"just a string"'], "line 1: expected an object"),
    (['{"prompt": "a"}', "", '{"prompt": '], "line 3: not valid JSON"),
    (["", "  "], "no prompts"),
    (['{"prompt": "  "}'], 'line 1: the "prompt" is empty'),
])
def test_bad_prompts_file(tmp_path, capsys, lines, needle):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _fails(["collect", "--prompts", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"], capsys,
           str(path), needle)


def test_missing_prompts_file(tmp_path, capsys):
    _fails(["collect", "--prompts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], capsys, "nope.jsonl")


def test_out_folders_are_checked_before_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "filter.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    _fails(["train-filter", "--data", str(data), "--out", str(tmp_path / "done")], capsys, "already holds filter.json",
           "--overwrite")
    (tmp_path / "afile").write_text("x")
    _fails(["train-filter", "--data", str(data), "--out", str(tmp_path / "afile")], capsys, "not a folder")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    _fails(["train-filter", "--data", str(data), "--out", str(tmp_path / "new" / "f")], capsys, "cannot write there")
    _fails(["collect", "--out", str(tmp_path / "new"), "--num-prompts", "2"], capsys, "cannot write there")


@pytest.mark.parametrize("flag, value", [("--max-epochs", "0"), ("--hidden", "0"), ("--patience", "-1"),
                                         ("--lr", "0"), ("--lr", "nan"), ("--depth", "0")])
def test_bad_training_numbers(tmp_path, capsys, flag, value):
    model = tiny_model(seed=7)
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(4)]
    collect(model, prompts, str(tmp_path / "data"), gen_length=8, block_length=4, batch_size=2, shard_size=4,
            progress=False)
    _fails(["train-filter", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "f"), flag, value], capsys,
           f"argument {flag}")
    assert not (tmp_path / "f").exists()


def test_resume_with_other_prompts_is_refused(tmp_path):
    model = tiny_model(seed=7)
    kw = dict(gen_length=8, block_length=4, batch_size=2, shard_size=2, progress=False)
    a = [torch.randint(0, 58, (5,)).tolist() for _ in range(4)]
    b = [torch.randint(0, 58, (5,)).tolist() for _ in range(4)]
    collect(model, a, str(tmp_path / "c"), max_shards=1, **kw)
    with pytest.raises(ValueError, match="other prompts"):
        collect(model, b, str(tmp_path / "c"), **kw)
    assert collect(model, a, str(tmp_path / "c"), **kw)["shards_done"] == 2  # the same prompts resume


def test_degenerate_training_data_warns(tmp_path):
    model = tiny_model(seed=7)
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(4)]
    collect(model, prompts, str(tmp_path / "data"), gen_length=8, block_length=4, batch_size=2, shard_size=4,
            progress=False)
    logged = []
    flt = train_filter(str(tmp_path / "data"), hidden=8, max_epochs=5, log=logged.append)
    assert any(w.startswith("only ") for w in flt.meta["warnings"])
    assert any("warning: only" in line for line in logged)
    assert any("not evidence of a good filter" in line for line in logged)



def test_shared_filter_counts_masked_positions_not_rows():
    """A shared filter learns from every masked position, so 354 rows holding 32,693 positions are enough for
    it; the dense filter's row count does not apply."""
    from l2pd.train import MIN_POSITIONS, MIN_ROWS, _degenerate

    y = torch.tensor([[True, False]]).repeat(MIN_ROWS // 2, 1)
    few_rows_many_positions = torch.ones(MIN_ROWS // 2, MIN_POSITIONS // (MIN_ROWS // 2) + 1, dtype=torch.bool)
    few = _degenerate(MIN_ROWS // 2, 25, y, torch.ones_like(y))
    assert any(w.startswith(f"only {MIN_ROWS // 2} rows") for w in few)
    yy = torch.zeros_like(few_rows_many_positions)
    yy[:, 0] = True
    assert not _degenerate(MIN_ROWS // 2, 25, yy, few_rows_many_positions, per_position=True)
    too_few = _degenerate(MIN_ROWS // 2, 25, y, torch.ones_like(y), per_position=True)
    assert any(w.startswith(f"only {y.numel()} masked positions") for w in too_few)


def test_demo_with_another_block_length_skips_learn2pd(capsys, monkeypatch):
    import l2pd.cli

    monkeypatch.setenv("L2PD_BACKEND", "torch")  # what the demo prints, not the kernels, is under test

    assert l2pd.cli.main(["demo", "--problems", "1", "--gen-length", "32", "--block-length", "16", "--device",
                          "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert re.search(r"trained for block length \d+, not 16", captured.err)
    # the learn2pd rows need the filter's block; the model's tuned default (a threshold) runs at any block
    assert {r["config"] for r in rows} == {"steps", "threshold 0.9", "threshold 0.9 + EoTP",
                                           "default: threshold 0.985 + EoTP"}


def test_written_files_get_the_usual_permissions(tmp_path):
    """safetensors creates owner-only files; what l2pd writes is readable like any other file."""
    import stat

    from l2pd import Filter

    umask = os.umask(0o022)
    try:
        model = tiny_model(seed=1)
        model.save_pretrained(tmp_path / "m")
        Filter(block_length=4, hidden=4).save_pretrained(tmp_path / "f")
        prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(2)]
        collect(model, prompts, str(tmp_path / "c"), gen_length=4, block_length=4, batch_size=2, shard_size=2,
                progress=False)
        files = [tmp_path / "m" / "model.safetensors", tmp_path / "f" / "filter.safetensors",
                 tmp_path / "c" / "shard-00000.safetensors"]
        for f in files:
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, f
    finally:
        os.umask(umask)
