"""Do the few-row products' tiles and K splits from the occupancy sweep (``benchmarks/skinny_configs.py --splits
--occupancy``) make the whole batch-1 step and ``generate`` faster?

    PYTHONPATH=.:benchmarks python benchmarks/studies/step_rules.py --out runs/step_rules.json
    PYTHONPATH=.:benchmarks python benchmarks/studies/step_rules.py --families 8b --weights w8a8
    PYTHONPATH=.:benchmarks python benchmarks/studies/step_rules.py --families dream-7b \
        --settings now,occupancy,occupancy-tiles,occupancy-splits
    PYTHONPATH=.:benchmarks python benchmarks/studies/step_rules.py --settings unfused-rope,fused-rope

Settings, alternated ``--repeats`` times in one process, each on a fresh engine whose graphs are captured with
it (``pool_split_generate.alternate``); the rules other than the shipped ones are kept below:
- ``before``: the tiles and K splits of ``l2pd_kernels.skinny`` before the sweep;
- ``now``: as shipped (the sweep's e4m3 tiles; RoPE fused where ``_rope_fuses`` says; TMA loads where
  ``pick_tma`` says);
- ``occupancy``: the sweep's e4m3 tiles and its bf16 choices too (16-column slices for outputs of 2,048
  columns or fewer; K split in two where the tiles fit on the SMs at once with 32 K steps or more), which made
  Dream-7B's step slower and were not taken; ``occupancy-tiles`` and ``occupancy-splits``: one of the two;
- ``fused-rope`` / ``unfused-rope``: the q/k/v product doing ``rope_qkv``'s work in the same launch
  (``linear_rope_qkv``) wherever it applies / nowhere (``L2PD_FUSED_ROPE=1`` / ``0``; shipped: where it paid,
  ``l2pd.models.decoder._rope_fuses``; Dream-7B's q/k/v have biases, so it keeps two launches there);
- ``no-tma`` / ``tma-all``: the few-row products load their tiles by TMA nowhere / in every product, e4m3
  ones included, with the pointer path's tiles where ``pick_tma`` has none (``L2PD_SKINNY_TMA=0`` / ``1``;
  shipped: where ``l2pd_kernels.skinny.pick_tma`` has a tile); ``tma-unfused-rope``: as shipped, RoPE unfused;
  ``tma-wide``: TMA only where ``pick_tma`` transposes (wide and gated outputs), narrow ones by pointers;
- ``early`` / ``wait``: every kernel lets the next launch as soon as its own programs have all started / none
  does (``device.EARLY``; shipped: ``l2pd.models.decoder._early_launch``); ``early-but-products``: every
  kernel but the few-row products (``device.LATE``);
- ``moe-no-tma``: a mixture-of-experts model's routed experts load their weight tiles by pointers
  (``L2PD_MOE_TMA=0``; shipped: by TMA in the sorted path, and in the scan path while a CUDA graph is captured,
  ``moe._moe_tma``; until 2026-12-02 in the scan path only);
- ``meta-after-wait``: the attention kernel reads its host-built segments and tiles after its wait for the
  kernel before it (shipped: before, ``attention.META_FIRST``); ``router-mm``: a mixture-of-experts router's
  product by torch's matmul with fp32 output (shipped: the few-row kernel with fp32 output,
  ``decoder._ROUTER_KERNEL``); ``before-router-meta``: both as before;
- ``moe-norm`` / ``moe-combine``: a mixture of experts' rows combined inside the next RMSNorm's kernel / by
  their own kernel (``L2PD_MOE_NORM=1`` / ``0``; shipped: inside the norm since 2026-12-02);
- ``heads-apart``: the pool attention takes one query head per program (``L2PD_POOL_GQ=1``; shipped: a
  grouped-query model's heads of one K/V head together, ``attention.pool_heads_per_program``);
  ``heads-apart-64``: that in 64-query tiles too (``L2PD_POOL_TILE_M=64``), the rule before 2026-12-02 (shipped:
  32-query tiles for grouped-query models, ``attention.pool_tile_m``);
- ``biases-apart``: a group of biased modules (Dream's q/k/v) multiplies apart, each with its bias, as before
  2026-12-03 (``L2PD_PACKED_BIASES=0``; shipped: packed, the biases added after the product);
- ``tile32`` / ``splits8`` / ``tile32-splits8``: the pool attention in 32-query tiles for every model / its
  keys in 8 chunks where ``pool_split_plan`` splits them / both (shipped: 64-query tiles where no K/V head
  is shared, chunks for about one program per SM); ``wait-tile32``, ``wait-splits8``, ``wait-splits2``,
  ``wait-tile32-splits8``: those with ``wait``, for ``step_kernels.py``'s kernel spans;
(The H200 runs of 2026-12-02 also had ``act-rows``: with w8a8 weights, the attention output and the SiLU
product quantized per row by a launch of their own (as shipped) against the shipped rule of commit 5ab558f,
which wrote them as e4m3 groups from the kernels that make them: slower and removed, "FP8 at batch 1 without
the quantizing launches" in ``benchmarks/RESULTS.md``.)
(The H200 runs of 2026-12-02 also had ``warm``, ``early-warm``, ``early-warm-late-products`` (each program of a
TMA product asking L2 for the first 64 KB of its weight before its wait: commit 61daad8) and ``no-stream``,
``no-stream-early`` (stream-K launches where the tiles leave SMs idle: commit be3d6ef); both slower and
removed: "Early launches on the TMA tiles" in ``benchmarks/RESULTS.md``.)
(The H200 runs of 2026-12-02 named "now" the shipped rule of then, RoPE unfused everywhere; their settings
``fold-norms`` and ``fused-both`` ran each RMSNorm inside the products around it, slower and removed since:
commit 0b1f23e, "The q/k/v product with RoPE in one launch" in ``benchmarks/RESULTS.md``.)
Random weights built on the GPU (LLaDA-8B, LLaDA2.0-mini or Dream-7B shapes; ``--weights w8a8``: ``l2pd.quantize``
first), prompt 512 + 256, block 32, dual cache, batch 1 (``--batch``), strategy ``steps`` at one token per forward
(``--tpf``; window refresh at LLaDA2.0-mini's shapes, full elsewhere): the graphed iteration's device time and
``generate``'s ms per forward, with whether each setting decoded the first setting's tokens. (In its first form,
442daa9, the study also set key chunks merged in place against the second merge kernel: "The few-row products'
tiles from an occupancy sweep" in ``benchmarks/RESULTS.md``.)
"""

