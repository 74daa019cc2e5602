"""Does the engine's key split at batch 1 (``L2PD_POOL_SPLIT``, ``l2pd_kernels.attention.pool_split_plan``) make
the whole step and ``generate`` faster, not only the attention kernel?

    PYTHONPATH=.:benchmarks python benchmarks/studies/pool_split_generate.py --out runs/pool_split_generate.json
    PYTHONPATH=.:benchmarks python benchmarks/studies/pool_split_generate.py --families 8b --prompt 3072 \
        --new 1024 --tpf 8 --refresh window --splits off,4,8,16

For LLaDA-8B and LLaDA2.0-mini shapes (random bf16 weights built on the GPU; block 32, dual cache, batch 1,
strategy ``steps``; by default prompt 512 + 256 at one token per forward), each setting of ``--splits`` ("off",
"auto": the shipped rule, or a number of key chunks) in turn, ``--repeats`` times in one process, each on a
fresh engine (its graphs captured with that setting):
- the engine's graphed iteration: median device time of 50 replays (no host);
- ``generate``: wall time per forward, median of 3 decodes (the host included);
- once per setting, the attention kernels' device time per forward in an eager decode (torch profiler), and the
  device time of one forward over the whole canvas without a cache (what `generate`'s first forward does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from decode_8b import EngineStep, build_shape
from harness import device_ms, floors, run_info, save

from l2pd.decode import generate, release

L = 32
P, G = 512, 256  # replaced by --prompt and --new


def set_canvas(prompt: int, new: int) -> None:
    """The canvas of every decode here and of ``EngineStep``'s iteration."""
    import decode_8b

    global P, G
    P, G = decode_8b.P, decode_8b.G = prompt, new


def _set(split: str) -> None:
    """"off", "auto" (``pool_split_plan``'s rule) or a number of key chunks (read at each forward)."""
    import l2pd_kernels.attention as attention

    os.environ["L2PD_POOL_SPLIT"] = "0" if split == "off" else "1"
    attention.POOL_SPLITS = 0 if split in ("off", "auto") else int(split)


@torch.no_grad()
def attention_ms(model, refresh: str) -> dict:
    """Device ms per forward of the kernels whose name says attention, over a short eager decode."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 126000, (1, P), device="cuda")
    kw = dict(max_new_tokens=64, block_length=L, strategy="steps", steps=64, cache="dual", refresh=refresh,
              cuda_graph=False, return_dict_in_generate=True)
    generate(model, ids, **kw)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = generate(model, ids, **kw)
    release(model)
    total = attn = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0) or 0
        total += t
        if "attention" in ev.key or "attn" in ev.key:
            attn += t
    return {"kernels_ms_per_forward": total / 1e3 / out.forwards, "attention_ms_per_forward": attn / 1e3 / out.forwards}


@torch.no_grad()
def canvas_ms(model) -> dict:
    """Device ms of one forward over the whole canvas (prompt + masks, no cache): the work of `generate`'s first
    forward, which fills the dual cache, and which the step's floor leaves out."""
    ids = torch.randint(0, 126000, (1, P + G), device="cuda")
    return {"canvas_forward_ms": device_ms(lambda: model(input_ids=ids), iters=3, warmup=1)}


