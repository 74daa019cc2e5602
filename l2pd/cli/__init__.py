"""The ``l2pd`` command: one module per group of commands, each command a function and a parser adder;
``build_parser`` reads the table ``COMMANDS``."""

from __future__ import annotations

import sys

from ..args import Parser, threads_type
from . import filters, lm_eval, run, serve, sweeps, trace
from .common import Interrupted

# (adder of the command's parser, which sets its function): the order of `l2pd --help`
COMMANDS = (run.add_demo, run.add_generate, run.add_eval, filters.add_collect, filters.add_train_filter,
            sweeps.add_sweep, sweeps.add_tune, trace.add_trace, serve.add_serve, lm_eval.add_lm_eval)


def build_parser() -> Parser:
    parser = Parser(
        prog="l2pd",
        description="Fast parallel decoding for diffusion language models (LLaDA, Dream): a learned unmasking "
        "filter (Learn2PD), end-of-text prediction (EoTP) and a block KV cache. Without --model, commands "
        "use the bundled small model trained on grade-school word problems (LLaDA format; --model-family "
        "dream or llada2 for the Dream- or LLaDA 2.x-format one).",
    )
    parser.add_argument("--threads", type=threads_type, default=None,
                        help="CPU threads torch may use (default: OMP_NUM_THREADS, else all cores); on a shared "
                             "machine give the cores you have to yourself, or a busy neighbour slows every "
                             "step many times over")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input ends in one line on stderr and exit status 2, Ctrl-C in one line and 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # lm-eval's arguments pass through untouched (argparse would read its --options as ours)
    cut = argv.index("lm-eval") + 1 if "lm-eval" in argv else len(argv)
    try:
        args = build_parser().parse_args(argv[:cut])
    except SystemExit as exc:  # --help (0) or a bad argument (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "lm-eval":
        args.lm_eval_args = argv[cut:]
    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except (ValueError, OSError) as exc:
        _say(f"l2pd: error: {exc}")
        return 2
    except Interrupted as exc:
        _say(f"l2pd: interrupted: {exc}")
        return 130
    except KeyboardInterrupt:
        _say("l2pd: interrupted")
        return 130


def _say(line: str) -> None:
    """One line on stderr, on a line of its own even when a progress bar was drawing."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print(" ".join(line.split("\n")), file=sys.stderr)
