"""The learned decoder trained on its own states against every tuned training-free rule, chosen on validation
problems and scored on held-out test problems, all with EoTP.

    python benchmarks/learned_decoder.py --model runs/model-hard --level hard --out runs/learned
    python benchmarks/learned_decoder.py --model runs/model-hard --level hard --blocks 64 --rounds 2 \
        --train-prompts 2000 --val-problems 500 --test-problems 1000 --out runs/learned

Per block length:
1. Round 0: ``collect`` the states of a fast threshold decode (``--behaviour``), each labelled on its own path
   (``--labels rollout:TAU``: the guess against what a careful threshold decode continuing from that state
   writes), and train a shared filter on them.
   Each filter kind (``--kinds``: shared, history) is its own chain from there.
2. DAgger rounds 1..R: collect the current filter's own decodes (``learn2pd:TAU`` at ``--dagger-tau``) with
   the same labels, train a new filter on every round's data.
3. Sweep the validation problems: ``steps``, the training-free rules (``--rules``: threshold, margin,
   persistence) at ``--taus``, each round's filter at ``--filter-taus``.

Then, for every method, the rule picks its configuration on validation (fewest forwards within ``--within``
points of the best ``steps`` there, tau and block length free), and the test problems score the picks and
every configuration (the full test frontier is written too). Rows: ``val.jsonl``, ``test.jsonl``; summary:
``summary.json`` (picks, their test figures, collection and training records).
"""

import argparse
import json
import os
import time

import torch

from l2pd.collect import collect
from l2pd.demo.task import split
from l2pd.demo.tokenizer import prompt_text
from l2pd.sweep import aup_rows, format_aup, format_rows, pareto
from l2pd.sweep import sweep as run_sweep
from l2pd.train import train_filter

try:
    from filter_frontier import load_model
except ImportError:  # run from the repository root
    from benchmarks.filter_frontier import load_model

