"""`serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..args import float_type, int_type
from ..loading import default_device, load_model
from .common import (
    add_device_arg,
    add_family_arg,
)


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

    from ..engine import Engine
    from ..serve import serve
    from ..spec import default_decoding

    with socket.socket() as sock:  # before the model loads: a port in use is a one-line error
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there ({exc.strerror})") from None
    device = default_device(args.device)
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
        models[d] = load_model(args.model, d, args.filter, args.allow_other_model, args.model_family,
                               weights=args.weights, kv_cache=args.kv_cache)
    tok = models[devices[0]][1]
    engines = [Engine(models[d][0], max_batch=args.max_batch, max_length=args.max_length, tokenizer=tok,
                      filter=getattr(models[d][0], "l2pd_filter", None), max_step_tokens=args.max_step_tokens,
                      run_ahead=args.run_ahead)
               for d in devices]
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model)) if args.model else
                                      f"l2pd-bundled-{args.model_family or 'llada'}")
    flt = engines[0].filter
    default = default_decoding(flt)
    print(f"l2pd: serving {name} at http://{args.host}:{args.port}/v1 ({n} engine(s) on {', '.join(devices)}, "
          f"{args.max_batch} rows x {engines[0].max_length} tokens each; default decoding {default})",
          file=sys.stderr)
    serve(engines, tok, name, host=args.host, port=args.port, max_queue=args.max_queue,
          request_timeout=args.request_timeout, default_max_tokens=args.max_tokens, drain=args.drain_timeout)
    return 0


def add_serve(sub: Any) -> None:
    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (pip install "
                       "'l2pd[serve]')", description="Serve a model over HTTP: POST /v1/completions, POST "
                       "/v1/chat/completions, GET /v1/models, /health and /metrics (Prometheus). Requests join "
                       "the running batch at the next step. l2pd's options go in the request body: strategy, "
                       "threshold, block_length, eotp, cache (default dual), refresh (default window), steps, "
                       "persist, and LLaDA 2.1's token editing: edit_threshold, edit_steps.")
    v.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_family_arg(v)
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
    v.add_argument("--run-ahead", choices=["auto", "off"], default=None,
                   help="launch each iteration before the last is read back where the schedule alone decides "
                   "(strategy steps, or threshold >= 1): auto (the default on a GPU; off on the CPU) or off")
    v.add_argument("--request-timeout", type=float_type(0), default=600.0,
                   help="seconds after which a request is dropped (default 600)")
    v.add_argument("--drain-timeout", type=float_type(0), default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds open requests get to finish (default 30)")
    v.add_argument("--data-parallel", type=int_type(1), default=1,
                   help="engines, one per GPU (cuda:0 ...), behind one front end (default 1)")
    add_device_arg(v)
    v.set_defaults(func=cmd_serve)
