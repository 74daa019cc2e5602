"""Bad input ends in one line that names the flag (or the file and line), exit status 2, before any model loads
and before anything is written; the Python API raises a ValueError naming the argument."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import l2pd
from l2pd.cli import main
from tests.conftest import EOS, tiny_model


@pytest.fixture
def inputs(tmp_path):
    """Input files in tmp/in; the command runs in tmp/work, which must stay empty."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "binary.jsonl").write_bytes(b'{"prompt": "a"}\n\xff\xfe\x00junk\n')
    (folder / "number.jsonl").write_text('{"prompt": 42}\n')
    (folder / "notok").mkdir()
    (folder / "notok" / "config.json").write_text("{}")
    (folder / "data").mkdir()
    work = tmp_path / "work"
    work.mkdir()
    return folder, work


def _table(i):
    """(argv, what the one line must name); ``{in}`` is the inputs folder."""
    f = f"{i}"
    return [
        (["demo", "--block-length", "0"], "--block-length"),
        (["demo", "--problems", "-3"], "--problems"),
        (["eval", "--gen-length", "0"], "--gen-length"),
        (["eval", "--threshold", "nan"], "--threshold"),
        (["eval", "--temperature", "-1"], "--temperature"),
        (["eval", "--filter", f"{f}/data"], "--filter"),
        (["collect", "--out", "o", "--shard-size", "-2"], "--shard-size"),
        (["collect", "--out", "o", "--shard-size", "0"], "--shard-size"),
        (["collect", "--out", "o", "--batch-size", "0"], "--batch-size"),
        (["collect", "--out", "o", "--batch-size", "-1"], "--batch-size"),
        (["collect", "--out", "o", "--policy", "threshold:2"], "--policy"),
        (["collect", "--out", "o", "--policy", "learn2pd:0.9"], "--policy-filter"),
        (["collect", "--out", "o", "--policy-filter", f"{f}/data"], "--policy-filter"),
        (["collect", "--out", "o", "--labels", "rollout:2"], "--labels"),
        (["collect", "--out", "o", "--policy", "learn2pd:0.9", "--policy-filter", f"{f}"], "no filter.json"),
        (["collect", "--out", "o", "--prompts", f"{f}/binary.jsonl"], "binary.jsonl: not UTF-8"),
        (["collect", "--out", "o", "--prompts", f"{f}/number.jsonl"], 'line 1: "prompt" must be a string'),
        (["collect", "--out", "o", "--model", f"{f}/notok"], "no tokenizer.json"),
        (["sweep", "--taus", ""], "--taus"),
        (["sweep", "--taus", "0.9,x"], "--taus"),
        (["sweep", "--strategies", "greedy"], "--strategies"),
        (["sweep", "--blocks", "0"], "--blocks"),
        (["sweep", "--filters", "x=y"], "--filters"),
        (["sweep", "--out", "/proc/l2pd/rows.jsonl"], "--out"),
        (["sweep", "--plot", "/proc/l2pd/p.png"], "--plot"),
        (["tune", "--filter", f"{f}/data", "--taus", ""], "--taus"),
        (["tune", "--filter", f"{f}/data", "--budget", "-1"], "--budget"),
        (["tune", "--filter", f"{f}/data", "--rules", "learn2pd"], "--rules"),
        (["tune", "--filter", f"{f}/data", "--blocks", "0"], "--blocks"),
        (["sweep", "--budget", "200"], "--budget"),
        (["train-filter", "--data", f"{f}/data", "--out", "f", "--lr", "1e30"], "--lr"),
        (["train-filter", "--data", f"{f}/data", "--out", "f", "--device", "gpu"], "--device"),
        (["train-filter", "--data", f"{f}/data", "--out", "f", "--inputs", "margin"], "--inputs"),
        (["train-filter", "--out", "f"], "--data"),
        (["train-filter", "--out", "f", "--objective", "sequence", "--data", f"{f}/data"], "--data"),
        (["train-filter", "--out", "f", "--objective", "sequence", "--kind", "shared"], "--kind"),
        (["train-filter", "--out", "f", "--objective", "sequence", "--samples", "1"], "--samples"),
        (["train-filter", "--out", "f", "--objective", "sequence", "--gen-length", "200"], "--gen-length"),
        (["train-filter", "--out", "f", "--objective", "sequence", "--init-filter", f"{f}/data"], "--init-filter"),
        (["train-filter", "--out", "f", "--objective", "sequence", "--threshold", "1"], "--threshold"),
        (["train-filter", "--data", f"{f}/data", "--out", "f", "--model", f"{f}/notok"], "--model"),
        (["trace", "--prompt", "hi", "--vs", "strategy=fast"], "--vs"),
        (["--threads", "100000", "demo"], "--threads"),
        (["--threads", "0", "demo"], "--threads"),
    ] + [(["generate", "--prompt", "hi", "--device", d], "--device")
         for d in ("gpu", "tpu", "meta", "cpu:5", "mps", "xla", "cuda:99")]


