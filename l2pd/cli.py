"""The ``l2pd`` command."""

from __future__ import annotations

import argparse
import sys


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-length", type=int, default=256, help="new tokens per answer (default 256)")
    p.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block size (default 32)")
    p.add_argument("--strategy", choices=["steps", "threshold", "learn2pd"], default=None,
                   help="unmasking rule (default: learn2pd when a filter is available, else threshold)")
    p.add_argument("--threshold", type=float, default=None, help="tau for threshold/learn2pd")
    p.add_argument("--eotp", choices=["off", "accepted", "predicted"], default="off", help="end-of-text prediction")
    p.add_argument("--cache", choices=["none", "prefix", "dual"], default="none", help="block KV cache mode")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    import l2pd

    device = _device(args.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = l2pd.LLaDAModelLM.from_pretrained(args.model, torch_dtype=dtype, device=device)
    tok = AutoTokenizer.from_pretrained(args.model)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    l2pd.patch(model)
    out = model.generate(ids, max_new_tokens=args.gen_length, block_length=args.block_length,
                         strategy=args.strategy, threshold=args.threshold, eotp=args.eotp, cache=args.cache,
                         temperature=args.temperature, return_dict_in_generate=True)
    print(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"[{int(out.nfe[0])} forwards, {out.seconds:.2f} s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2pd",
        description="Fast parallel decoding for LLaDA-style diffusion language models: learned unmasking "
        "filter (Learn2PD), end-of-text prediction and a block KV cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt with a LLaDA checkpoint folder")
    g.add_argument("--model", required=True, help="folder with config.json, safetensors and tokenizer files")
    g.add_argument("--prompt", required=True, help="the user message")
    _add_decode_args(g)
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"l2pd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
