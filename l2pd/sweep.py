"""The accuracy / forwards frontier of decoding configurations, and the choice of a filter's operating point.

``sweep`` decodes a problem set under a grid of (strategy, tau, EoTP mode, block length, cache), one row per
configuration (accuracy with its standard error, mean forwards per answer, answer tokens/s, wall time),
appended to a JSONL file as each finishes so that a rerun resumes; ``pareto`` marks the rows that no other
row beats on both accuracy and forwards; ``plot`` draws the frontier (matplotlib, ``pip install
'l2pd[plot]'``). ``tune`` picks a filter's tau on validation problems by a stated rule and stores it, with
its figures, in the filter.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from .evaluate import evaluate
from .spec import rule_name

CONFIG_KEYS = ("strategy", "threshold", "eotp", "block_length", "cache", "persist")
VAL_OFFSET = 900_000_000  # validation problems: the training split's seeds far above any training prompt


@dataclass
class Item:
    """A problem of a sweep: the question and the reference answer its checker compares against."""
    question: str
    answer: Any


def _hash_number(text: str, answer: Any) -> bool:
    from .demo.task import is_correct

    return is_correct(text, int(answer))


def _last_number(text: str, answer: Any) -> bool:
    nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return bool(nums) and float(nums[-1]) == float(answer)


CHECKERS: dict[str, Callable[[str, Any], bool]] = {
    "hash-number": _hash_number,  # the integer after "####" (GSM8K style; the bundled task)
    "last-number": _last_number,  # the last number in the answer
    "exact": lambda text, answer: text.strip() == str(answer).strip(),
    "contains": lambda text, answer: str(answer) in text,
}


def load_problems(path: str) -> list[Item]:
    """A JSONL file of ``{"prompt": ..., "answer": ...}`` objects."""
    from .files import read_prompt_objects

    items = []
    for obj in read_prompt_objects(path, "problems file"):
        if "answer" not in obj:
            raise ValueError(f'{path} line {obj["_line"]}: a sweep needs an "answer" next to the "prompt"')
        items.append(Item(obj["prompt"], obj["answer"]))
    return items


def grid(strategies: list[str], taus: list[float], eotps: list[str], blocks: list[int],
         caches: list[str], persists: list[int] = (2,)) -> list[dict[str, Any]]:
    """Every configuration: ``steps`` has no tau; the other strategies take each tau, ``persistence`` each
    tau at each run length in ``persists``."""
    out = []
    for strategy, eotp, block, cache in itertools.product(strategies, eotps, blocks, caches):
        for tau in ([None] if strategy == "steps" else taus):
            for persist in (persists if strategy == "persistence" else [None]):
                out.append(dict(strategy=strategy, threshold=tau, eotp=eotp, block_length=block, cache=cache,
                                persist=persist))
    return out


def _key(config: dict[str, Any]) -> str:
    return json.dumps({k: config.get(k) for k in (*CONFIG_KEYS, "filter")}, sort_keys=True)


def problems_hash(problems: list[Any]) -> str:
    """A content hash of a problem set (questions and reference answers), whatever file or split it came from."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.question, str(p.answer)]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def sweep_settings(model: Any, problems: list[Any], max_new_tokens: int, checker: str) -> dict[str, Any]:
    """What every row of a sweep shares and its figures depend on: a rerun resumes only over the same."""
    from .filter import model_fingerprint

    settings = {"problems": len(problems), "problems_sha256": problems_hash(problems),
                "model_fingerprint": model_fingerprint(model), "max_new_tokens": max_new_tokens, "checker": checker}
    quantized = vars(model).get("_l2pd_quantized")  # l2pd.quantize keeps the fingerprint: its rows differ
    if quantized:
        settings["weights"] = quantized
    if vars(model).get("_l2pd_kv_cache") == "fp8":
        settings["kv_cache"] = "fp8"
    return settings


def read_rows(out: str, settings: dict[str, Any]) -> dict[str, dict]:
    """The rows of an earlier run of the same sweep in ``out``, by configuration; a ValueError naming what
    differs when they were made with other settings."""
    done: dict[str, dict] = {}
    with open(out, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{out} line {lineno}: not valid JSON ({exc.msg}); use another --out or pass "
                                 "--overwrite") from None
            old = row.get("settings") if isinstance(row, dict) else None
            if old is None:
                raise ValueError(f"{out} holds rows that do not record their settings (problems, model, length); "
                                 "use another --out or pass --overwrite")
            if old != settings:
                diff = ", ".join(f"{k} {old.get(k)} -> {settings[k]}" for k in settings if old.get(k) != settings[k])
                raise ValueError(f"{out} holds rows of another sweep ({diff}); use another --out or pass "
                                 "--overwrite")
            done[_key(row)] = row
    return done


