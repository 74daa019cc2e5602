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


def test_generate_answers_on_the_bundled_model(capsys):
    assert main(["generate", "--prompt", "Mia has 45 apples. She gets 17 more apples at the market. How many "
                 "apples does Mia have now?", "--eotp", "accepted", "--cache", "dual", "--device", "cpu"]) == 0
    assert "#### 62" in capsys.readouterr().out
