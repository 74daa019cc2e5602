"""`demo`, `generate` and `eval`: decoding with the bundled model or a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..args import float_type, int_type
from ..loading import default_device, load_model
from .common import (
    add_decode_args,
    add_family_arg,
    add_level_arg,
    add_strategy_args,
    default_strategy,
    level_split,
    note,
)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.task import split
    from ..evaluate import compare_configs, demo_strategies, format_table

    device = default_device(args.device)
    n = args.problems if args.problems is not None else (200 if device.startswith("cuda") else 3)
    batch = args.batch_size if args.batch_size is not None else (n if device.startswith("cuda") else 1)
    model, tok = load_model(None, device, args.filter, family=args.model_family, weights=args.weights,
                            kv_cache=args.kv_cache)
    flt = model.l2pd_filter
    block = args.block_length if args.block_length is not None else (flt.block_length if flt is not None else 32)
    if flt is None:
        note("no filter found; the learn2pd rows are skipped")
    elif flt.block_length != block:
        print(f"note: the filter was trained for block length {flt.block_length}, not {block}; the "
              "learn2pd rows are skipped (train one with `l2pd collect` and `l2pd train-filter` at this block "
              "length, then pass --filter)", file=sys.stderr)
    print(f"bundled {args.model_family or 'llada'} model, {n} held-out problems, gen length {args.gen_length}, "
          f"block {block}, greedy, batch {batch}, {device}", file=sys.stderr)
    rows = compare_configs(model, tok, split("test", n), args.gen_length, block, batch,
                           strategies=demo_strategies(flt), progress=not args.json)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        print("NFE x / wall x: speedup over `steps` without a cache (forwards per answer / wall time)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..demo.tokenizer import prompt_text

    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    device = default_device(args.device)
    model, tok = load_model(args.model, device, args.filter, args.allow_other_model, args.model_family,
                            weights=args.weights, kv_cache=args.kv_cache)
    default_strategy(args, model)
    ids = tok(prompt_text(tok, args.prompt), add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=args.gen_length, block_length=args.block_length,
                         strategy=args.strategy, threshold=args.threshold, eotp=args.eotp, cache=args.cache,
                         refresh=args.refresh, temperature=args.temperature, seed=args.seed,
                         persist=args.persist, return_dict_in_generate=True)
    print(tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True))
    print(f"[{int(out.nfe[0])} forwards, {out.seconds:.2f} s]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..demo.task import split
    from ..distributed import finish, init_from_env
    from ..evaluate import evaluate

    rank, _, rank_device = init_from_env()
    device = rank_device or default_device(args.device)
    problems = split(level_split(args, "test"), args.problems)
    model, tok = load_model(args.model, device, args.filter, args.allow_other_model, args.model_family,
                            weights=args.weights, kv_cache=args.kv_cache)
    default_strategy(args, model, quiet=rank != 0)
    r = evaluate(model, tok, problems, batch_size=args.batch_size, progress=not args.json,
                 max_new_tokens=args.gen_length, block_length=args.block_length, strategy=args.strategy,
                 threshold=args.threshold, eotp=args.eotp, cache=args.cache, refresh=args.refresh,
                 temperature=args.temperature, seed=args.seed, persist=args.persist)
    for key in ("texts", "nfe"):
        r.pop(key)
    finish()
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(r))
    else:
        print(f"accuracy {100 * r['accuracy']:.1f}% on {r['problems']} problems, mean forwards per answer "
              f"{r['mean_nfe']:.1f}, {r['tokens_per_s']:.1f} answer tokens/s ({r['seconds']:.1f} s)")
    return 0


def add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="speed/quality table of every decoding configuration on the bundled model")
    d.add_argument("--problems", type=int_type(1), default=None,
                   help="held-out problems (default 3 on CPU, 200 on GPU)")
    d.add_argument("--batch-size", type=int_type(1), default=None,
                   help="default 1 on CPU, all problems at once on GPU")
    d.add_argument("--filter", default=None, help="filter folder (default: the bundled one)")
    add_family_arg(d)
    d.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_decode_args(d, filter_block=True)
    d.set_defaults(func=cmd_demo)


def add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="answer one prompt")
    g.add_argument("--model", default=None, help="folder with config.json, safetensors and tokenizer files")
    add_family_arg(g)
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--temperature", type=float_type(0), default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int_type(0), default=None, help="fixes the samples when --temperature > 0")
    add_decode_args(g, filter_block=True)
    add_strategy_args(g)
    g.set_defaults(func=cmd_generate)


def add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="held-out accuracy, forwards per answer and tokens/s of one configuration "
                       "(data-parallel under torchrun)")
    e.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_family_arg(e)
    e.add_argument("--problems", type=int_type(1), default=100, help="held-out problems (default 100)")
    add_level_arg(e, "held-out problems")
    e.add_argument("--batch-size", type=int_type(1), default=1)
    e.add_argument("--json", action="store_true", help="print the figures as JSON")
    e.add_argument("--temperature", type=float_type(0), default=0.0, help="0 = greedy")
    e.add_argument("--seed", type=int_type(0), default=None, help="fixes the samples when --temperature > 0")
    add_decode_args(e, filter_block=True)
    add_strategy_args(e)
    e.set_defaults(func=cmd_eval)
