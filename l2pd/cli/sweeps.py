"""`sweep` and `tune`: the accuracy / forwards frontier, and a filter's operating point."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..args import choices_type, float_type, int_type, list_type, needs_matplotlib
from ..loading import default_device, load_model
from .common import (
    Interrupted,
    add_device_arg,
    add_family_arg,
    add_level_arg,
    level_split,
)


def _sweep_problems(args: argparse.Namespace, validation: bool = False):
    from ..demo.task import split
    from ..sweep import VAL_OFFSET, load_problems

    train_split, test_split = level_split(args, "train"), level_split(args, "test")
    if args.data:
        return load_problems(args.data)[: args.problems]
    if validation:
        return split(train_split, args.problems, offset=VAL_OFFSET)
    return split(test_split, args.problems)


def _block_filters(specs: list[str] | None) -> dict[int, str]:
    """``--filters 64=runs/f64 ...`` as {block length: folder}, each folder checked."""
    out = {}
    for spec in specs or []:
        block, sep, folder = spec.partition("=")
        if not sep or not block.strip().isdigit() or int(block) < 1 or not folder:
            raise ValueError(f"--filters {spec}: expected BLOCK=FOLDER, e.g. 64=runs/filter64")
        if not os.path.isfile(os.path.join(folder, "filter.json")):
            raise FileNotFoundError(f"--filters {spec}: no filter.json in {folder}")
        out[int(block)] = folder
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..files import check_out_file
    from ..filter import Filter
    from ..sweep import format_rows, grid, plot, sweep

    if args.out:
        check_out_file(args.out, flag="--out")
    if args.plot:
        check_out_file(args.plot, flag="--plot")
        needs_matplotlib("--plot")
    folders = _block_filters(args.filters)
    problems = _sweep_problems(args)
    filters = {block: Filter.from_pretrained(folder) for block, folder in folders.items()}
    model, tok = load_model(args.model, default_device(args.device), args.filter, args.allow_other_model,
                            args.model_family, weights=args.weights, kv_cache=args.kv_cache)
    for flt in filters.values():
        flt.check_model(model, allow_other_model=args.allow_other_model)
    configs = grid(args.strategies, args.taus, args.eotp, args.blocks, args.caches, args.persist)
    try:
        rows = sweep(model, tok, problems, configs, out=args.out, filters=filters, batch_size=args.batch_size,
                     max_new_tokens=args.gen_length, checker=args.checker, progress=not args.json,
                     log=lambda m: print(m, file=sys.stderr), resume=not args.overwrite)
    except KeyboardInterrupt:
        kept = f"the finished rows are kept in {args.out}: rerun the same command to resume" if args.out else \
            "nothing kept (give --out to keep finished rows)"
        raise Interrupted(f"sweep stopped; {kept}") from None
    if args.out:
        with open(args.out, "w") as f:  # rewritten with the frontier marks
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.plot and rows:
        plot(rows, args.plot)
    if args.json:  # each row also carries its rule's AUP
        print(json.dumps(rows, indent=1))
    else:
        from ..sweep import format_aup

        print(format_rows(rows))
        print(format_aup(rows))
        picks = format_picks(rows, args.budget)
        if picks:
            print(picks)
    return 0


def format_picks(rows: list[dict], budget: float) -> str:
    """The stated rule's pick per rule (``l2pd.sweep.choose``), when the sweep has `steps` and other rows."""
    from ..sweep import choose

    if not any(r["strategy"] == "steps" for r in rows) or all(r["strategy"] == "steps" for r in rows):
        return ""
    picks = choose(rows, budget)
    lines = [f"fewest forwards within {budget:g} points of the best `steps` "
             f"({100 * picks['overall']['steps_accuracy']:.1f}%), per rule (as `l2pd tune --rules` picks):"]
    lines += [_pick_line(name, r) for name, r in picks.items()]
    return "\n".join(lines)


def _pick_line(name: str, r: dict) -> str:
    """One rule's pick (a row of ``l2pd.sweep.choose``, or as ``tune`` stores it) in one line."""
    mark = "" if r["within_budget"] else "  (none within: its most accurate)"
    cache = f", {r['cache']}" if r.get("cache") else ""
    return (f"  {name:<14}tau {r['threshold']:g}, block {r['block_length']}{cache}: {100 * r['accuracy']:.1f}% at "
            f"{r['mean_nfe']:.2f} forwards{mark}")


def cmd_tune(args: argparse.Namespace) -> int:
    from ..files import check_out_dir, check_out_file
    from ..filter import Filter
    from ..spec import default_decoding
    from ..sweep import tune

    folder = args.filter
    flt = Filter.from_pretrained(folder)
    out = args.out or folder
    check_out_dir(out)
    if args.rows:
        check_out_file(args.rows, flag="--rows")
    problems = _sweep_problems(args, validation=True)
    model, tok = load_model(args.model, default_device(args.device), None, family=args.model_family,
                            weights=args.weights, kv_cache=args.kv_cache)
    flt.check_model(model, allow_other_model=args.allow_other_model)
    point = tune(model, tok, flt, problems, args.taus, eotp=args.eotp, budget=args.budget, cache=args.cache,
                 batch_size=args.batch_size, max_new_tokens=args.gen_length, checker=args.checker, progress=True,
                 rules=args.rules or [], blocks=args.blocks or [], persists=args.persist, out=args.rows)
    flt.save_pretrained(out)
    print(f"steps: {100 * point['steps_accuracy']:.1f}%; {point['rule']}:")
    for name, r in point["picks"].items():
        print(_pick_line(name, r))
    print(f"default decoding: {default_decoding(flt)}; the filter's tau {point['tau']:g}; saved to {out}/filter.json")
    return 0


