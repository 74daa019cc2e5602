"""`collect` and `train-filter`: trajectories for a Learn2PD filter, and the filter."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..args import float_type, int_type
from ..loading import default_device, load_model
from .common import (
    Interrupted,
    add_decode_args,
    add_device_arg,
    add_family_arg,
    add_level_arg,
    level_split,
)


def cmd_collect(args: argparse.Namespace) -> int:
    from ..collect import collect, shards_in
    from ..demo.task import split
    from ..demo.tokenizer import prompt_text
    from ..distributed import finish, init_from_env
    from ..files import check_out_dir, read_prompts

    if args.policy.startswith("learn2pd") != (args.policy_filter is not None):
        raise ValueError("--policy learn2pd:TAU decodes with --policy-filter DIR, and only it takes one")
    if args.policy_filter is not None and not os.path.isfile(os.path.join(args.policy_filter, "filter.json")):
        raise FileNotFoundError(f"--policy-filter {args.policy_filter!r}: no filter.json there")
    rank, _, rank_device = init_from_env()
    device = rank_device or default_device(args.device)
    check_out_dir(args.out)  # before the model loads: an unwritable --out fails now
    train_split = level_split(args, "train")
    if args.prompts:
        questions = read_prompts(args.prompts)
    else:
        questions = [p.question for p in split(train_split, args.num_prompts)]
    model, tok = load_model(args.model, device, family=args.model_family, weights=args.weights, kv_cache=args.kv_cache)
    prompts = tok([prompt_text(tok, q) for q in questions], add_special_tokens=False).input_ids
    try:
        info = collect(model, prompts, args.out, gen_length=args.gen_length, block_length=args.block_length,
                       batch_size=args.batch_size, shard_size=args.shard_size, cache=args.cache, policy=args.policy,
                       labels=args.labels, filter=args.policy_filter)
    except KeyboardInterrupt:
        kept = shards_in(args.out) if os.path.isdir(args.out) else 0
        raise Interrupted(f"collect stopped; {kept} finished shard(s) kept in {args.out}: rerun the same command "
                          "to resume") from None
    finish()
    if rank == 0:
        print(json.dumps(info))
    return 0


def _policy(text: str) -> str:
    from ..collect import parse_policy

    try:
        parse_policy(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected oracle, threshold:TAU or learn2pd:TAU with "
                                         "0 < TAU <= 1") from None
    return text


def _labels(text: str) -> str:
    from ..collect import parse_labels

    try:
        parse_labels(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected final or rollout:TAU with 0 < TAU <= 1") from None
    return text


def _filter_inputs(text: str) -> tuple[str, ...]:
    from l2pd_kernels.reference import check_inputs

    from ..filter import RICH_INPUTS

    if text == "rich":
        return RICH_INPUTS
    try:
        return check_inputs(name.strip() for name in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'confidence', 'rich' or an ordered list from "
                                         f"{','.join(RICH_INPUTS)} starting with confidence") from None


def cmd_train_filter(args: argparse.Namespace) -> int:
    from ..files import check_out_dir
    from ..train import train_filter

    check_out_dir(args.out, refuse_if_holds=None if args.overwrite else "filter.json")
    if args.objective == "sequence":
        flt = _train_sequence(args)
        flt.save_pretrained(args.out)
        print(f"saved {args.out}/filter.safetensors and filter.json")
        return 0
    if args.data is None:
        raise ValueError("--data DIR is required: the folder(s) `l2pd collect` wrote (or --objective sequence, "
                         "which decodes instead)")
    if args.model is not None or args.init_filter is not None:
        raise ValueError("--model and --init-filter go with --objective sequence; --data brings its own model")
    folders = [d for d in args.data.split(",") if d]
    for d in folders or [args.data]:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--data {d!r}: no such folder (write one with `l2pd collect --out`)")
    flt = train_filter(folders, hidden=args.hidden or 128, depth=args.depth, lr=args.lr or 3e-3,
                       max_epochs=args.max_epochs, patience=args.patience,
                       threshold=0.9 if args.threshold is None else args.threshold, device=args.device or "cpu",
                       inputs=args.inputs, kind=args.kind or "dense")
    flt.save_pretrained(args.out)
    print(f"saved {args.out}/filter.safetensors and filter.json")
    return 0


def _train_sequence(args: argparse.Namespace) -> Any:
    """``--objective sequence``: policy gradient on the bundled task's training problems (l2pd.reinforce)."""
    from ..demo.task import split
    from ..filter import Filter
    from ..reinforce import train_policy

    if args.data is not None:
        raise ValueError("--objective sequence decodes the bundled task's problems itself; leave out --data")
    if args.kind not in (None, "history") or args.depth != 1:
        raise ValueError("--objective sequence trains a history filter of depth 1 (--kind history --depth 1)")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise ValueError(f"--threshold {args.threshold}: the policy's tau must be in (0, 1)")
    if args.gen_length % args.block_length:
        raise ValueError(f"--gen-length {args.gen_length} must be a multiple of --block-length {args.block_length}")
    init = None
    if args.init_filter is not None:
        if not os.path.isfile(os.path.join(args.init_filter, "filter.json")):
            raise FileNotFoundError(f"--init-filter {args.init_filter!r}: no filter.json there")
        init = Filter.from_pretrained(args.init_filter)
    model, tok = load_model(args.model, default_device(args.device), family=args.model_family, weights=args.weights,
                            kv_cache=args.kv_cache)
    if init is not None:
        init.check_model(model)
    problems = split(level_split(args, "train"), args.num_prompts or args.iterations * args.prompts_per_step)
    return train_policy(model, tok, problems, init, block_length=args.block_length, gen_length=args.gen_length,
                        tau=0.5 if args.threshold is None else args.threshold, cost=args.cost, samples=args.samples,
                        prompts_per_step=args.prompts_per_step, iterations=args.iterations, lr=args.lr or 1e-3,
                        temperature=args.temperature, hidden=args.hidden or 32, start_confidence=args.start_confidence,
                        log=lambda m: None)


