"""The ``l2pd`` command: demo, generate, eval, collect, train-filter."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .args import Parser, choices_type, device_type, float_type, int_type, list_type, needs_matplotlib, threads_type


def _add_decode_args(p: argparse.ArgumentParser, gen_length: int = 256, filter_block: bool = False) -> None:
    p.add_argument("--gen-length", type=int_type(1), default=gen_length,
                   help=f"new tokens per answer (default {gen_length})")
    if filter_block:
        p.add_argument("--block-length", type=int_type(1), default=None,
                       help="semi-autoregressive block size (default: the filter's block length for learn2pd, and "
                            "for every row of the demo; else 32)")
    else:
        p.add_argument("--block-length", type=int_type(1), default=32,
                       help="semi-autoregressive block size (default 32)")
    _add_device_arg(p)


def _add_device_arg(p: argparse.ArgumentParser, default: str = "cuda when available") -> None:
    p.add_argument("--device", type=device_type, default=None, help=f"cpu, cuda or cuda:N (default: {default})")


def _add_family_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-family", choices=["llada", "dream"], default=None,
                   help="which bundled model to use when --model is not given: LLaDA's format (default) or "
                        "Dream's (shifted logits, grouped-query attention, biased q/k/v)")


def _add_level_arg(p: argparse.ArgumentParser, which: str) -> None:
    p.add_argument("--level", choices=["base", "hard"], default="base",
                   help=f"the bundled task's level for the {which}: base (1 to 4 steps, what the bundled models "
                        "are trained on) or hard (5 or 6 steps; for a model trained with "
                        "`python -m l2pd.demo.train_model --hard-fraction ...`; the bundled models fail it)")


def _level_split(args: argparse.Namespace, part: str) -> str:
    """The task split of ``part`` ('train' or 'test') at ``--level``; --data and --prompts bring their own."""
    level = getattr(args, "level", "base")
    if level != "base" and (getattr(args, "data", None) or getattr(args, "prompts", None)):
        raise ValueError("--level picks the bundled task's problems; leave it out with --data or --prompts")
    return part if level == "base" else f"{level}-{part}"


def _add_strategy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=["steps", "threshold", "margin", "persistence", "learn2pd"], default=None,
                   help="unmasking rule (default: learn2pd when a filter is available, else threshold); margin: "
                        "top-1 minus top-2 probability > tau; persistence: the guess unchanged for --persist "
                        "forwards with confidence > tau")
    p.add_argument("--persist", type=int_type(1), default=None,
                   help="persistence: forwards a guess must stay the same (default 2)")
    p.add_argument("--threshold", type=float_type(0), default=None,
                   help="tau: for threshold (default 0.9) the confidence, for learn2pd (default: the filter's) "
                        "the filter's probability; above 1 nothing passes (one token per step / schedule only)")
    p.add_argument("--eotp", choices=["off", "accepted", "predicted"], default=None,
                   help="end-of-text prediction: stop once an end-of-text token is accepted (accepted) or "
                        "confidently predicted (predicted); default: the filter's stored mode for learn2pd, else off")
    p.add_argument("--cache", choices=["none", "prefix", "dual"], default="none", help="block KV cache mode")
    p.add_argument("--refresh", choices=["full", "tail", "window"], default="full",
                   help="what a cache recomputes at each block start: the whole canvas (full), from the block "
                        "just finished to the end (tail), or (dual) that block and the new one (window)")
    p.add_argument("--filter", default=None,
                   help="filter folder (default: filter.json beside --model or in its filter/ subfolder; for "
                        "the bundled model, its filter)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use a filter recorded for another model (its fingerprint differs)")


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _filter_beside(model_dir: str) -> str | None:
    """A filter stored with a checkpoint: ``filter.json`` in the folder itself or in ``filter/``; for a bundled
    model's folder, however its path is spelled, the bundled filter."""
    import l2pd.demo

    for folder in (model_dir, os.path.join(model_dir, "filter")):
        if os.path.isfile(os.path.join(folder, "filter.json")):
            return folder
    real = os.path.realpath(model_dir)
    for bundled_model, bundled_filter in l2pd.demo.FAMILIES.values():
        if real == os.path.realpath(bundled_model) and os.path.isfile(os.path.join(bundled_filter, "filter.json")):
            return bundled_filter
    return None


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _default_strategy(args: argparse.Namespace, model, quiet: bool = False) -> None:
    """Without --strategy, learn2pd when the model has a filter that fits --block-length; else threshold,
    said once on stderr."""
    if args.strategy is not None:
        return
    flt = getattr(model, "l2pd_filter", None)
    note = (lambda text: None) if quiet else _note
    if flt is None:
        note("no filter for this model (none with --filter, none beside --model): decoding with --strategy "
              "threshold")
        args.strategy = "threshold"
    elif args.block_length is not None and args.block_length != flt.block_length:
        note(f"the filter was trained for block length {flt.block_length}, not --block-length "
              f"{args.block_length}: decoding with --strategy threshold")
        args.strategy = "threshold"