@pytest.mark.parametrize("case", range(len(_table(""))))
def test_one_line_naming_the_flag_and_nothing_written(case, inputs, capsys, monkeypatch):
    folder, work = inputs
    monkeypatch.chdir(work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answers with or without a GPU
    argv, needle = _table(folder)[case]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("l2pd: error:") and err.count("\n") == 1, err
    assert needle in err, (needle, err)
    assert list(work.iterdir()) == [], argv  # nothing written


def test_trace_png_without_matplotlib_fails_before_decoding(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "--prompt", "hi", "--png", "p.png", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--png needs matplotlib" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_lm_eval_help_without_lm_eval_says_what_to_install(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["lm-eval", "--help"]) == 0
    assert "pip install 'l2pd[eval]'" in capsys.readouterr().out
    assert main(["lm-eval", "--tasks", "x"]) == 2
    assert "pip install 'l2pd[eval]'" in capsys.readouterr().err


def test_prompts_file_with_a_byte_order_mark_is_read(tmp_path):
    from l2pd.files import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_bytes('\ufeff{"prompt": "a"}\n{"prompt": "b"}\n'.encode())
    assert read_prompts(path) == ["a", "b"]


def test_python_m_l2pd_runs_the_command():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "l2pd", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train-filter" in out.stdout


def test_package_attributes_after_import():
    assert callable(l2pd.evaluate) and callable(l2pd.demo.load) and callable(l2pd.trace.trace)
    assert callable(l2pd.collect)


# ---- the Python API ----

@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mask_token_id=10**6), "mask_token_id"),
    (dict(mask_token_id=-1), "mask_token_id"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=10**6), "eos_token_id"),
    (dict(eos_token_id=[EOS, 10**6]), "eos_token_id"),
    (dict(pad_token_id=10**6), "pad_token_id"),
    (dict(attention_mask=[[1, 1, 2]]), "only 0 (padding) and 1"),
    (dict(attention_mask=[[0.5, 1, 1]]), "only 0 (padding) and 1"),
    (dict(attention_mask=[[0, 0, 0]]), "all zeros in row(s) [0]"),
    (dict(filter=42), "filter=42"),
    (dict(max_new_tokens=np.float64(8.0)), "max_new_tokens"),
])
def test_generate_refuses_bad_arguments(tiny, kwargs, needle):
    import re

    with pytest.raises(ValueError, match=re.escape(needle)):
        l2pd.generate(tiny, torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 8, **kwargs})


def test_generate_refuses_meta_and_missing_filters(tiny):
    with pytest.raises(ValueError, match="meta device"):
        l2pd.generate(tiny, torch.ones(1, 3, dtype=torch.long, device="meta"), max_new_tokens=8)
    with pytest.raises(FileNotFoundError, match="no filter.json in 'abc'"):
        l2pd.generate(tiny, torch.tensor([[1, 2, 3]]), max_new_tokens=8, filter="abc")


