"""Do the hidden states say more than the softmax about which guesses are right? Probes on the states of a fast
threshold decode, each trained to predict whether a masked position's guess equals what a careful decode of the
same prompt writes there, from: the confidence alone, the history filter's inputs, and those inputs plus the
final hidden state at the position (what the LM head reads).

    PYTHONPATH=. python benchmarks/studies/hidden_probe.py --model runs/model-hard --level hard

Per prompt: the careful decode is ``generate`` with threshold ``--careful`` + EoTP; the recorded decode is a
threshold ``--behaviour`` + EoTP decode (``l2pd.reinforce.decode_states``, ``generate``'s rule), with the
hidden states taken from the LM head's input. Probes (one hidden layer of 64, full-batch Adam, early stopping
on a tenth of the training positions) train on the positions of the first ``--train`` prompts and are scored
on the others: the ROC AUC, and the recall of right guesses at the thresholds where 99% and 99.5% of the
accepted guesses are right.
If adding the hidden state raises that recall a lot, a filter that reads hidden states has room; if not,
it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from filter_frontier import load_model  # noqa: E402

import l2pd.models.decoder as decoder  # noqa: E402
from l2pd.decode import generate  # noqa: E402
from l2pd.demo.task import split  # noqa: E402
from l2pd.evaluate import encode_prompts  # noqa: E402
from l2pd.models import adapter_for  # noqa: E402
from l2pd.reinforce import decode_states  # noqa: E402
from l2pd_kernels.reference import HISTORY_FEATURES  # noqa: E402


def capture_head_input(head) -> list:
    """The LM head's input of every forward (the final hidden states), kept in a list."""
    seen: list = []
    lin = decoder._lin

    def wrapped(ops, x, layer, *a, **k):
        if layer is head:
            seen.append(x)
        return lin(ops, x, layer, *a, **k)

    decoder._lin = wrapped
    return seen


@torch.no_grad()
def record(adapter, ids, mask, reference, seen, block: int, gen: int, tau: float) -> dict:
    """A threshold decode of left-padded prompts; per masked position of every forward: the history inputs,
    the hidden state, and whether the guess equals ``reference`` [N, P + gen] there."""
    out = {"x": [], "h": [], "y": [], "row": []}

    def observe(rows, b0, token, x, masked):
        hidden = seen[-1][:, b0 - adapter.shift : b0 - adapter.shift + block].float()
        seen.clear()
        out["x"].append(x[masked])
        out["h"].append(hidden[masked])
        out["y"].append((token == reference[rows, b0 : b0 + block])[masked])
        out["row"].append(rows[:, None].expand(-1, block)[masked])

    decode_states(adapter, ids, mask, lambda x, prob: prob > tau, block, gen, observe)
    return {k: torch.cat(v) for k, v in out.items()}


def train_probe(x, y, val_x, val_y, epochs: int = 600, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    best, state, since = float("inf"), None, 0
    for _ in range(epochs):
        loss = F.binary_cross_entropy_with_logits(net((x - mu) / sd)[:, 0], y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            v = float(F.binary_cross_entropy_with_logits(net((val_x - mu) / sd)[:, 0], val_y.float()))
        if v < best - 1e-5:
            best, state, since = v, {k: t.clone() for k, t in net.state_dict().items()}, 0
        elif (since := since + 1) >= 50:
            break
    net.load_state_dict(state)
    return lambda z: net((z - mu) / sd)[:, 0]


def scores(logit: torch.Tensor, y: torch.Tensor) -> dict:
    """ROC AUC, and the recall of right guesses where the accepted ones are at least 99% / 99.5% right."""
    order = logit.argsort(descending=True)
    ys = y[order].float()
    tp, fp = ys.cumsum(0), (1 - ys).cumsum(0)
    pos, neg = ys.sum(), (1 - ys).sum()
    auc = float(((1 - ys) * tp).sum() / (pos * neg))  # share of (right, wrong) pairs ranked right first
    precision = tp / (tp + fp)
    out = {"auc": round(auc, 4)}
    for p in (0.99, 0.995):
        ok = (precision >= p).nonzero()
        out[f"recall_at_{p}"] = round(float(tp[ok[-1, 0]] / pos), 4) if len(ok) else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--level", choices=["base", "hard"], default="hard")
    ap.add_argument("--prompts", type=int, default=1500)
    ap.add_argument("--train", type=int, default=1000, help="prompts whose positions train the probes")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--behaviour", type=float, default=0.9, help="the recorded decode's threshold")
    ap.add_argument("--careful", type=float, default=0.998, help="the reference decode's threshold")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--out", default=None, help="JSON with the figures")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dev)
    adapter = adapter_for(model)
    seen = capture_head_input(adapter.decoder.head)
    problems = split("train" if args.level == "base" else "hard-train", args.prompts, offset=700_000_000)
    parts = []
    for i in range(0, len(problems), args.batch):
        ids, mask = encode_prompts(tok, [p.question for p in problems[i : i + args.batch]], dev)
        ref = generate(model, ids, mask, max_new_tokens=args.gen, block_length=args.block, strategy="threshold",
                       threshold=args.careful, eotp="accepted")
        seen.clear()
        got = record(adapter, ids, mask, ref, seen, args.block, args.gen, args.behaviour)
        got["row"] += i
        parts.append(got)
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    train = data["row"] < args.train
    g = torch.Generator().manual_seed(0)
    hold = (torch.rand(int(train.sum()), generator=g) < 0.1).to(dev)  # early-stopping positions
    conf = HISTORY_FEATURES.index("confidence")
    inputs = {"confidence": data["x"][:, conf : conf + 1], "history inputs": data["x"],
              "history inputs + hidden state": torch.cat([data["x"], data["h"]], 1)}
    result = {"model": args.model, "level": args.level, "positions": int(len(data["y"])),
              "train_positions": int(train.sum()), "right_share": round(float(data["y"].float().mean()), 4),
              "probes": {}}
    for name, x in inputs.items():
        xt, yt = x[train], data["y"][train]
        probe = train_probe(xt[~hold], yt[~hold], xt[hold], yt[hold])
        with torch.no_grad():
            result["probes"][name] = scores(probe(x[~train]), data["y"][~train])
        print(name, json.dumps(result["probes"][name]), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "probes"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