def _load(model_dir: str | None, device: str, filter_dir: str | None = None, allow_other_model: bool = False,
          family: str | None = None):
    """(patched model, tokenizer): a checkpoint folder, or the bundled model of ``family`` (default LLaDA's)
    when ``model_dir`` is None. The filter: ``filter_dir``, else one stored beside the checkpoint, else
    (bundled model) the bundled one."""
    import torch
    from transformers import PreTrainedTokenizerFast

    import l2pd
    import l2pd.demo

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch here (use --device cpu)")
    if model_dir is not None and family is not None:
        raise ValueError("--model-family picks a bundled model; with --model the checkpoint's config decides")
    if filter_dir is not None and not os.path.isfile(os.path.join(filter_dir, "filter.json")):
        raise FileNotFoundError(f"--filter {filter_dir}: no filter.json there (a folder written by `l2pd "
                                "train-filter --out`)")
    if model_dir is None:
        model, tok = l2pd.demo.load(device=device, filter=filter_dir is None, family=family or "llada")
    else:
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"--model {model_dir}: no such folder")
        for name, why in (("config.json", "the model's configuration"),
                          ("tokenizer.json", "the fast tokenizer file; tokenizer.save_pretrained(folder) writes it")):
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise FileNotFoundError(f"--model {model_dir}: no {name} ({why})")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        from .models import load_pretrained

        model = load_pretrained(model_dir, torch_dtype=dtype, device=device)
        tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
        filter_dir = filter_dir or _filter_beside(model_dir)
        l2pd.patch(model)
    if filter_dir is not None:
        l2pd.patch(model, filter=filter_dir, allow_other_model=allow_other_model)
    return model, tok