def test_generate_hugging_face_habits(tiny):
    ids = torch.tensor([[1, 2, 3]])
    want = l2pd.generate(tiny, ids, max_new_tokens=8, block_length=4)
    assert torch.equal(l2pd.generate(tiny, inputs=ids, max_new_tokens=np.int64(8), block_length=np.int32(4)), want)
    assert torch.equal(l2pd.generate(tiny, ids, max_new_tokens=8, block_length=4, eos_token_id=np.int64(EOS)), want)
    with pytest.raises(ValueError, match="not both"):
        l2pd.generate(tiny, ids, inputs=ids)


def test_from_pretrained_takes_dtype(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "m")
    m = l2pd.LLaDAModelLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert m.model.transformer.wte.weight.dtype == torch.bfloat16
    m = l2pd.load_pretrained(str(tmp_path / "m"), dtype="float16")
    assert m.model.transformer.wte.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="disagree"):
        l2pd.LLaDAModelLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, torch_dtype=torch.float16)
    for device in ("gpu", "mps", "cpu:5", "meta"):
        with pytest.raises(ValueError, match="device="):
            l2pd.LLaDAModelLM.from_pretrained(tmp_path / "m", device=device)


def test_patch_keeps_an_attached_filter_and_falls_back_out_loud(tiny):
    flt = l2pd.Filter(block_length=4, hidden=4)
    l2pd.patch(tiny, filter=flt)
    l2pd.patch(tiny)  # re-patching keeps it
    assert tiny.l2pd_filter is flt
    ids = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match="trained for block_length=4, not 8: decoding with strategy='threshold'"):
        out = tiny.generate(ids, max_new_tokens=16, block_length=8)
    assert torch.equal(out, tiny.generate(ids, max_new_tokens=16, block_length=8, strategy="threshold"))
    l2pd.patch(tiny, filter=False)
    assert tiny.l2pd_filter is None
    l2pd.unpatch(tiny)


def test_the_bundled_folder_finds_its_filter_however_it_is_named(tmp_path, monkeypatch):
    import l2pd.demo
    from l2pd.loading import filter_beside as _filter_beside

    rel = os.path.relpath(l2pd.demo.MODEL_DIR)
    (tmp_path / "link").symlink_to(l2pd.demo.MODEL_DIR)
    for spelling in (l2pd.demo.MODEL_DIR, rel, rel + "/", str(tmp_path / "link")):
        assert os.path.samefile(_filter_beside(spelling), l2pd.demo.FILTER_DIR), spelling
    assert _filter_beside(str(tmp_path)) is None


def test_no_filter_is_said_once_on_stderr(tmp_path, capsys):
    import shutil

    import l2pd.demo

    shutil.copytree(l2pd.demo.MODEL_DIR, tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Mia has 4 apples. She gets 3 more. How "
                 "many apples does Mia have now?", "--gen-length", "32", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: no filter for this model") == 1 and "--strategy threshold" in err


def test_lm_eval_model_args_are_checked_before_the_model_loads():
    pytest.importorskip("lm_eval")
    from l2pd.lm_eval_model import L2PDLM

    for args, needle in ((dict(dtype="foo"), "dtype='foo'"), (dict(threshold="x"), "threshold='x'"),
                         (dict(block_length="0"), "block_length='0'"), (dict(mc_num="-1"), "mc_num")):
        with pytest.raises(ValueError, match=needle):
            L2PDLM(device="cpu", **args)


def test_config_json_stays_out_until_the_first_shard(tmp_path):
    """A collection that fails before its first shard leaves a folder the corrected rerun uses."""
    from l2pd.collect import collect

    model = tiny_model(seed=7)  # max_sequence_length 256
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(4)]
    with pytest.raises(ValueError, match="exceeds max_sequence_length"):
        collect(model, prompts, str(tmp_path / "c"), gen_length=400, block_length=4, progress=False)
    assert not (tmp_path / "c" / "collect.json").exists()
    info = collect(model, prompts, str(tmp_path / "c"), gen_length=8, block_length=4, batch_size=3, progress=False)
    assert info["shard_size"] == 3 and info["shards"] == 2 == info["shards_done"]  # default: one batch per shard
    assert json.loads((tmp_path / "c" / "collect.json").read_text())["gen_length"] == 8
    # resuming without --shard-size keeps the folder's, whatever the batch size now
    assert collect(model, prompts, str(tmp_path / "c"), gen_length=8, block_length=4, batch_size=2,
                   progress=False)["shards_written_here"] == 0