def add_collect(sub: Any) -> None:
    c = sub.add_parser("collect", help="record oracle-replay trajectories for filter training (resumable; "
                       "data-parallel under torchrun)")
    c.add_argument("--out", required=True, help="output folder for shards")
    c.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_family_arg(c)
    c.add_argument("--prompts", default=None, help='JSONL file, one {"prompt": ...} per line (default: the '
                   "bundled task's training problems)")
    c.add_argument("--num-prompts", type=int_type(1), default=2000,
                   help="bundled-task prompts when --prompts is absent")
    add_level_arg(c, "training prompts")
    c.add_argument("--batch-size", type=int_type(1), default=32, help="prompts decoded together (default 32)")
    c.add_argument("--shard-size", type=int_type(1), default=None,
                   help="prompts per saved shard: an interrupted run keeps its finished shards (default: the "
                        "folder's when resuming, else --batch-size)")
    c.add_argument("--cache", choices=["none", "prefix", "dual"], default="none")
    c.add_argument("--policy", type=_policy, default="oracle",
                   help="the decode whose states are recorded: 'oracle' (Learn2PD's replay: unmask exactly the "
                        "positions already equal to the final answer; default) or 'threshold:TAU' (a confidence "
                        "threshold, whose states are closer to those a filter meets when it decodes) or "
                        "'learn2pd:TAU' (the --policy-filter at tau TAU: a DAgger round on the filter's own "
                        "states)")
    c.add_argument("--policy-filter", default=None, metavar="DIR",
                   help="the filter folder --policy learn2pd:TAU decodes with")
    c.add_argument("--labels", type=_labels, default="final",
                   help="'final' (default: does the guess equal the one-token-per-step answer?) or "
                        "'rollout:TAU' (does it equal what threshold TAU + EoTP writes there when it continues the "
                        "decode from this very state? a continuation per recorded state; the recorded decode "
                        "runs with EoTP)")
    add_decode_args(c)
    c.set_defaults(func=cmd_collect)