from __future__ import annotations

import argparse
import json

import torch
from decode_8b import build_shape
from harness import floors, run_info, save
from pool_split_generate import alternate, summary

from l2pd_kernels import attention, device, moe, skinny

NEW = (skinny.pick_config, skinny.pick_config_fp8, skinny.pick_split)
PICK_TMA = skinny.pick_tma


def _old_pick_config_fp8(rows, n, k, gate, a8=False):
    """The e4m3 tiles before the sweep (the bf16 tiles and every K split are still the shipped ones)."""
    if a8:
        if n > 65536:
            return (128, 256, 4, 4)
        return (64, 512, 8, 4) if n <= 8192 else (64, 256, 4, 4)
    return (64, 256, 4, 3)


def _occupancy_pick_config(rows, n, k, gate, device=""):
    if n <= 2048 and not gate and not ("H100" in device or "A100" in device):
        return (16, 256, 4, 4)
    return NEW[0](rows, n, k, gate, device)


def _occupancy_pick_split(tiles, k_steps, sms, widened=False, a8=False):
    if not widened and not a8 and skinny.SPLIT_K <= 0 and tiles <= sms and k_steps >= 32:
        return 2
    return NEW[2](tiles, k_steps, sms, widened, a8)


def _wide_pick_tma(rows, n, k, gate, sms, fp8=False, a8=False):
    """``pick_tma`` without its narrow tiles: outputs of one 32-column slice per SM or fewer keep pointers."""
    cfg = PICK_TMA(rows, n, k, gate, sms, fp8, a8)
    return None if cfg is not None and not cfg[4] else cfg


def _setting(picks=NEW, fused_rope=None, tma="auto", pick_tma=PICK_TMA, early=device.EARLY,
             late=frozenset(), moe_tma="auto", meta_first=True, router_kernel=True, moe_norm=True,
             pool_gq=0, tile_m=0, pool_splits=0, packed_biases=True) -> dict:
    """One setting: (pick_config, pick_config_fp8, pick_split), ``decoder.FUSED_ROPE`` (None: the shipped
    rule), ``skinny.TMA``, ``skinny.pick_tma``, ``device.EARLY`` and ``device.LATE`` (who lets the next kernel
    launch early), ``moe.TMA`` (the routed experts' weight tiles by TMA), ``attention.META_FIRST``,
    ``decoder._ROUTER_KERNEL``, ``decoder.MOE_NORM``, ``attention.POOL_GQ`` and the engine's attention tile
    (``attention._TILE_M_ENV``, 0: ``pool_tile_m``'s rule) and its key chunks at batch 1
    (``attention.POOL_SPLITS``, 0: ``pool_split_plan``'s rule), ``decoder.PACKED_BIASES``."""
    return {"picks": picks, "fused_rope": fused_rope, "tma": tma, "pick_tma": pick_tma, "early": early,
            "late": late, "moe_tma": moe_tma, "meta_first": meta_first, "router_kernel": router_kernel,
            "moe_norm": moe_norm, "pool_gq": pool_gq, "tile_m": tile_m, "pool_splits": pool_splits,
            "packed_biases": packed_biases}