def cmd_generate(args: argparse.Namespace) -> int:
    from .demo.tokenizer import prompt_text

    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    device = _device(args.device)
    model, tok = _load(args.model, device, args.filter, args.allow_other_model, args.model_family)
    _default_strategy(args, model)
    ids = tok(prompt_text(tok, args.prompt), add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=args.gen_length, block_length=args.block_length,
                         strategy=args.strategy, threshold=args.threshold, eotp=args.eotp, cache=args.cache,
                         refresh=args.refresh, temperature=args.temperature, seed=args.seed,
                         persist=args.persist, return_dict_in_generate=True)
    print(tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True))
    print(f"[{int(out.nfe[0])} forwards, {out.seconds:.2f} s]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"l2pd serve needs FastAPI, uvicorn and prometheus_client ({exc.name} is missing): "
                         "pip install 'l2pd[serve]'") from None
    import socket

    import torch

    from .engine import Engine
    from .serve import serve

    with socket.socket() as sock:  # before the model loads: a port in use is a one-line error
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there ({exc.strerror})") from None
    device = _device(args.device)
    n = args.data_parallel
    if n > 1 and device.startswith("cuda"):
        if ":" in device:
            raise ValueError("--data-parallel uses cuda:0 ... cuda:N-1; give --device cuda")
        if n > torch.cuda.device_count():
            raise ValueError(f"--data-parallel {n}: only {torch.cuda.device_count()} GPU(s) visible")
        devices = [f"cuda:{i}" for i in range(n)]
    else:
        devices = [device] * n  # one model shared by the engines (CPU)
    models: dict[str, tuple] = {}
    for d in dict.fromkeys(devices):
        models[d] = _load(args.model, d, args.filter, args.allow_other_model, args.model_family)
    tok = models[devices[0]][1]
    engines = [Engine(models[d][0], max_batch=args.max_batch, max_length=args.max_length, tokenizer=tok,
                      filter=getattr(models[d][0], "l2pd_filter", None), max_step_tokens=args.max_step_tokens)
               for d in devices]
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else
                                      f"l2pd-bundled-{args.model_family or 'llada'}")
    flt = engines[0].filter
    default = (f"learn2pd (tau {flt.threshold:g}, block {flt.block_length})" if flt is not None
               else "threshold 0.9, block 32")
    print(f"l2pd: serving {name} at http://{args.host}:{args.port}/v1 ({n} engine(s) on {', '.join(devices)}, "
          f"{args.max_batch} rows x {engines[0].max_length} tokens each; default decoding {default})",
          file=sys.stderr)
    serve(engines, tok, name, host=args.host, port=args.port, max_queue=args.max_queue,
          request_timeout=args.request_timeout, default_max_tokens=args.max_tokens, drain=args.drain_timeout)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .demo.task import split
    from .distributed import finish, init_from_env
    from .evaluate import evaluate

    rank, _, rank_device = init_from_env()
    device = rank_device or _device(args.device)
    problems = split(_level_split(args, "test"), args.problems)
    model, tok = _load(args.model, device, args.filter, args.allow_other_model, args.model_family)
    _default_strategy(args, model, quiet=rank != 0)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.task import split
    from .evaluate import compare_configs, format_table

    device = _device(args.device)
    n = args.problems if args.problems is not None else (200 if device.startswith("cuda") else 3)
    batch = args.batch_size if args.batch_size is not None else (n if device.startswith("cuda") else 1)
    model, tok = _load(None, device, args.filter, family=args.model_family)
    flt = model.l2pd_filter
    block = args.block_length if args.block_length is not None else (flt.block_length if flt is not None else 32)
    if flt is None:
        _note("no filter found; the learn2pd rows are skipped")
    elif flt.block_length != block:
        print(f"note: the filter was trained for block length {flt.block_length}, not {block}; the "
              "learn2pd rows are skipped (train one with `l2pd collect` and `l2pd train-filter` at this block "
              "length, then pass --filter)", file=sys.stderr)
    print(f"bundled {args.model_family or 'llada'} model, {n} held-out problems, gen length {args.gen_length}, "
          f"block {block}, greedy, batch {batch}, {device}", file=sys.stderr)
    rows = compare_configs(model, tok, split("test", n), args.gen_length, block, batch,
                           progress=not args.json)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        print("NFE x / wall x: speedup over `steps` without a cache (forwards per answer / wall time)")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from .collect import collect, shards_in
    from .demo.task import split
    from .demo.tokenizer import prompt_text
    from .distributed import finish, init_from_env
    from .files import check_out_dir, read_prompts

    rank, _, rank_device = init_from_env()
    device = rank_device or _device(args.device)
    check_out_dir(args.out)  # before the model loads: an unwritable --out fails now
    train_split = _level_split(args, "train")
    if args.prompts:
        questions = read_prompts(args.prompts)
    else:
        questions = [p.question for p in split(train_split, args.num_prompts)]
    model, tok = _load(args.model, device, family=args.model_family)
    prompts = tok([prompt_text(tok, q) for q in questions], add_special_tokens=False).input_ids
    try:
        info = collect(model, prompts, args.out, gen_length=args.gen_length, block_length=args.block_length,
                       batch_size=args.batch_size, shard_size=args.shard_size, cache=args.cache, policy=args.policy)
    except KeyboardInterrupt:
        kept = shards_in(args.out) if os.path.isdir(args.out) else 0
        raise Interrupted(f"collect stopped; {kept} finished shard(s) kept in {args.out}: rerun the same command "
                          "to resume") from None
    finish()
    if rank == 0:
        print(json.dumps(info))
    return 0


