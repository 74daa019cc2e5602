import pytest

from l2pd.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "generate", "eval", "collect", "train-filter"):
        assert cmd in out


@pytest.mark.parametrize("argv", [["eval", "--problems", "0"], ["demo", "--problems", "0"],
                                  ["generate", "--prompt", "hi", "--block-length", "0"],
                                  ["train-filter", "--data", "/nonexistent", "--out", "/tmp/x"]])
def test_bad_arguments_exit_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    assert "l2pd: error:" in capsys.readouterr().err


@pytest.mark.parametrize("kv_cache", ["native", "fp8"])
def test_generate_answers_on_the_bundled_model(capsys, kv_cache):
    assert main(["generate", "--prompt", "Mia has 45 apples. She gets 17 more apples at the market. How many "
                 "apples does Mia have now?", "--eotp", "accepted", "--cache", "dual", "--device", "cpu",
                 "--kv-cache", kv_cache]) == 0
    out = capsys.readouterr()
    assert "#### 62" in out.out
    # the bundled filter stores a training-free rule as the model's default, and the command says which
    assert "decoding with this model's tuned default, threshold (tau 0.985, block 128, EoTP accepted)" in out.err


def _bundled_copy(tmp_path, with_filter: bool):
    import shutil

    import l2pd.demo

    folder = tmp_path / "model"
    shutil.copytree(l2pd.demo.MODEL_DIR, folder)
    if with_filter:
        shutil.copytree(l2pd.demo.FILTER_DIR, folder / "filter")
    return folder


def test_eval_with_a_filter_through_the_cli(capsys, tmp_path):
    import json

    import l2pd.demo

    argv = ["eval", "--problems", "2", "--strategy", "learn2pd", "--eotp", "accepted", "--json", "--device", "cpu"]
    assert main(argv + ["--filter", l2pd.demo.FILTER_DIR]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["problems"] == 2 and r["mean_nfe"] < 64  # learn2pd + EoTP: far fewer than 256 forwards
    # a filter stored beside --model is found without --filter
    folder = _bundled_copy(tmp_path, with_filter=True)
    assert main(argv + ["--model", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["mean_nfe"] == r["mean_nfe"]
    # no filter anywhere: a clear error, not a silent switch to another strategy
    bare = _bundled_copy(tmp_path / "bare", with_filter=False)
    assert main(argv + ["--model", str(bare)]) == 2
    assert "needs a filter" in capsys.readouterr().err


def test_filter_for_another_model_needs_the_override(capsys, tmp_path):
    import json

    folder = _bundled_copy(tmp_path, with_filter=True)
    info = json.loads((folder / "filter" / "filter.json").read_text())
    info["model_fingerprint"] = "0000000000000000"
    (folder / "filter" / "filter.json").write_text(json.dumps(info))
    argv = ["eval", "--problems", "1", "--model", str(folder), "--json", "--device", "cpu"]
    assert main(argv) == 2
    assert "--allow-other-model" in capsys.readouterr().err
    assert main(argv + ["--allow-other-model"]) == 0


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--prompt", "hi", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
