"""`trace`: one decode, forward by forward, as an HTML page."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..args import needs_matplotlib
from ..loading import default_device, load_model
from .common import (
    add_decode_args,
    add_family_arg,
    add_strategy_args,
    default_strategy,
)


def _spec(text: str) -> dict:
    """``key=value,...`` decode settings for ``--vs`` (numbers parsed, the rest kept as strings)."""
    out: dict = {}
    for part in (p for p in text.split(",") if p.strip()):
        if "=" not in part:
            raise ValueError(f"--vs {text!r}: expected key=value pairs, e.g. strategy=threshold,threshold=0.9")
        k, v = (x.strip() for x in part.split("=", 1))
        if k not in ("strategy", "threshold", "eotp", "cache", "refresh", "block_length", "steps"):
            raise ValueError(f"--vs: {k!r} is not a decode setting (strategy, threshold, eotp, cache, refresh, "
                             "block_length, steps)")
        try:
            out[k] = int(v) if k in ("block_length", "steps") else float(v) if k == "threshold" else v
        except ValueError:
            raise ValueError(f"--vs: {k}={v!r} is not a number") from None
        allowed = _vs_choices().get(k)
        if allowed and v not in allowed:
            raise ValueError(f"--vs: {k}={v!r}: expected one of {', '.join(allowed)}")
        if k in ("block_length", "steps") and out[k] < 1 or k == "threshold" and not 0 <= out[k] < float("inf"):
            raise ValueError(f"--vs: {k}={v!r} is out of range")
    return out


def _vs_choices() -> dict[str, tuple[str, ...]]:
    from ..cache import CACHE_MODES, REFRESH_MODES
    from ..spec import EOTP_MODES, STRATEGIES

    return {"strategy": tuple(s for s in STRATEGIES if s != "oracle"), "eotp": EOTP_MODES, "cache": CACHE_MODES,
            "refresh": REFRESH_MODES}


def cmd_trace(args: argparse.Namespace) -> int:
    from ..files import check_out_file
    from ..trace import trace, write_html, write_png

    json_path = args.json_out or os.path.splitext(args.out)[0] + ".json"
    for flag, path in (("--out", args.out), ("--json-out", json_path), ("--png", args.png)):
        if path:
            check_out_file(path, flag=flag)
    if args.png:
        needs_matplotlib("--png")
    vs = _spec(args.vs) if args.vs else None
    model, tok = load_model(args.model, default_device(args.device), args.filter, args.allow_other_model,
                            args.model_family, weights=args.weights, kv_cache=args.kv_cache)
    default_strategy(args, model)
    base = {k: v for k, v in dict(strategy=args.strategy, threshold=args.threshold, eotp=args.eotp,
                                  cache=args.cache, refresh=args.refresh, block_length=args.block_length,
                                  persist=args.persist).items()
            if v is not None}
    configs = [base] + ([{**base, **vs}] if vs else [])
    records = [trace(model, tok, args.prompt, max_new_tokens=args.gen_length, **c) for c in configs]
    for path in (args.out, json_path, args.png):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_html(records, args.out)
    with open(json_path, "w") as f:
        json.dump(records, f)
    if args.png:
        write_png(records, args.png)
    for r in records:
        from ..trace import label

        print(f"{label(r)}: {r['forwards']} forwards, {r['seconds']:.2f} s: {r['answer_text']!r}")
    print(f"wrote {args.out} and {json_path}" + (f" and {args.png}" if args.png else ""))
    return 0


def add_trace(sub: Any) -> None:
    r = sub.add_parser("trace", help="record one decode forward by forward and draw it as a self-contained "
                       "HTML page (and JSON, optionally a PNG)")
    r.add_argument("--prompt", required=True, help="the user message")
    r.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_family_arg(r)
    r.add_argument("--out", default="trace.html", help="the page (default trace.html); the JSON goes beside it")
    r.add_argument("--json-out", default=None, help="where the JSON goes (default: --out with .json)")
    r.add_argument("--png", default=None, help="a summary picture (pip install 'l2pd[plot]')")
    r.add_argument("--vs", default=None, help="a second configuration drawn beside the first, as changes to it: "
                   "e.g. strategy=threshold,threshold=0.9,eotp=off")
    add_decode_args(r, filter_block=True)
    add_strategy_args(r)
    r.set_defaults(func=cmd_trace)