SETTINGS = {"before": _setting((NEW[0], _old_pick_config_fp8, NEW[2])), "now": _setting(),
            "occupancy": _setting((_occupancy_pick_config, NEW[1], _occupancy_pick_split)),
            "occupancy-tiles": _setting((_occupancy_pick_config, NEW[1], NEW[2])),
            "occupancy-splits": _setting((NEW[0], NEW[1], _occupancy_pick_split)),
            "fused-rope": _setting(fused_rope=True), "unfused-rope": _setting(fused_rope=False),
            "no-tma": _setting(tma="0"), "tma-all": _setting(tma="1"),
            "tma-unfused-rope": _setting(fused_rope=False), "tma-wide": _setting(pick_tma=_wide_pick_tma),
            "early": _setting(early=True), "wait": _setting(early=False),
            "early-but-products": _setting(early=True, late=frozenset({"skinny"})),
            "moe-no-tma": _setting(moe_tma="0"), "meta-after-wait": _setting(meta_first=False),
            "router-mm": _setting(router_kernel=False),
            "before-router-meta": _setting(meta_first=False, router_kernel=False),
            "moe-norm": _setting(moe_norm=True), "moe-combine": _setting(moe_norm=False),
            "heads-apart": _setting(pool_gq=1), "heads-apart-64": _setting(pool_gq=1, tile_m=64),
            "tile32": _setting(tile_m=32), "splits8": _setting(pool_splits=8),
            "tile32-splits8": _setting(tile_m=32, pool_splits=8),
            "wait-tile32": _setting(early=False, tile_m=32), "wait-splits8": _setting(early=False, pool_splits=8),
            "wait-splits2": _setting(early=False, pool_splits=2),
            "wait-tile32-splits8": _setting(early=False, tile_m=32, pool_splits=8),
            "biases-apart": _setting(packed_biases=False)}


def apply(setting: str) -> None:
    from l2pd.models import decoder

    s = SETTINGS[setting]
    skinny.pick_config, skinny.pick_config_fp8, skinny.pick_split = s["picks"]
    decoder.FUSED_ROPE, skinny.TMA, skinny.pick_tma = s["fused_rope"], s["tma"], s["pick_tma"]
    device.EARLY, device.LATE, moe.TMA = s["early"], set(s["late"]), s["moe_tma"]
    attention.META_FIRST, decoder._ROUTER_KERNEL, decoder.MOE_NORM = s["meta_first"], s["router_kernel"], s["moe_norm"]
    attention.POOL_GQ, attention._TILE_M_ENV, attention.POOL_SPLITS = s["pool_gq"], s["tile_m"], s["pool_splits"]
    decoder.PACKED_BIASES = s["packed_biases"]


@torch.no_grad()
def family(name: str, weights: str, settings: list[str], repeats: int, batch: int = 1, tpf: int = 1) -> list[dict]:
    model = build_shape(name, weights)
    refresh = "window" if name == "llada2-mini" else "full"
    runs = alternate(model, settings, apply, repeats, tpf, refresh, batch=batch)
    rows = []
    for setting in settings:
        row = {"family": name, "weights": weights, "setting": setting, "refresh": refresh, "batch": batch, "tpf": tpf,
               **summary(runs, setting, settings[0])}
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs")} | {
            "replay_runs": [round(x, 4) for x in row["replay_runs"]],
            "generate_runs": [round(x, 3) for x in row["generate_runs"]]}), flush=True)
        rows.append(row)
    apply("now")
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--families", default="8b,llada2-mini", help="comma list: 8b, llada2-mini, dream-7b")
    ap.add_argument("--weights", choices=["bf16", "w8a8", "fp8"], default="bf16")
    ap.add_argument("--settings", default="before,now", help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="rows of the iteration and of each decode (default 1)")
    ap.add_argument("--tpf", type=int, default=1, help="tokens per forward that `steps` forces (default 1)")
    args = ap.parse_args()
    settings = args.settings.split(",")
    if bad := [s for s in settings if s not in SETTINGS]:
        ap.error(f"unknown settings {bad}")
    result = {**run_info(), "floors": floors(), "settings": settings, "weights": args.weights}
    result["rows"] = [r for fam in args.families.split(",")
                      for r in family(fam, args.weights, settings, args.repeats, args.batch, args.tpf)]
    save(args.out, result)


if __name__ == "__main__":
    main()