@torch.no_grad()
def alternate(model, settings: list[str], apply, repeats: int, tpf: int, refresh: str,
              warmup_s: float = 3.0, batch: int = 1) -> dict[str, dict]:
    """Each setting in turn (``apply(setting)``), ``repeats`` times, each on a fresh engine: the graphed
    iteration's device time (median of 50 replays) and ``generate``'s ms per forward (median of 3 decodes at
    ``tpf`` tokens per forward, after two that compile and capture), with each run's tokens. First, ``warmup_s``
    seconds of the first setting's replays, not counted: the first run of a call was its fastest in the H200
    studies whichever setting went first (clocks before sustained load, likely). ``batch``: rows of the
    iteration and of each decode (one decode a run from batch 2 on)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 126000, (batch, P), device="cuda")
    kw = dict(max_new_tokens=G, block_length=L, strategy="steps", steps=G // tpf, cache="dual", refresh=refresh,
              return_dict_in_generate=True)
    runs: dict[str, dict[str, list]] = {s: {"replay_ms": [], "generate_ms": [], "tokens": [], "forwards": []}
                                       for s in settings}
    if warmup_s > 0:
        apply(settings[0])
        st = EngineStep(model, batch, "dual", refresh, True, True)
        for _ in range(3):
            st.step()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < warmup_s:
            for _ in range(20):
                st.replay()
            torch.cuda.synchronize()
        del st
        release(model)
    for _ in range(repeats):
        for setting in settings:
            apply(setting)
            torch.manual_seed(0)
            st = EngineStep(model, batch, "dual", refresh, True, True)
            for _ in range(3):
                st.step()
            runs[setting]["replay_ms"].append(device_ms(st.replay, iters=50))
            del st
            release(model)
            for _ in range(2):  # compile and capture
                generate(model, ids, **{**kw, "steps": 2 * (G // L)})
            outs = [generate(model, ids, **kw) for _ in range(3 if batch == 1 else 1)]
            runs[setting]["generate_ms"].append(statistics.median(o.seconds / o.forwards * 1e3 for o in outs))
            runs[setting]["tokens"].append(outs[0].sequences[0, P:].tolist())
            runs[setting]["forwards"].append(outs[0].forwards)
            release(model)
            torch.cuda.empty_cache()
    return runs


def summary(runs: dict[str, dict], setting: str, first: str) -> dict:
    """A setting's medians and runs; whether every run decoded the first setting's first tokens."""
    r = runs[setting]
    return {"replay_ms": statistics.median(r["replay_ms"]), "replay_runs": r["replay_ms"],
            "generate_ms": statistics.median(r["generate_ms"]), "generate_runs": r["generate_ms"],
            "forwards": r.get("forwards", []),
            "same_tokens": all(t == runs[first]["tokens"][0] for t in r["tokens"])}


@torch.no_grad()
def family(name: str, repeats: int, splits: list[str], tpf: int, refresh: str | None,
           weights: str = "bf16") -> list[dict]:
    model = build_shape(name, weights)
    refresh = refresh or ("window" if name == "llada2-mini" else "full")
    runs = alternate(model, splits, _set, repeats, tpf, refresh)
    rows = []
    for split in splits:
        _set(split)
        row = {"family": name, "weights": weights, "split": split, "refresh": refresh, "prompt": P, "new": G,
               "tpf": tpf,
               **summary(runs, split, splits[0]), **attention_ms(model, refresh), **canvas_ms(model)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--families", default="8b,llada2-mini")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=P, help="prompt tokens (default %(default)s)")
    ap.add_argument("--new", type=int, default=G, help="new tokens (default %(default)s)")
    ap.add_argument("--tpf", type=int, default=1, help="tokens per forward that `steps` forces (default 1)")
    ap.add_argument("--refresh", choices=["full", "window"], default=None,
                    help="default: full at LLaDA-8B shapes, window at LLaDA2.0-mini's")
    ap.add_argument("--splits", default="off,auto",
                    help="settings to alternate: 'off', 'auto' (the rule) or a number of key chunks")
    ap.add_argument("--weights", choices=["bf16", "w8a8", "fp8"], default="bf16",
                    help="w8a8 / fp8: l2pd.quantize the model first")
    args = ap.parse_args()
    set_canvas(args.prompt, args.new)
    splits = args.splits.split(",")
    result = {**run_info(), "floors": floors(), "splits": splits}
    result["rows"] = [r for fam in args.families.split(",")
                      for r in family(fam, args.repeats, splits, args.tpf, args.refresh, args.weights)]
    save(args.out, result)


if __name__ == "__main__":
    main()
