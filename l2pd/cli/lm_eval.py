"""`lm-eval`: lm-evaluation-harness with the l2pd model registered."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import importlib.util

    installed = importlib.util.find_spec("lm_eval") is not None
    rest = args.lm_eval_args
    if not rest or rest in (["-h"], ["--help"]):
        print(LM_EVAL_HELP)
        if not installed:
            print("\nlm-evaluation-harness is not installed here: pip install 'l2pd[eval]' (or pip install lm-eval)")
        return 0
    if not installed:
        raise ValueError("`l2pd lm-eval` needs lm-evaluation-harness: pip install 'l2pd[eval]'")
    from .. import lm_eval_model

    return lm_eval_model.cli(rest)


LM_EVAL_HELP = """usage: l2pd lm-eval [lm-eval arguments]

lm-evaluation-harness's command line with l2pd's model registered as `l2pd` and the bundled task
`l2pd_word_problems` on the include path (pip install 'l2pd[eval]'). Example, offline on the bundled model:

  l2pd lm-eval --model l2pd --model_args strategy=learn2pd,cache=dual --tasks l2pd_word_problems \
      --apply_chat_template --limit 3

model_args: pretrained=FOLDER (default: the bundled model), filter=FOLDER, allow_other_model=true,
strategy, threshold, eotp, cache, refresh, block_length, max_new_tokens, mc_num (Monte-Carlo draws for
loglikelihood, 128), mc_batch, seed, dtype; lm-eval's --batch_size and --device apply. After lm-eval's
table, l2pd prints forwards per answer and answer tokens/s. Every other argument is lm-eval's
(`lm-eval run --help`)."""


def add_lm_eval(sub: Any) -> None:
    m = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the l2pd model registered "
                       "(pip install 'l2pd[eval]'; `l2pd lm-eval --help`)")
    m.set_defaults(func=cmd_lm_eval)