def test_a_second_collection_into_one_folder_is_refused(tmp_path):
    import fcntl

    from l2pd.collect import collect

    model = tiny_model(seed=7)
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(2)]
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / ".collect.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12345")
        held.flush()
        with pytest.raises(ValueError, match=r"being written by another collection \(pid 12345\)"):
            collect(model, prompts, str(tmp_path / "c"), gen_length=8, block_length=4, progress=False)
    assert collect(model, prompts, str(tmp_path / "c"), gen_length=8, block_length=4,
                   progress=False)["shards_done"] == 1


def test_ctrl_c_in_collect_says_what_was_kept(tmp_path, capsys, monkeypatch):
    col = sys.modules["l2pd.collect"]  # the module: `l2pd.collect` is the function
    real, calls = col.replay, []

    def replay_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(col, "replay", replay_then_interrupt)
    out = tmp_path / "c"
    argv = ["collect", "--out", str(out), "--num-prompts", "3", "--batch-size", "1", "--gen-length", "8",
            "--block-length", "8", "--device", "cpu"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # the progress bar's line is closed first; then one line
    assert last.startswith("l2pd: interrupted: collect stopped; 1 finished shard(s) kept") and "rerun the same" in last
    monkeypatch.setattr(col, "replay", real)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["shards_written_here"] == 2


def test_sweep_refuses_rows_of_another_sweep(tmp_path, monkeypatch):
    import l2pd.sweep as sw

    def fake_evaluate(model, tok, problems, **kw):
        return dict(problems=len(problems), accuracy=0.5, mean_nfe=3.0, tokens_per_s=1.0, seconds=0.1)

    monkeypatch.setattr(sw, "evaluate", fake_evaluate)
    model = tiny_model(seed=1)
    out = str(tmp_path / "rows.jsonl")
    configs = sw.grid(["threshold"], [0.9], ["accepted"], [32], ["none"])
    three, fifty = [sw.Item(f"q{i}", i) for i in range(3)], [sw.Item(f"q{i}", i) for i in range(50)]
    sw.sweep(model, None, three, configs, out=out, progress=False)
    for problems, kw, needle in ((fifty, {}, "problems 3 -> 50"), (three, dict(max_new_tokens=64), "max_new_tokens"),
                                 ([sw.Item("other", 1)] * 3, {}, "problems_sha256")):
        with pytest.raises(ValueError, match=needle):
            sw.sweep(model, None, problems, configs, out=out, progress=False, **kw)
    with pytest.raises(ValueError, match="model_fingerprint"):
        sw.sweep(tiny_model(seed=2), None, three, configs, out=out, progress=False)
    rows = sw.sweep(model, None, fifty, configs, out=out, progress=False, resume=False)
    assert [r["problems"] for r in rows] == [50] and len(open(out).read().splitlines()) == 1
    assert "problems" in sw.format_rows(rows).splitlines()[0]
    with open(out, "w") as f:  # rows written before they recorded their settings
        f.write(json.dumps({k: v for k, v in rows[0].items() if k != "settings"}) + "\n")
    with pytest.raises(ValueError, match="do not record their settings"):
        sw.sweep(model, None, fifty, configs, out=out, progress=False)


def test_training_that_diverges_says_so(tmp_path):
    from l2pd.collect import collect
    from l2pd.train import train_filter

    model = tiny_model(seed=7)
    prompts = [torch.randint(0, 58, (5,)).tolist() for _ in range(6)]
    collect(model, prompts, str(tmp_path / "d"), gen_length=8, block_length=4, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="training diverged"):
        train_filter(str(tmp_path / "d"), hidden=8, max_epochs=5, lr=1e30, log=lambda *a: None)