def add_sweep(sub: Any) -> None:
    w = sub.add_parser("sweep", help="accuracy / forwards frontier over strategies, taus, EoTP modes, block "
                       "lengths and caches (resumable JSONL, optional PNG)")
    w.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_family_arg(w)
    w.add_argument("--data", default=None, help='JSONL of {"prompt": ..., "answer": ...} (default: the bundled '
                   "task's held-out problems)")
    w.add_argument("--checker", default="hash-number", help="how an answer is scored: hash-number (the integer "
                   "after ####), last-number, exact, contains")
    w.add_argument("--problems", type=int_type(1), default=200, help="problems (default 200)")
    add_level_arg(w, "held-out problems")
    w.add_argument("--batch-size", type=int_type(1), default=1)
    w.add_argument("--strategies", type=choices_type(("steps", "threshold", "margin", "persistence", "learn2pd")),
                   default="steps,threshold,learn2pd", help="comma-separated, from steps, threshold, margin, "
                   "persistence, learn2pd (default steps,threshold,learn2pd)")
    w.add_argument("--persist", type=list_type(int_type(1)), default="2,3",
                   help="run lengths of the persistence rule (comma-separated, default 2,3)")
    w.add_argument("--taus", type=list_type(float_type(0)), default="0.9,0.99,0.995,0.999",
                   help="taus of threshold and learn2pd (comma-separated)")
    w.add_argument("--eotp", type=choices_type(("off", "accepted", "predicted")), default="off,accepted",
                   help="EoTP modes (comma-separated)")
    w.add_argument("--blocks", type=list_type(int_type(1)), default="32", help="block lengths (comma-separated)")
    w.add_argument("--caches", type=choices_type(("none", "prefix", "dual")), default="none",
                   help="cache modes (comma-separated)")
    w.add_argument("--filter", default=None, help="filter folder (default: the model's)")
    w.add_argument("--filters", nargs="*", help="BLOCK=FOLDER: a filter per block length for learn2pd")
    w.add_argument("--allow-other-model", action="store_true")
    w.add_argument("--out", default=None, help="JSONL rows; a rerun of the same sweep (same problems, model, "
                   "length, checker) skips the configurations done, another sweep's rows are refused")
    w.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming it")
    w.add_argument("--plot", default=None, help="PNG of accuracy against forwards (pip install 'l2pd[plot]')")
    w.add_argument("--json", action="store_true", help="print the rows as JSON")
    w.add_argument("--gen-length", type=int_type(1), default=256, help="new tokens per answer (default 256)")
    w.add_argument("--budget", type=float_type(0, 100), default=0.5,
                   help="for the picks printed under the table: accuracy points below the best `steps` row "
                   "allowed (default 0.5; the rule of `l2pd tune`)")
    add_device_arg(w)
    w.set_defaults(func=cmd_sweep)


def add_tune(sub: Any) -> None:
    u = sub.add_parser("tune", help="choose a filter's tau (its operating point), and with --rules the model's "
                       "default decoding among the filter and the training-free rules, on validation problems; "
                       "stored in filter.json")
    u.add_argument("--filter", required=True, help="filter folder")
    u.add_argument("--out", default=None, help="where the tuned filter goes (default: over --filter)")
    u.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_family_arg(u)
    u.add_argument("--data", default=None, help='JSONL of {"prompt": ..., "answer": ...} validation problems '
                   "(default: the bundled task's validation problems, unseen in training and in eval)")
    u.add_argument("--checker", default="hash-number")
    u.add_argument("--problems", type=int_type(1), default=200, help="validation problems (default 200)")
    add_level_arg(u, "validation problems")
    u.add_argument("--batch-size", type=int_type(1), default=1)
    u.add_argument("--taus", type=list_type(float_type(0)), default="0.9,0.95,0.98,0.99,0.995,0.998,0.999",
                   help="candidate taus (comma-separated)")
    u.add_argument("--eotp", choices=["off", "accepted", "predicted"], default="accepted")
    u.add_argument("--budget", type=float_type(0, 100), default=0.5,
                   help="accuracy points below `steps` allowed (default 0.5)")
    u.add_argument("--cache", choices=["none", "prefix", "dual"], default="none")
    u.add_argument("--rules", type=choices_type(("threshold", "margin", "persistence")), default=None,
                   help="training-free rules to tune beside the filter (comma-separated, from threshold, margin, "
                   "persistence); the one that needs the fewest forwards within the budget, the filter included, "
                   "becomes the model's default decoding (default: none, the filter alone)")
    u.add_argument("--blocks", type=list_type(int_type(1)), default=None,
                   help="block lengths for the rules and `steps` (comma-separated; default: the filter's)")
    u.add_argument("--persist", type=list_type(int_type(1)), default="2",
                   help="run lengths of the persistence rule (comma-separated, default 2)")
    u.add_argument("--rows", default=None, help="JSONL that keeps every decoded row; a rerun over the same "
                   "problems resumes from it (rows of `l2pd sweep` over the same problems count)")
    u.add_argument("--allow-other-model", action="store_true")
    u.add_argument("--gen-length", type=int_type(1), default=256, help="new tokens per answer (default 256)")
    add_device_arg(u)
    u.set_defaults(func=cmd_tune)
