"""FP8 weights against the model as loaded, in one run: the bundled models' accuracy and forwards (held-out
problems), and at LLaDA-8B shapes (random bf16 weights built on the GPU) the relative logit error and
``generate``'s time per forward at batch 1 and 64 against the bf16 and FP8 weight-read floors.

    PYTHONPATH=. python benchmarks/fp8_check.py --problems 1000 --out runs/fp8.json

The bundled rows decode with each model's shipped default (the decoding its filter stores: ``l2pd tune
--rules``' pick, with its tau, block and EoTP) and, with
``--steps``, with ``steps`` (one token per forward); each quantized row carries its accuracy difference from the
weights as loaded on the same problems, with its paired standard error. Results are written after every row.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import floors, save

import l2pd


def _quantize(model, kind: str) -> None:
    """``kind``: an ``l2pd.quantize`` kind (or ``native``: the weights as loaded), each optionally followed by
    ``-bf16head`` (the LM head left bf16) and ``-kv8`` (an e4m3 K/V cache): ``w8a8-kv8``, ``native-kv8``."""
    base, *variants = kind.split("-")
    if set(variants) - {"bf16head", "kv8"}:
        raise ValueError(f"kind {kind!r}: variants are -bf16head and -kv8")
    l2pd.quantize(model, base, head="bf16head" not in variants, kv_cache="fp8" if "kv8" in variants else None)


def paired(native: list[bool], other: list[bool]) -> dict:
    """The accuracy difference of two decodes of the same problems with its paired standard error (only the
    problems where they disagree carry it), and the counts each way."""
    n = len(native)
    gained = sum(o and not a for a, o in zip(native, other))
    lost = sum(a and not o for a, o in zip(native, other))
    diff = (gained - lost) / n
    se = ((gained + lost) / n - diff**2) ** 0.5 / n**0.5
    return {"difference": diff, "paired_se": se, "gained": gained, "lost": lost}


def bundled_rows(problems: int, batch: int, steps: bool, result: dict, out: str | None, kinds: list[str],
                 families: list[str]) -> None:
    from l2pd.demo.task import is_correct, split
    from l2pd.evaluate import evaluate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    test = split("test", problems)
    for family in families:
        native: dict[str, list[bool]] = {}
        for weights in ["native", *kinds]:
            model, tok = l2pd.demo.load(device=device, family=family)
            if weights != "native":
                _quantize(model, weights)
            configs = [("shipped default", {})] + ([("steps", dict(strategy="steps", eotp="off",
                                                                   block_length=model.l2pd_filter.block_length))]
                                                   if steps else [])
            for name, kw in configs:
                r = evaluate(model, tok, test, batch_size=batch, progress=False, **kw)
                correct = [bool(is_correct(t, p.answer)) for t, p in zip(r["texts"], test)]
                if name == "shipped default":
                    from l2pd.spec import default_decoding

                    name = f"shipped default ({default_decoding(model.l2pd_filter)})"
                row = {"family": family, "weights": weights, "config": name, "problems": r["problems"],
                       "accuracy": r["accuracy"], "mean_nfe": r["mean_nfe"], "seconds": r["seconds"]}
                if weights == "native":
                    native[name] = correct
                else:
                    row["against_native"] = paired(native[name], correct)
                print(row, flush=True)
                result.setdefault("bundled", []).append(row)
                save(out, result)
            del model


def step_rows(result: dict, out: str | None, batches: list[int], kinds: list[str]) -> None:
    from decode_8b import build_model

    from l2pd.decode import generate, release

    fl = floors()
    model = build_model()
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 126000, (1, 96), device="cuda")
    with torch.no_grad():
        ref_logits = model(ids).logits.float()
    timings = {}
    for weights in ["native", *kinds]:
        if weights != "native":
            _quantize(model, weights)
            with torch.no_grad():
                err = (model(ids).logits.float() - ref_logits).norm() / ref_logits.norm()
            result[f"logit_relative_error_8b_{weights}"] = float(err)
        nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        embed = model.model.transformer.wte.weight
        floor_ms = (nbytes - embed.numel() * embed.element_size()) / (fl["copy_GBps"] * 1e9) * 1e3
        for B in batches:
            prompt = torch.randint(0, 126000, (B, 512), device="cuda")
            kw = dict(max_new_tokens=256, block_length=32, strategy="steps", cache="dual", refresh="full",
                      return_dict_in_generate=True)
            for _ in range(2):
                generate(model, prompt, steps=16, **kw)
            for tpf in (1, 8):
                outs = [generate(model, prompt, steps=256 // tpf, **kw) for _ in range(3 if B == 1 else 1)]
                sec = statistics.median(o.seconds for o in outs)
                ms = sec / outs[0].forwards * 1e3
                row = {"weights": weights, "batch": B, "tpf": tpf, "ms_per_forward": ms, "tokens_per_s": B * 256 / sec,
                       "weight_bytes_read": nbytes, "floor_ms": floor_ms, "over_own_floor": ms / floor_ms,
                       "graphed": f"{outs[0].graphed}/{outs[0].forwards}"}
                timings[(weights, B, tpf)] = ms
                print(row, flush=True)
                result.setdefault("step", []).append(row)
                save(out, result)
            release(model)
        if weights == "native":
            result["bf16_floor_ms"] = floor_ms
    for row in result["step"]:
        row["over_bf16_floor"] = row["ms_per_forward"] / result["bf16_floor_ms"]
    result["bf16_weight_bytes"] = bf16_bytes
    save(out, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--steps", action="store_true", help="also decode with steps (one token per forward)")
    ap.add_argument("--sections", default="step,bundled")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--kinds", default="fp8,w8a8",
                    help="the l2pd.quantize kinds to compare with bf16 (<kind>-bf16head: the LM head left bf16; "
                         "<kind>-kv8: with an e4m3 K/V cache; native-kv8: bf16 weights, e4m3 K/V cache)")
    ap.add_argument("--families", default="llada,dream", help="the bundled models of the bundled section")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result: dict = {}
    t0 = time.time()
    for section in args.sections.split(","):
        if section == "step":
            step_rows(result, args.out, [int(b) for b in args.batches.split(",")], args.kinds.split(","))
        elif section == "bundled":
            bundled_rows(args.problems, args.batch_size, args.steps, result, args.out, args.kinds.split(","),
                         args.families.split(","))
    result["seconds"] = time.time() - t0
    save(args.out, result)


if __name__ == "__main__":
    main()