class Interrupted(Exception):
    """Ctrl-C, with what the command kept."""


def _policy(text: str) -> str:
    from .collect import parse_policy

    try:
        parse_policy(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected oracle or threshold:TAU with 0 < TAU <= 1") from None
    return text


def _filter_inputs(text: str) -> tuple[str, ...]:
    from l2pd_kernels.reference import check_inputs

    from .filter import RICH_INPUTS

    if text == "rich":
        return RICH_INPUTS
    try:
        return check_inputs(name.strip() for name in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'confidence', 'rich' or an ordered list from "
                                         f"{','.join(RICH_INPUTS)} starting with confidence") from None


def cmd_train_filter(args: argparse.Namespace) -> int:
    from .files import check_out_dir
    from .train import train_filter

    check_out_dir(args.out, refuse_if_holds=None if args.overwrite else "filter.json")
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r}: no such folder (write one with `l2pd collect --out`)")
    flt = train_filter(args.data, hidden=args.hidden, depth=args.depth, lr=args.lr, max_epochs=args.max_epochs,
                       patience=args.patience, threshold=args.threshold, device=args.device or "cpu",
                       inputs=args.inputs, kind=args.kind)
    flt.save_pretrained(args.out)
    print(f"saved {args.out}/filter.safetensors and filter.json")
    return 0


def _sweep_problems(args: argparse.Namespace, validation: bool = False):
    from .demo.task import split
    from .sweep import VAL_OFFSET, load_problems

    train_split, test_split = _level_split(args, "train"), _level_split(args, "test")
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
    from .files import check_out_file
    from .filter import Filter
    from .sweep import format_rows, grid, plot, sweep

    if args.out:
        check_out_file(args.out, flag="--out")
    if args.plot:
        check_out_file(args.plot, flag="--plot")
        needs_matplotlib("--plot")
    folders = _block_filters(args.filters)
    problems = _sweep_problems(args)
    filters = {block: Filter.from_pretrained(folder) for block, folder in folders.items()}
    model, tok = _load(args.model, _device(args.device), args.filter, args.allow_other_model, args.model_family)
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
        from .sweep import format_aup

        print(format_rows(rows))
        print(format_aup(rows))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .files import check_out_dir
    from .filter import Filter
    from .sweep import tune

    folder = args.filter
    flt = Filter.from_pretrained(folder)
    out = args.out or folder
    check_out_dir(out)
    problems = _sweep_problems(args, validation=True)
    model, tok = _load(args.model, _device(args.device), None, family=args.model_family)
    flt.check_model(model, allow_other_model=args.allow_other_model)
    point = tune(model, tok, flt, problems, args.taus, eotp=args.eotp, budget=args.budget, cache=args.cache,
                 batch_size=args.batch_size, max_new_tokens=args.gen_length, checker=args.checker, progress=True)
    flt.save_pretrained(out)
    print(f"tau {point['tau']} ({point['rule']}): accuracy {100 * point['accuracy']:.1f}% at "
          f"{point['mean_nfe']:.2f} forwards per answer (steps {100 * point['steps_accuracy']:.1f}%); "
          f"saved to {out}/filter.json")
    return 0


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
    from .cache import CACHE_MODES, REFRESH_MODES
    from .spec import EOTP_MODES, STRATEGIES

    return {"strategy": tuple(s for s in STRATEGIES if s != "oracle"), "eotp": EOTP_MODES, "cache": CACHE_MODES,
            "refresh": REFRESH_MODES}


