"""What the commands share: argument groups, the default strategy, notes on stderr, Ctrl-C with what was kept."""

from __future__ import annotations

import argparse
import sys

from ..args import device_type, float_type, int_type


def add_decode_args(p: argparse.ArgumentParser, gen_length: int = 256, filter_block: bool = False) -> None:
    p.add_argument("--gen-length", type=int_type(1), default=gen_length,
                   help=f"new tokens per answer (default {gen_length})")
    if filter_block:
        p.add_argument("--block-length", type=int_type(1), default=None,
                       help="semi-autoregressive block size (default: the filter's block length for learn2pd, the "
                            "tuned default's for it, and the filter's for every row of the demo; else 32)")
    else:
        p.add_argument("--block-length", type=int_type(1), default=32,
                       help="semi-autoregressive block size (default 32)")
    add_device_arg(p)


def add_device_arg(p: argparse.ArgumentParser, default: str = "cuda when available") -> None:
    p.add_argument("--device", type=device_type, default=None, help=f"cpu, cuda or cuda:N (default: {default})")


def add_family_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-family", choices=["llada", "dream", "llada2"], default=None,
                   help="which bundled model to use when --model is not given: LLaDA's format (default), "
                        "Dream's (shifted logits, grouped-query attention, biased q/k/v) or LLaDA 2.x's "
                        "(mixture of experts, block-causal attention: the decoding block is its attention block)")
    p.add_argument("--weights", choices=["native", "fp8", "w8a8"], default="native",
                   help="fp8: the decoder's linear layers (a mixture of experts' routed experts too) as e4m3 "
                        "with per-channel scales (l2pd.quantize): half the memory, not faster; w8a8: also their "
                        "inputs as e4m3, one scale per token (FP8 tensor cores: the fast form); native: as loaded "
                        "(default)")
    p.add_argument("--kv-cache", choices=["native", "fp8"], default="native",
                   help="fp8: the decode's K/V cache in e4m3, one scale per cached head (l2pd.quantize(model, "
                        "kv_cache='fp8')): half the K/V memory, not faster (on an H200 6%% to 13%% slower per "
                        "forward); native: the model's dtype (default)")


def add_level_arg(p: argparse.ArgumentParser, which: str) -> None:
    p.add_argument("--level", choices=["base", "hard"], default="base",
                   help=f"the bundled task's level for the {which}: base (1 to 4 steps, what the bundled models "
                        "are trained on) or hard (5 or 6 steps; for a model trained with "
                        "`python -m l2pd.demo.train_model --hard-fraction ...`; the bundled models fail it)")


def level_split(args: argparse.Namespace, part: str) -> str:
    """The task split of ``part`` ('train' or 'test') at ``--level``; --data and --prompts bring their own."""
    level = getattr(args, "level", "base")
    if level != "base" and (getattr(args, "data", None) or getattr(args, "prompts", None)):
        raise ValueError("--level picks the bundled task's problems; leave it out with --data or --prompts")
    return part if level == "base" else f"{level}-{part}"


def add_strategy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=["steps", "threshold", "margin", "persistence", "learn2pd"], default=None,
                   help="unmasking rule (default: the one tuned with the model's filter (l2pd tune --rules), learn2pd "
                        "for a filter tuned alone, threshold without a filter); margin: "
                        "top-1 minus top-2 probability > tau; persistence: the guess unchanged for --persist "
                        "forwards with confidence > tau")
    p.add_argument("--persist", type=int_type(1), default=None,
                   help="persistence: forwards a guess must stay the same (default 2)")
    p.add_argument("--threshold", type=float_type(0), default=None,
                   help="tau: for threshold (default 0.9, or the tuned default's) the confidence, for learn2pd "
                        "(default: the filter's) the filter's probability; above 1 nothing passes (one token per "
                        "step / schedule only)")
    p.add_argument("--eotp", choices=["off", "accepted", "predicted"], default=None,
                   help="end-of-text prediction: stop once an end-of-text token is accepted (accepted) or "
                        "confidently predicted (predicted); default: the filter's stored mode for learn2pd and the "
                        "tuned default, else off")
    p.add_argument("--cache", choices=["none", "prefix", "dual"], default="none", help="block KV cache mode")
    p.add_argument("--refresh", choices=["full", "tail", "window"], default="full",
                   help="what a cache recomputes at each block start: the whole canvas (full), from the block "
                        "just finished to the end (tail), or (dual) that block and the new one (window)")
    p.add_argument("--filter", default=None,
                   help="filter folder (default: filter.json beside --model or in its filter/ subfolder; for "
                        "the bundled model, its filter)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a filter recorded for another model (its fingerprint differs)")


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def default_strategy(args: argparse.Namespace, model, quiet: bool = False) -> None:
    """Without --strategy: the default decoding stored with the model's filter (``l2pd tune --rules``);
    learn2pd when the filter has none and fits --block-length; else threshold, said once on stderr."""
    if args.strategy is not None:
        return
    flt = getattr(model, "l2pd_filter", None)
    say = (lambda text: None) if quiet else note
    from ..spec import default_decoding, stored_default

    default = stored_default(flt)
    if default is not None and default["strategy"] != "learn2pd":  # l2pd.spec fills in its settings

        what = default_decoding(flt, args.block_length, args.threshold, args.eotp, args.persist)
        say(f"decoding with this model's tuned default, {what} (chosen over its filter on validation problems; "
            "--strategy learn2pd decodes with the filter)")
        return
    if flt is None:
        say("no filter for this model (none with --filter, none beside --model): decoding with --strategy "
            "threshold")
        args.strategy = "threshold"
    elif args.block_length is not None and args.block_length != flt.block_length:
        say(f"the filter was trained for block length {flt.block_length}, not --block-length "
             f"{args.block_length}: decoding with --strategy threshold")
        args.strategy = "threshold"


class Interrupted(Exception):
    """Ctrl-C, with what the command kept."""