RULES = ("threshold", "margin", "persistence")
VAL_OFFSET = 900_000_000  # validation problems: training-split seeds no collection or model training uses
RL_OFFSET = 800_000_000  # the policy gradient's prompts: another range of unused training seeds


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--level", choices=["base", "hard"], default="hard")
    ap.add_argument("--blocks", default="64")
    ap.add_argument("--behaviour", default="threshold:0.9", help="round 0's recorded decode")
    ap.add_argument("--labels", default="rollout:0.998", help="labels of every round (see l2pd collect --labels)")
    ap.add_argument("--rounds", type=int, default=2, help="DAgger rounds after round 0")
    ap.add_argument("--dagger-tau", type=float, default=0.9, help="tau of the filter's own decodes in DAgger")
    ap.add_argument("--train-prompts", type=int, default=2000, help="collection prompts per round")
    ap.add_argument("--val-problems", type=int, default=500)
    ap.add_argument("--test-problems", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--hidden", type=int, default=32, help="the filters' hidden width")
    ap.add_argument("--kinds", default="shared,history",
                    help="filter kinds, each its own DAgger chain: shared (a snapshot of the softmax and the block) "
                         "and history (also each guess's run length, previous confidence and change); reinforce: "
                         "a history filter trained by policy gradient on its own decodes (l2pd.reinforce), from a "
                         "confidence threshold or from --reinforce-init")
    ap.add_argument("--reinforce-init", default=None,
                    help="start the policy gradient from this chain's filter (e.g. history-r1) instead of a threshold")
    ap.add_argument("--rl-cost", type=float, default=0.01, help="reward per decode: correct - cost * forwards")
    ap.add_argument("--rl-iterations", type=int, default=150)
    ap.add_argument("--rl-prompts", type=int, default=64, help="prompts per policy-gradient iteration")
    ap.add_argument("--rl-samples", type=int, default=8, help="decodes per prompt (the baseline is their mean)")
    ap.add_argument("--rl-tau", type=float, default=0.5, help="the policy's operating tau")
    ap.add_argument("--rl-temperature", type=float, default=0.25)
    ap.add_argument("--rl-taus", default="0.2,0.35,0.5,0.65,0.8", help="the policy-gradient filter's taus to sweep")
    ap.add_argument("--rl-lr", type=float, default=1e-3)
    ap.add_argument("--rl-start", type=float, default=0.98, help="the confidence threshold the policy starts as")
    ap.add_argument("--rules", default=",".join(RULES), help="training-free rules to sweep")
    ap.add_argument("--taus", default="0.9,0.95,0.98,0.99,0.995,0.998,0.999", help="training-free rules' taus")
    ap.add_argument("--filter-taus", default="0.5,0.7,0.8,0.9,0.95,0.98,0.99", help="filters' taus")
    ap.add_argument("--within", type=float, default=1.0, help="points below the best steps a pick may lose")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    return ap.parse_args()


def configs(strategy: str, taus: list[float], block: int) -> list[dict]:
    return [dict(strategy=strategy, threshold=t, eotp="accepted", block_length=block, cache="none") for t in taus]


def pick(rows: list[dict], within: float, methods: list[str]) -> dict:
    """The selection rule: per method, the fewest forwards within ``within`` points of the best steps."""
    best = max(r["accuracy"] for r in rows if r["strategy"] == "steps")
    out = {"best_steps": best}
    for m in methods:
        ok = [r for r in rows if r["strategy"] == m and 100 * r["accuracy"] >= 100 * best - within]
        out[m] = min(ok, key=lambda r: (r["mean_nfe"], -r["accuracy"])) if ok else None
    return out


def scored_picks(picks: dict, test_rows: list[dict], methods: list[str], keys: dict[str, str]) -> dict:
    """Each method's pick with the test figures of the same configuration (rows equal on ``keys``' fields;
    ``keys`` maps the summary's name of a field to the row's)."""
    out = {}
    for m in methods:
        p = picks[m]
        if p is None:
            out[m] = None
            continue
        t = next(r for r in test_rows if r["strategy"] == m and all(r.get(f) == p.get(f) for f in keys.values()))
        out[m] = {**{name: p.get(f) for name, f in keys.items()}, "val_accuracy": p["accuracy"],
                  "val_forwards": p["mean_nfe"], "test_accuracy": t["accuracy"], "test_stderr": t["stderr"],
                  "test_forwards": t["mean_nfe"]}
    return out


def print_picks(chosen: dict, within: float) -> None:
    print(f"\npicks (within {within} points of the best steps on validation), scored on test:")
    for m, c in chosen.items():
        setting = "none" if c is None else " ".join(f"{k} {v}" for k, v in c.items() if not k.startswith(
            ("val_", "test_")))
        print(f"  {m:<14}{setting}" + ("" if c is None else
                                       f": val {100 * c['val_accuracy']:.1f}% at {c['val_forwards']:.2f}; test "
                                       f"{100 * c['test_accuracy']:.1f} +- {100 * c['test_stderr']:.1f}% at "
                                       f"{c['test_forwards']:.2f}"))


def train_rounds(model, tok, args, block: int, kind: str, info: dict) -> dict:
    """Round 0 and the DAgger rounds of one filter kind at one block length: {name: filter}. Round 0's
    collection (a threshold's states) is shared by every kind."""
    train_split = "train" if args.level == "base" else "hard-train"
    filters, folders, flt = {}, [], None
    for r in range(args.rounds + 1):
        # each round its own prompts (DAgger aggregates fresh trajectories)
        qs = [p.question for p in split(train_split, args.train_prompts, offset=r * args.train_prompts)]
        prompts = tok([prompt_text(tok, q) for q in qs], add_special_tokens=False).input_ids
        folder = os.path.join(args.out, f"collect{block}-r0" if r == 0 else f"collect{block}-{kind}-r{r}")
        policy = args.behaviour if r == 0 else f"learn2pd:{args.dagger_tau}"
        t0 = time.time()
        stats = collect(model, prompts, folder, gen_length=args.max_new_tokens, block_length=block,
                        batch_size=250, shard_size=500, progress=False, policy=policy, labels=args.labels,
                        filter=flt)
        seconds = round(time.time() - t0, 1)
        folders.append(folder)
        t0 = time.time()
        flt = train_filter(folders, hidden=args.hidden, depth=1, max_epochs=3000, threshold=args.dagger_tau,
                           device="cuda" if torch.cuda.is_available() else "cpu", seed=0, kind=kind,
                           log=lambda *a: None)
        flt.meta["eotp"] = "accepted"
        name = f"{kind}-r{r}"
        flt.save_pretrained(os.path.join(args.out, f"{name}-block{block}"))
        filters[name] = flt
        info[f"block{block}"][name] = {"policy": policy, "collect_seconds": seconds, "shards": stats["shards"],
                                       "train_seconds": round(time.time() - t0, 1), "val_loss": flt.meta["val_loss"],
                                       "train_rows": flt.meta["train_rows"],
                                       "positive_rate": flt.meta["positive_rate"]}
        print(f"block {block} {name}: " + json.dumps(info[f"block{block}"][name]), flush=True)
    return filters


def train_reinforce(model, tok, args, block: int, init, info: dict) -> dict:
    """The policy-gradient filter at one block length, on its own hard-train (or train) prompts."""
    from l2pd.reinforce import train_policy

    train_split = "train" if args.level == "base" else "hard-train"
    problems = split(train_split, args.rl_iterations * args.rl_prompts, offset=RL_OFFSET)
    t0 = time.time()
    flt = train_policy(model, tok, problems, init, block_length=block, gen_length=args.max_new_tokens,
                       tau=args.rl_tau, cost=args.rl_cost, samples=args.rl_samples, prompts_per_step=args.rl_prompts,
                       iterations=args.rl_iterations, lr=args.rl_lr, temperature=args.rl_temperature,
                       hidden=args.hidden, start_confidence=args.rl_start, progress=False,
                       log=lambda m: print(f"block {block} reinforce: {m}", flush=True))
    flt.save_pretrained(os.path.join(args.out, f"reinforce-block{block}"))
    info[f"block{block}"]["reinforce"] = {"init": args.reinforce_init or f"threshold {args.rl_start}",
                                          "train_seconds": round(time.time() - t0, 1), "curve": flt.meta["curve"]}
    return {"reinforce": flt}


def sweep_all(model, tok, problems, args, block: int, filters: dict, tag: str) -> list[dict]:
    """Every configuration at one block length; rows are appended to ``rows-TAG-*.jsonl`` as they finish
    (a rerun resumes from them)."""
    taus = [float(t) for t in args.taus.split(",")]
    ftaus = [float(t) for t in args.filter_taus.split(",")]
    kw = dict(batch_size=args.batch, progress=False, max_new_tokens=args.max_new_tokens)
    base = [dict(strategy="steps", threshold=None, eotp="off", block_length=block, cache="none")]
    rules = [r for r in args.rules.split(",") if r]
    rows = run_sweep(model, tok, problems, base + [c for rule in rules for c in configs(rule, taus, block)],
                     out=os.path.join(args.out, f"rows-{tag}-block{block}-rules.jsonl"), **kw)
    for name, flt in filters.items():
        taus = [float(t) for t in args.rl_taus.split(",")] if name == "reinforce" else ftaus
        for r in run_sweep(model, tok, problems, configs("learn2pd", taus, block), filters={block: flt},
                           out=os.path.join(args.out, f"rows-{tag}-block{block}-{name}.jsonl"), **kw):
            rows.append({**r, "strategy": name})
    print(f"{tag} block {block}: {len(rows)} rows", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dev)
    blocks = [int(b) for b in args.blocks.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in ("shared", "history", "reinforce") for k in kinds) or \
            any(r not in RULES for r in args.rules.split(",") if r):
        raise SystemExit(f"--kinds {args.kinds!r} / --rules {args.rules!r}: expected shared,history,reinforce / "
                         f"{RULES}")
    if args.reinforce_init and args.reinforce_init.split("-r")[0] not in kinds:
        raise SystemExit(f"--reinforce-init {args.reinforce_init!r}: its chain is not among --kinds {args.kinds!r}")
    val_split, test_split = ("train", "test") if args.level == "base" else ("hard-train", "hard-test")
    val = split(val_split, args.val_problems, offset=VAL_OFFSET)
    test = split(test_split, args.test_problems)
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "model": args.model or "bundled", **{k: v for k, v in vars(args).items() if k != "out"}}
    val_rows, all_filters = [], {}
    for block in blocks:
        info[f"block{block}"] = {}
        filters = {}
        for kind in kinds:
            if kind != "reinforce":
                filters.update(train_rounds(model, tok, args, block, kind, info))
        if "reinforce" in kinds:
            filters.update(train_reinforce(model, tok, args, block, filters.get(args.reinforce_init), info))
        all_filters[block] = filters
        val_rows += sweep_all(model, tok, val, args, block, filters, "val")
    methods = [r for r in args.rules.split(",") if r] + list(all_filters[blocks[0]])
    picks = pick(val_rows, args.within, methods)
    test_rows = []
    for block in blocks:
        test_rows += sweep_all(model, tok, test, args, block, all_filters[block], "test")
    for rows, name in ((val_rows, "val"), (test_rows, "test")):
        aup_rows(pareto(rows))
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    chosen = scored_picks(picks, test_rows, methods, {"tau": "threshold", "block": "block_length"})
    info["picks"] = chosen
    info["best_steps"] = {"val": picks["best_steps"],
                          "test": max(r["accuracy"] for r in test_rows if r["strategy"] == "steps")}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(info, f, indent=1)
    print("\nvalidation\n" + format_rows(val_rows) + "\n" + format_aup(val_rows))
    print("\ntest\n" + format_rows(test_rows) + "\n" + format_aup(test_rows))
    print_picks(chosen, args.within)


if __name__ == "__main__":
    main()