def sweep(model: Any, tokenizer: Any, problems: list[Any], configs: list[dict[str, Any]], out: str | None = None,
          filters: dict[int, Any] | None = None, batch_size: int = 1, max_new_tokens: int = 256,
          checker: str = "hash-number", progress: bool = True, log: Callable[[str], None] = print,
          resume: bool = True) -> list[dict]:
    """Decode ``problems`` under each configuration; rows already in ``out`` (JSONL) are kept, not rerun.

    Every row records the sweep's settings (the problems' count and content hash, the model's fingerprint,
    ``max_new_tokens``, the checker) and learn2pd rows their filter's digest; rows in ``out`` made with other
    settings are refused (``resume=False`` starts ``out`` afresh). ``filters`` maps a block length to the
    filter for ``learn2pd`` at that length (default: the patched filter, at its own block length); learn2pd
    configurations without one are skipped with a note.
    """
    if checker not in CHECKERS:
        raise ValueError(f"checker {checker!r}: expected one of {sorted(CHECKERS)}")
    if not problems:
        raise ValueError("no problems to sweep over")
    filters = dict(filters or {})
    patched = getattr(model, "l2pd_filter", None)
    if patched is not None:
        filters.setdefault(patched.block_length, patched)
    settings = sweep_settings(model, problems, max_new_tokens, checker)
    done = read_rows(out, settings) if out and resume and os.path.exists(out) else {}
    fresh = bool(out) and not resume
    rows = []
    for i, config in enumerate(configs):
        flt = filters.get(config["block_length"]) if config["strategy"] == "learn2pd" else None
        config = {**config, "filter": flt.digest() if flt is not None else None}
        key = _key(config)
        if key in done:
            rows.append(done[key])
            continue
        if config["strategy"] == "learn2pd" and flt is None:
            log(f"note: no filter for block length {config['block_length']}; skipped {key}")
            continue
        kw = {k: v for k, v in config.items() if v is not None and k != "filter"}
        r = evaluate(model, tokenizer, problems, batch_size=batch_size, progress=progress,
                     desc=f"sweep {i + 1}/{len(configs)}", max_new_tokens=max_new_tokens, filter=flt,
                     checker=CHECKERS[checker], **kw)
        n, acc = r["problems"], r["accuracy"]
        row = {**{k: config.get(k) for k in (*CONFIG_KEYS, "filter")}, "problems": n, "accuracy": acc,
               "stderr": math.sqrt(acc * (1 - acc) / n) if n else float("nan"), "mean_nfe": r["mean_nfe"],
               "answer_tokens": r.get("answer_tokens"),
               "tokens_per_forward": (r["answer_tokens"] / (r["mean_nfe"] * n)
                                      if n and r["mean_nfe"] and r.get("answer_tokens") else None),
               "tokens_per_s": r["tokens_per_s"], "seconds": r["seconds"], "max_new_tokens": max_new_tokens,
               "settings": settings}
        rows.append(row)
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w" if fresh else "a") as f:
                f.write(json.dumps(row) + "\n")
            fresh = False
    rows = pareto(rows)
    aup_rows(rows)  # each row gets its rule's AUP
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """Rows with ``pareto`` set: no other row is at least as accurate with at most as many forwards and
    better on one of the two."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["accuracy"] >= r["accuracy"] and o["mean_nfe"] <= r["mean_nfe"]
            and (o["accuracy"] > r["accuracy"] or o["mean_nfe"] < r["mean_nfe"]) for o in rows)
    return rows


def aup(points: list[tuple[float, float]], y_max: float, alpha: float = 3.0, drop: float = 5.0) -> float:
    """Accuracy under parallelism (d3LLM's AUP) of (tokens per forward, accuracy in %) points.

    Points are sorted by tokens per forward; those more than ``drop`` points below the least parallel one
    are left out; the rest are weighted by W(y) = min(exp(-alpha (1 - y / y_max)), 1), which discounts
    accuracy lost against ``y_max`` (the best accuracy among everything compared), and the area under W(y) y
    is taken from 0 (the first point's value held from 0 to its tokens per forward, then trapezoids).
    Compare AUPs only when they share ``y_max`` (one sweep).
    """
    if not points or y_max <= 0:
        raise ValueError("AUP needs at least one point and a positive y_max")
    pts = sorted(points)
    pts = [(r, y) for r, y in pts if y >= pts[0][1] - drop]

    def w(y: float) -> float:
        return min(math.exp(-alpha * (1 - y / y_max)), 1.0) * y

    area = pts[0][0] * w(pts[0][1])
    for (r0, y0), (r1, y1) in zip(pts, pts[1:]):
        area += (r1 - r0) * (w(y0) + w(y1)) / 2
    return area


def aup_rows(rows: list[dict]) -> list[dict]:
    """AUP per rule (strategy, persist, EoTP, block, cache) over its taus, best first; rows without
    tokens per forward (written before it was recorded) are left out."""
    usable = [r for r in rows if r.get("tokens_per_forward")]
    if not usable:
        return []
    y_max = 100 * max(r["accuracy"] for r in usable)
    if y_max <= 0:  # nothing correct: no accuracy to weigh
        return []
    groups: dict[tuple, list[dict]] = {}
    for r in usable:
        groups.setdefault((r["strategy"], r.get("persist"), r["eotp"], r["block_length"], r["cache"]), []).append(r)
    out = []
    for k, g in groups.items():
        value = aup([(r["tokens_per_forward"], 100 * r["accuracy"]) for r in g], y_max)
        for r in g:
            r["aup"] = value
        out.append({"strategy": k[0], "persist": k[1], "eotp": k[2], "block_length": k[3], "cache": k[4],
                    "points": len(g), "aup": value})
    return sorted(out, key=lambda a: -a["aup"])


def format_aup(rows: list[dict]) -> str:
    table = aup_rows(rows)
    if not table:
        return ""
    lines = ["AUP (accuracy under parallelism over each rule's taus; tokens per forward x weighted accuracy, "
             "higher is better; y_max = this sweep's best accuracy):"]
    for a in table:
        name = rule_name(a)
        lines.append(f"  {name:<14}{a['eotp']:>10}{a['block_length']:>7}{a['cache']:>8}  {a['aup']:>9.1f}"
                     f"  ({a['points']} point{'s' if a['points'] > 1 else ''})")
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    head = (f"{'strategy':<14}{'tau':>7}{'eotp':>10}{'block':>7}{'cache':>8}{'problems':>10}{'accuracy':>17}"
            f"{'forwards':>10}{'tok/s':>9}  frontier")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["mean_nfe"], -r["accuracy"])):
        tau = "" if r["threshold"] is None else f"{r['threshold']:g}"
        acc = f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}%"
        name = rule_name(r)
        lines.append(f"{name:<14}{tau:>7}{r['eotp']:>10}{r['block_length']:>7}{r['cache']:>8}"
                     f"{r['problems']:>10}{acc:>17}{r['mean_nfe']:>10.2f}{r['tokens_per_s']:>9.0f}  "
                     f"{'*' if r.get('pareto') else ''}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against forwards per answer (log scale), one curve per (strategy, EoTP, block, cache),
    the Pareto frontier circled."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'l2pd[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["strategy"], r["eotp"], r["block_length"], r["cache"]), []).append(r)
    # colour: block length (and cache); line and marker: strategy, so that many series stay readable
    colour_keys = sorted({(k[2], k[3]) for k in series})
    palette = plt.get_cmap("tab10")
    styles = {"threshold": ("-", "o"), "steps": ("", "s"), "learn2pd": ("--", "^")}
    others = [(":", "D"), ("-.", "v"), ((0, (1, 3)), "P"), ((0, (5, 1)), "X")]  # labelled variants, in name order
    for n, name in enumerate(sorted({k[0] for k in series} - set(styles))):
        styles[name] = others[n % len(others)]
    for (strategy, eotp, block, cache), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["mean_nfe"])
        label = f"{strategy}{' + EoTP' if eotp != 'off' else ''}, block {block}" + (f", {cache}" if cache != "none"
                                                                                     else "")
        line, marker = styles[strategy]
        ax.errorbar([r["mean_nfe"] for r in rs], [100 * r["accuracy"] for r in rs],
                    yerr=[100 * r["stderr"] for r in rs], marker=marker, ms=4, capsize=2, label=label, ls=line,
                    color=palette(colour_keys.index((block, cache)) % 10))
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["mean_nfe"])
    ax.plot([r["mean_nfe"] for r in front], [100 * r["accuracy"] for r in front], "k--", lw=1, label="frontier")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter

    lo, hi = min(r["mean_nfe"] for r in rows), max(r["mean_nfe"] for r in rows)
    ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024) if lo / 1.2 <= t <= hi * 1.2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("forwards per answer (log)")
    ax.set_ylabel("accuracy (%)")
    counts = sorted({r["problems"] for r in rows})
    ax.set_title(f"{' / '.join(map(str, counts))} problems per point (error bars: one standard error)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pick(rows: list[dict], steps_accuracy: float, budget: float) -> dict:
    """The row with the fewest forwards within ``budget`` points of ``steps_accuracy`` (ties: the more
    accurate); if none is, the most accurate. ``within_budget`` says which."""
    ok = [r for r in rows if 100 * r["accuracy"] >= 100 * steps_accuracy - budget - 1e-9]
    if ok:
        return {**min(ok, key=lambda r: (r["mean_nfe"], -r["accuracy"])), "within_budget": True}
    return {**max(rows, key=lambda r: (r["accuracy"], -r["mean_nfe"])), "within_budget": False}


def choose(rows: list[dict], budget: float = 0.5) -> dict[str, dict]:
    """The stated rule over a sweep's rows: per rule (strategy, and persistence's run length) the
    configuration with the fewest forwards per answer within ``budget`` points of the most accurate ``steps``
    row, over every tau, block length, EoTP mode and cache swept; ``"overall"`` is the best of those picks.
    A rule none of whose rows is within the budget contributes its most accurate row, marked
    ``within_budget: False``, and is chosen overall only when no rule qualifies."""
    steps = [r for r in rows if r["strategy"] == "steps"]
    if not steps:
        raise ValueError("choosing needs a `steps` row to measure the budget from")
    best = max(r["accuracy"] for r in steps)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["strategy"] != "steps":
            groups.setdefault(rule_name(r), []).append(r)
    if not groups:
        raise ValueError("no rows other than `steps` to choose from")
    picks = {name: {**_pick(g, best, budget), "steps_accuracy": best} for name, g in sorted(groups.items())}
    picks["overall"] = min(picks.values(), key=lambda r: (not r["within_budget"],
                                                         r["mean_nfe"] if r["within_budget"] else -r["accuracy"],
                                                         -r["accuracy"]))
    return picks


def tune(model: Any, tokenizer: Any, flt: Any, problems: list[Any], taus: list[float], eotp: str = "accepted",
         budget: float = 0.5, cache: str = "none", batch_size: int = 1, max_new_tokens: int = 256,
         checker: str = "hash-number", progress: bool = True, rules: list[str] = (), blocks: list[int] = (),
         persists: list[int] = (2,), out: str | None = None) -> dict[str, Any]:
    """Choose ``flt``'s tau, and the model's default decoding, on validation ``problems`` by the stated rule
    (``choose``): the fewest forwards per answer within ``budget`` points of the best ``steps`` row.

    learn2pd runs at the filter's block length over ``taus``; each training-free rule in ``rules``
    (threshold, margin, persistence) over the same taus at each of ``blocks`` (default: the filter's), and
    ``steps`` at every block length swept. ``flt.threshold`` becomes learn2pd's own pick (if none is within
    the budget, its most accurate tau) and ``flt.meta['eotp']`` the EoTP mode; ``operating_point['default']``
    is the overall pick, which decoding without a strategy uses (``l2pd.generate``, the engine, the CLI):
    learn2pd, or a training-free rule when one needs fewer forwards. The rule, every row and the picks go to
    ``flt.meta['operating_point']`` (filter.json, by ``save_pretrained``); ``out`` keeps the rows as a
    sweep does, so that a rerun resumes."""
    if not 0 <= budget <= 100:
        raise ValueError(f"budget={budget} must be in [0, 100] accuracy points")
    unknown = sorted(set(rules) - {"threshold", "margin", "persistence"})
    if unknown:
        raise ValueError(f"rules {unknown}: expected training-free rules among threshold, margin, persistence")
    block = flt.block_length
    blocks = sorted(set(blocks or [block]))
    configs = grid(["steps"], [], ["off"], sorted(set(blocks) | {block}), [cache])
    configs += grid(["learn2pd"], taus, [eotp], [block], [cache])
    configs += grid(list(rules), taus, [eotp], blocks, [cache], persists)
    rows = sweep(model, tokenizer, problems, configs, out=out, filters={block: flt}, batch_size=batch_size,
                 max_new_tokens=max_new_tokens, checker=checker, progress=progress, log=lambda s: None)
    picks = choose(rows, budget)
    own, best = picks["learn2pd"], picks["overall"]
    flt.threshold = float(own["threshold"])
    flt.meta["eotp"] = eotp
    keys = ("strategy", "threshold", "block_length", "eotp", "persist")
    flt.meta["operating_point"] = {
        "rule": f"fewest forwards within {budget} points of steps on {len(problems)} validation problems"
                + ("" if own["within_budget"] else " (none qualified: the most accurate tau)"),
        "tau": flt.threshold, "eotp": eotp, "block_length": block, "cache": cache, "max_new_tokens": max_new_tokens,
        "problems": len(problems), "problems_sha256": problems_hash(problems), "checker": checker,
        "steps_accuracy": own["steps_accuracy"], "accuracy": own["accuracy"], "mean_nfe": own["mean_nfe"],
        "candidates": [{k: r[k] for k in ("threshold", "accuracy", "stderr", "mean_nfe")}
                       for r in rows if r["strategy"] == "learn2pd"],
        "default": {k: best[k] for k in keys if best.get(k) is not None},
        "picks": {name: {k: r[k] for k in (*keys, "cache", "accuracy", "stderr", "mean_nfe", "within_budget")
                         if r.get(k) is not None} for name, r in picks.items() if name != "overall"},
    }
    return flt.meta["operating_point"]