def cmd_trace(args: argparse.Namespace) -> int:
    from .files import check_out_file
    from .trace import trace, write_html, write_png

    json_path = args.json_out or os.path.splitext(args.out)[0] + ".json"
    for flag, path in (("--out", args.out), ("--json-out", json_path), ("--png", args.png)):
        if path:
            check_out_file(path, flag=flag)
    if args.png:
        needs_matplotlib("--png")
    vs = _spec(args.vs) if args.vs else None
    model, tok = _load(args.model, _device(args.device), args.filter, args.allow_other_model, args.model_family)
    _default_strategy(args, model)
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
        from .trace import label

        print(f"{label(r)}: {r['forwards']} forwards, {r['seconds']:.2f} s: {r['answer_text']!r}")
    print(f"wrote {args.out} and {json_path}" + (f" and {args.png}" if args.png else ""))
    return 0


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
    from . import lm_eval_model

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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="l2pd",
        description="Fast parallel decoding for diffusion language models (LLaDA, Dream): a learned unmasking "
        "filter (Learn2PD), end-of-text prediction (EoTP) and a block KV cache. Without --model, commands "
        "use the bundled small model trained on grade-school word problems (LLaDA format; --model-family "
        "dream for the Dream-format one).",
    )
    parser.add_argument("--threads", type=threads_type, default=None,
                        help="CPU threads torch may use (default: OMP_NUM_THREADS, else all cores); on a shared "
                             "machine give the cores you have to yourself, or a busy neighbour slows every "
                             "step many times over")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="speed/quality table of every decoding configuration on the bundled model")
    d.add_argument("--problems", type=int_type(1), default=None,
                   help="held-out problems (default 3 on CPU, 200 on GPU)")
    d.add_argument("--batch-size", type=int_type(1), default=None,
                   help="default 1 on CPU, all problems at once on GPU")
    d.add_argument("--filter", default=None, help="filter folder (default: the bundled one)")
    _add_family_arg(d)
    d.add_argument("--json", action="store_true", help="print the rows as JSON")
    _add_decode_args(d, filter_block=True)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="answer one prompt")
    g.add_argument("--model", default=None, help="folder with config.json, safetensors and tokenizer files")
    _add_family_arg(g)
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--temperature", type=float_type(0), default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int_type(0), default=None, help="fixes the samples when --temperature > 0")
    _add_decode_args(g, filter_block=True)
    _add_strategy_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="held-out accuracy, forwards per answer and tokens/s of one configuration "
                       "(data-parallel under torchrun)")
    e.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    _add_family_arg(e)
    e.add_argument("--problems", type=int_type(1), default=100, help="held-out problems (default 100)")
    _add_level_arg(e, "held-out problems")
    e.add_argument("--batch-size", type=int_type(1), default=1)
    e.add_argument("--json", action="store_true", help="print the figures as JSON")
    e.add_argument("--temperature", type=float_type(0), default=0.0, help="0 = greedy")
    e.add_argument("--seed", type=int_type(0), default=None, help="fixes the samples when --temperature > 0")
    _add_decode_args(e, filter_block=True)
    _add_strategy_args(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("collect", help="record oracle-replay trajectories for filter training (resumable; "
                       "data-parallel under torchrun)")
    c.add_argument("--out", required=True, help="output folder for shards")
    c.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    _add_family_arg(c)
    c.add_argument("--prompts", default=None, help='JSONL file, one {"prompt": ...} per line (default: the '
                   "bundled task's training problems)")
    c.add_argument("--num-prompts", type=int_type(1), default=2000,
                   help="bundled-task prompts when --prompts is absent")
    _add_level_arg(c, "training prompts")
    c.add_argument("--batch-size", type=int_type(1), default=32, help="prompts decoded together (default 32)")
    c.add_argument("--shard-size", type=int_type(1), default=None,
                   help="prompts per saved shard: an interrupted run keeps its finished shards (default: the "
                        "folder's when resuming, else --batch-size)")
    c.add_argument("--cache", choices=["none", "prefix", "dual"], default="none")
    c.add_argument("--policy", type=_policy, default="oracle",
                   help="the decode whose states are recorded: 'oracle' (Learn2PD's replay: unmask exactly the "
                        "positions already equal to the final answer; default) or 'threshold:TAU' (a confidence "
                        "threshold, whose states are closer to those a filter meets when it decodes; on the "
                        "bundled task's hard level it gave a worse filter, see benchmarks/RESULTS.md); the "
                        "labels are the same")
    _add_decode_args(c)
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("train-filter", help="train the Learn2PD filter on collected shards")
    t.add_argument("--data", required=True, help="folder written by `l2pd collect`")
    t.add_argument("--out", required=True, help="output folder (filter.safetensors + filter.json)")
    t.add_argument("--hidden", type=int_type(1), default=128, help="hidden width (default 128)")
    t.add_argument("--depth", type=int_type(1), default=1, help="hidden layers")
    t.add_argument("--lr", type=float_type(0, 10, lo_open=True), default=3e-3, help="AdamW learning rate "
                   "(default 3e-3)")
    t.add_argument("--max-epochs", type=int_type(1), default=3000)
    t.add_argument("--patience", type=int_type(1), default=100,
                   help="epochs without validation gain before stopping")
    t.add_argument("--threshold", type=float_type(0), default=0.9, help="default tau stored with the filter")
    _add_device_arg(t, "cpu: the training data is small")
    t.add_argument("--inputs", type=_filter_inputs, default=("confidence",),
                   help="what the filter reads: 'confidence' (Learn2PD's filter, default), 'rich' (confidence, "
                        "margin, entropy, step: top-1 minus top-2 probability and entropy of the same softmax, "
                        "and the forwards already spent on the block), or a comma list in that order")
    t.add_argument("--kind", choices=["dense", "shared"], default="dense",
                   help="dense (Learn2PD's: the whole block's inputs to the whole block's scores) or shared (one "
                        "small MLP applied to each position's own features: confidence, margin, entropy, "
                        "position, step, the block's decided fraction, neighbours' confidences, masks before it "
                        "and the lowest confidence before it; --inputs is then ignored)")
    t.add_argument("--overwrite", action="store_true", help="replace a filter already in --out")
    t.set_defaults(func=cmd_train_filter)

    w = sub.add_parser("sweep", help="accuracy / forwards frontier over strategies, taus, EoTP modes, block "
                       "lengths and caches (resumable JSONL, optional PNG)")
    w.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    _add_family_arg(w)
    w.add_argument("--data", default=None, help='JSONL of {"prompt": ..., "answer": ...} (default: the bundled '
                   "task's held-out problems)")
    w.add_argument("--checker", default="hash-number", help="how an answer is scored: hash-number (the integer "
                   "after ####), last-number, exact, contains")
    w.add_argument("--problems", type=int_type(1), default=200, help="problems (default 200)")
    _add_level_arg(w, "held-out problems")
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
    _add_device_arg(w)
    w.set_defaults(func=cmd_sweep)

    u = sub.add_parser("tune", help="choose a filter's tau (its operating point) on validation problems and "
                       "store it in filter.json")
    u.add_argument("--filter", required=True, help="filter folder")
    u.add_argument("--out", default=None, help="where the tuned filter goes (default: over --filter)")
    u.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    _add_family_arg(u)
    u.add_argument("--data", default=None, help='JSONL of {"prompt": ..., "answer": ...} validation problems '
                   "(default: the bundled task's validation problems, unseen in training and in eval)")
    u.add_argument("--checker", default="hash-number")
    u.add_argument("--problems", type=int_type(1), default=200, help="validation problems (default 200)")
    _add_level_arg(u, "validation problems")
    u.add_argument("--batch-size", type=int_type(1), default=1)
    u.add_argument("--taus", type=list_type(float_type(0)), default="0.9,0.95,0.98,0.99,0.995,0.998,0.999",
                   help="candidate taus (comma-separated)")
    u.add_argument("--eotp", choices=["off", "accepted", "predicted"], default="accepted")
    u.add_argument("--budget", type=float_type(0, 100), default=0.5,
                   help="accuracy points below `steps` allowed (default 0.5)")
    u.add_argument("--cache", choices=["none", "prefix", "dual"], default="none")
    u.add_argument("--allow-other-model", action="store_true")
    u.add_argument("--gen-length", type=int_type(1), default=256, help="new tokens per answer (default 256)")
    _add_device_arg(u)
    u.set_defaults(func=cmd_tune)

    r = sub.add_parser("trace", help="record one decode forward by forward and draw it as a self-contained "
                       "HTML page (and JSON, optionally a PNG)")
    r.add_argument("--prompt", required=True, help="the user message")
    r.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    _add_family_arg(r)
    r.add_argument("--out", default="trace.html", help="the page (default trace.html); the JSON goes beside it")
    r.add_argument("--json-out", default=None, help="where the JSON goes (default: --out with .json)")
    r.add_argument("--png", default=None, help="a summary picture (pip install 'l2pd[plot]')")
    r.add_argument("--vs", default=None, help="a second configuration drawn beside the first, as changes to it: "
                   "e.g. strategy=threshold,threshold=0.9,eotp=off")
    _add_decode_args(r, filter_block=True)
    _add_strategy_args(r)
    r.set_defaults(func=cmd_trace)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (pip install "
                       "'l2pd[serve]')", description="Serve a model over HTTP: POST /v1/completions, POST "
                       "/v1/chat/completions, GET /v1/models, /health and /metrics (Prometheus). Requests join "
                       "the running batch at the next step. l2pd's options go in the request body: strategy, "
                       "threshold, block_length, eotp, cache (default dual), refresh (default window), steps, "
                       "persist.")
    v.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    _add_family_arg(v)
    v.add_argument("--filter", default=None, help="the learn2pd filter requests get (default: the model's)")
    v.add_argument("--allow-other-model", action="store_true")
    v.add_argument("--served-model-name", default=None, help="the model id clients name (default: the folder's "
                   "name, or l2pd-bundled-llada / l2pd-bundled-dream)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    v.add_argument("--port", type=int_type(0, 65535), default=8000, help="default 8000")
    v.add_argument("--max-batch", type=int_type(1), default=16, help="rows decoding at once per GPU (default 16)")
    v.add_argument("--max-queue", type=int_type(0), default=256,
                   help="requests waiting beyond the free rows before new ones get 429 (default 256)")
    v.add_argument("--max-length", type=int_type(2), default=None,
                   help="longest prompt + answer in tokens (default: the model's, at most 4096); sets the K/V "
                        "memory: max-batch x max-length positions")
    v.add_argument("--max-tokens", type=int_type(1), default=256,
                   help="answer budget of a request that gives no max_tokens (default 256)")
    v.add_argument("--max-step-tokens", type=int_type(1), default=8192,
                   help="tokens one iteration feeds at most; block refreshes beyond it wait a step (default 8192)")
    v.add_argument("--request-timeout", type=float_type(0), default=600.0,
                   help="seconds after which a request is dropped (default 600)")
    v.add_argument("--drain-timeout", type=float_type(0), default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds open requests get to finish (default 30)")
    v.add_argument("--data-parallel", type=int_type(1), default=1,
                   help="engines, one per GPU (cuda:0 ...), behind one front end (default 1)")
    _add_device_arg(v)
    v.set_defaults(func=cmd_serve)

    m = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the l2pd model registered "
                       "(pip install 'l2pd[eval]'; `l2pd lm-eval --help`)")
    m.set_defaults(func=cmd_lm_eval)
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


if __name__ == "__main__":
    raise SystemExit(main())
