"""Train the Learn2PD filter on collected replay data (full batch, BCE with logits, AdamW, early stopping)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from l2pd_kernels.reference import (
    HISTORY_FEATURES,
    SHARED_FEATURES,
    check_inputs,
    filter_features,
    history_features,
    shared_features,
)

from .collect import load_shards
from .filter import Filter

REPORT_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


def accept_metrics(logits: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor,
                   thresholds=REPORT_THRESHOLDS) -> dict[str, dict[str, float]]:
    """Precision, recall and false-positive rate of "accept" (sigmoid > tau) over masked positions."""
    prob = torch.sigmoid(logits)[masked]
    y = labels[masked]
    out = {}
    for tau in thresholds:
        acc = prob > tau
        tp, fp = int((acc & y).sum()), int((acc & ~y).sum())
        pos, neg = int(y.sum()), int((~y).sum())
        out[str(tau)] = {
            "precision": tp / max(1, tp + fp), "recall": tp / max(1, pos), "false_positive_rate": fp / max(1, neg),
        }
    return out


def load_collections(data_dirs: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """One collection folder, or several (a DAgger run's rounds) joined: they must share the model, block
    length and answer length. Returns (data, manifest, the folders' names for messages)."""
    dirs = [data_dirs] if isinstance(data_dirs, (str, os.PathLike)) else list(data_dirs)
    if not dirs:
        raise ValueError("no collection folders given")
    loaded = [load_shards(os.fspath(d)) for d in dirs]
    manifest = dict(loaded[0][1])
    for d, (_, other) in zip(dirs[1:], loaded[1:]):
        for key in ("model_fingerprint", "block_length", "gen_length"):
            if other.get(key) != manifest.get(key):
                raise ValueError(f"{os.fspath(d)!r} was collected with {key}={other.get(key)!r}, "
                                 f"{os.fspath(dirs[0])!r} with {manifest.get(key)!r}: they cannot train one filter")
    keys = set.intersection(*(set(data) for data, _ in loaded))
    data = {k: torch.cat([p[k] for p, _ in loaded]) for k in sorted(keys)}
    if len(dirs) > 1:
        manifest["policy"] = "+".join(m.get("policy", "oracle") for _, m in loaded)
        manifest["labels"] = "+".join(m.get("labels", "final") for _, m in loaded)
    return data, manifest, ",".join(os.fspath(d) for d in dirs)


def train_filter(
    data_dir: Any,
    hidden: int = 128,
    depth: int = 1,
    lr: float = 3e-3,
    max_epochs: int = 3000,
    val_fraction: float = 0.1,
    patience: int = 100,
    threshold: float = 0.9,
    seed: int = 0,
    device: str = "cpu",
    log: Any = print,
    inputs=("confidence",),
    kind: str = "dense",
) -> Filter:
    """Full-batch training on all shards of ``data_dir`` (a folder, or a list of folders trained on together);
    keeps the weights of the best validation loss.

    The loss counts only positions that were still masked (the filter is never asked about the others).
    ``inputs``: what the filter reads: ``("confidence",)`` (Learn2PD's filter) or an ordered subset of
    ``l2pd.filter.RICH_INPUTS`` (confidence, margin, entropy, step) that starts with confidence.
    ``kind='shared'``: one small MLP applied to every position's own features (``inputs`` is then ignored);
    ``kind='history'``: the same over its features and its guess's history (run length, previous confidence).
    """
    _check_settings(hidden=hidden, depth=depth, max_epochs=max_epochs, patience=patience, lr=lr, threshold=threshold,
                    val_fraction=val_fraction)
    data, manifest, data_dir = load_collections(data_dir)
    if kind in ("shared", "history"):
        inputs = SHARED_FEATURES if kind == "shared" else HISTORY_FEATURES
        x = shared_inputs(data, manifest["block_length"], data_dir, history=kind == "history").to(device)
    else:
        inputs = check_inputs(inputs)
        x = training_inputs(data, inputs, manifest["block_length"], data_dir).to(device)
    y = data["labels"].bool().to(device)
    m = data["masked"].bool().to(device)
    n = len(x)
    if n < 10:
        raise ValueError(f"only {n} training rows in {data_dir!r}; collect more prompts")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(device)
    n_val = max(1, int(n * val_fraction))
    warnings = _degenerate(n, n_val, y, m, per_position=kind != "dense")
    for w in warnings:
        log(f"warning: {w}")
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    flt = Filter(manifest["block_length"], hidden, depth, threshold, inputs=inputs, kind=kind).to(device)

    def scores(rows: torch.Tensor) -> torch.Tensor:  # [n, block_length] logits for either kind
        out = flt(x[rows])
        return out[..., 0] if kind != "dense" else out
    opt = torch.optim.AdamW(flt.parameters(), lr=lr)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        logits = scores(idx)
        per = F.binary_cross_entropy_with_logits(logits, y[idx].float(), reduction="none")
        return (per * m[idx]).sum() / m[idx].sum().clamp_min(1)

    best, best_state, since, t0 = float("inf"), None, 0, time.time()
    epoch = 0
    for epoch in range(max_epochs):
        flt.train()
        loss = loss_of(tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            v = float(loss_of(val))
        if not math.isfinite(v) or not math.isfinite(loss.item()):
            raise ValueError(f"training diverged at epoch {epoch} (loss {loss.item():.4g}, validation {v:.4g}); "
                             f"lower lr={lr:g}")
        if v < best - 1e-5:
            best, since = v, 0
            best_state = {k: t.detach().clone() for k, t in flt.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
        if epoch % 200 == 0:
            log(f"epoch {epoch}: train {loss.item():.4f} val {v:.4f}")
    flt.load_state_dict(best_state)
    flt.eval()
    with torch.no_grad():
        metrics = accept_metrics(scores(val), y[val], m[val])
    seconds = time.time() - t0
    flt.meta.update(
        model_fingerprint=manifest["model_fingerprint"], gen_length=manifest["gen_length"],
        train_rows=int(len(tr)), val_rows=int(n_val), val_loss=best, epochs=epoch + 1,
        train_seconds=round(seconds, 2), val_metrics=metrics,
        positive_rate=float(y[m].float().mean()), collect_policy=manifest.get("policy", "oracle"),
        collect_labels=manifest.get("labels", "final"),
    )
    if warnings:
        flt.meta["warnings"] = warnings
    flt.cpu()
    _report(log, seconds, epoch + 1, best, metrics, bool(warnings))
    return flt


def _check_settings(*, hidden: Any, depth: Any, max_epochs: Any, patience: Any, lr: Any, threshold: Any,
                    val_fraction: Any) -> None:
    for name, value in (("hidden", hidden), ("depth", depth), ("max_epochs", max_epochs), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 <= threshold):
        raise ValueError(f"threshold={threshold!r} must be a finite number >= 0")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")


def _report(log: Any, seconds: float, epochs: int, best: float, metrics: dict, warned: bool) -> None:
    log(f"trained in {seconds:.1f} s, {epochs} epochs, best val loss {best:.4f}")
    for tau, r in metrics.items():
        log(f"  tau {tau}: precision {r['precision']:.4f} recall {r['recall']:.4f} "
            f"false-positive rate {r['false_positive_rate']:.4f}")
    if warned:
        log("warning: these metrics are not evidence of a good filter (see the warnings above; stored in "
            "filter.json)")


def training_inputs(data: dict[str, torch.Tensor], inputs, block_length: int, data_dir: str) -> torch.Tensor:
    """The filter's input rows [N, width] from a collection's channels, in the order of ``inputs``."""
    missing = [n for n in inputs if n != "confidence" and n not in data]
    if missing:
        raise ValueError(f"{data_dir!r} was collected without {missing} (collection version 1): collect again "
                         "into a new folder to train a filter that reads them")
    # the stored channels already hold the decided-position values: every position reads as "masked" here
    conf = data["features"].float()
    return filter_features(conf, torch.ones_like(conf, dtype=torch.bool), block_length, inputs,
                           data.get("margin"), data.get("entropy"), data["step"] if "step" in data else 0)


def shared_inputs(data: dict[str, torch.Tensor], block_length: int, data_dir: str,
                  history: bool = False) -> torch.Tensor:
    """A shared filter's per-position inputs [N, block_length, len(SHARED_FEATURES)] from a collection; with
    ``history``, a history filter's [N, block_length, len(HISTORY_FEATURES)]."""
    if "margin" not in data:
        raise ValueError(f"{data_dir!r} was collected without margins and entropies (collection version 1): "
                         "collect again into a new folder to train a shared filter")
    if history and "run" not in data:
        raise ValueError(f"{data_dir!r} was collected without the guesses' history (collection version < 3): "
                         "collect again into a new folder to train a history filter")
    conf = data["features"].float()
    x = shared_features(conf, data["margin"].float(), data["entropy"].float(), data["masked"].bool(),
                        data["step"].float(), block_length)
    return history_features(x, conf, data["run"], data["previous"]) if history else x


MIN_ROWS = 500  # a block step is one row; a few hundred prompts give tens of thousands
MIN_POSITIONS = 5000  # a shared filter learns from each masked position: its examples are positions, not rows


def _degenerate(n: int, n_val: int, y: Any, m: Any, per_position: bool = False) -> list[str]:
    """Why figures from this data would mislead: too few examples (rows for a dense filter, masked positions
    for a shared one), or labels almost all one class."""
    out = []
    masked = int(m.sum())
    if per_position and masked < MIN_POSITIONS:
        out.append(f"only {masked} masked positions in {n} rows: collect from more prompts (a shared filter "
                   f"wants >= {MIN_POSITIONS})")
    elif not per_position and n < MIN_ROWS:
        out.append(f"only {n} rows ({n_val} for validation): collect from more prompts (>= {MIN_ROWS} rows)")
    pos = float(y[m].float().mean()) if masked else 0.0
    if masked == 0:
        out.append("no masked positions: nothing to learn")
    elif pos > 0.995 or pos < 0.005:
        out.append(f"{100 * pos:.2f}% of masked positions are labelled final: labels almost all one class, "
                   "so precision/recall say little (collect more varied prompts)")
    return out