def add_train_filter(sub: Any) -> None:
    t = sub.add_parser("train-filter", help="train the Learn2PD filter on collected shards, or by policy gradient "
                       "on its own decodes (--objective sequence)")
    t.add_argument("--data", default=None, help="folder written by `l2pd collect`, or several separated by "
                   "commas (DAgger rounds, trained on together)")
    t.add_argument("--out", required=True, help="output folder (filter.safetensors + filter.json)")
    t.add_argument("--hidden", type=int_type(1), default=None, help="hidden width (default 128; 32 with "
                   "--objective sequence)")
    t.add_argument("--depth", type=int_type(1), default=1, help="hidden layers")
    t.add_argument("--lr", type=float_type(0, 10, lo_open=True), default=None, help="AdamW learning rate "
                   "(default 3e-3; Adam 1e-3 with --objective sequence)")
    t.add_argument("--max-epochs", type=int_type(1), default=3000)
    t.add_argument("--patience", type=int_type(1), default=100,
                   help="epochs without validation gain before stopping")
    t.add_argument("--threshold", type=float_type(0), default=None, help="default tau stored with the filter "
                   "(default 0.9; with --objective sequence the policy's tau, default 0.5)")
    add_device_arg(t, "cpu with --data, the training data being small; cuda when available with --objective "
                      "sequence")
    t.add_argument("--inputs", type=_filter_inputs, default=("confidence",),
                   help="what the filter reads: 'confidence' (Learn2PD's filter, default), 'rich' (confidence, "
                        "margin, entropy, step: top-1 minus top-2 probability and entropy of the same softmax, "
                        "and the forwards already spent on the block), or a comma list in that order")
    t.add_argument("--kind", choices=["dense", "shared", "history"], default=None,
                   help="dense (Learn2PD's, the default with --data: the whole block's inputs to the whole block's "
                        "scores) or shared (one "
                        "small MLP applied to each position's own features: confidence, margin, entropy, "
                        "position, step, the block's decided fraction, neighbours' confidences, masks before it "
                        "and the lowest confidence before it; --inputs is then ignored) or history (shared, plus "
                        "each guess's run length over the block's forwards, its previous confidence and the "
                        "change: needs a collection made by this version; what --objective sequence trains)")
    t.add_argument("--overwrite", action="store_true", help="replace a filter already in --out")
    _add_sequence_args(t)
    t.set_defaults(func=cmd_train_filter)


def _add_sequence_args(t: Any) -> None:
    s = t.add_argument_group("--objective sequence (policy gradient on the filter's own decodes; l2pd.reinforce)")
    s.add_argument("--objective", choices=["labels", "sequence"], default="labels",
                   help="labels (default: per-position labels of a collection, --data) or sequence: the filter "
                        "decodes the bundled task's training problems as a stochastic policy, rewarded for a "
                        "correct answer minus --cost per forward (a history filter; no cache, EoTP accepted)")
    s.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_family_arg(s)
    add_level_arg(s, "training problems")
    s.add_argument("--num-prompts", type=int_type(1), default=None,
                   help="training problems (default: --iterations x --prompts-per-step, each seen once)")
    s.add_argument("--block-length", type=int_type(1), default=128, help="the filter's block length (default 128)")
    s.add_argument("--gen-length", type=int_type(1), default=256,
                   help="new tokens per answer, a multiple of --block-length (default 256)")
    s.add_argument("--cost", type=float_type(0), default=0.005, help="reward lost per forward (default 0.005)")
    s.add_argument("--samples", type=int_type(2), default=8, help="decodes per problem; the baseline is their "
                   "mean reward (default 8)")
    s.add_argument("--prompts-per-step", type=int_type(1), default=64, help="problems per iteration (default 64)")
    s.add_argument("--iterations", type=int_type(1), default=150, help="gradient steps (default 150)")
    s.add_argument("--temperature", type=float_type(0, lo_open=True), default=0.25,
                   help="the policy's noise: accept with probability sigmoid((logit - logit(tau)) / T) (default "
                        "0.25)")
    s.add_argument("--start-confidence", type=float_type(0, 1), default=0.99,
                   help="the confidence threshold the policy starts as (default 0.99)")
    s.add_argument("--init-filter", default=None, metavar="DIR", help="start from this history filter instead")
