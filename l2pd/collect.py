"""Filter training data: Learn2PD's oracle replay, recorded as (confidence vector, label vector) per step.

For each prompt: decode with ``steps`` (one token per step) to get the final answer y; decode again with the
``oracle`` strategy (unmask exactly the positions whose argmax already equals y), recording at every step the
current block's filter features (confidences; 1.0 at decoded positions), labels (argmax == y) and which
positions were still masked, and for richer filters the margins, entropies and the step index in the block.

``policy="threshold:TAU"`` makes the second decode a confidence threshold instead of the oracle (labels are
the same). The oracle's states are not the ones a filter meets: after its first step, a position still masked
is one whose guess was wrong at every earlier step, so a filter that reads the step or the block's decided
positions learns that late positions are unreliable and, decoding, refuses confident tokens after the first
forward. A threshold's states are closer to those of a decode that unmasks confident tokens, but its labels
mark every position after a token that left the one-token-per-step path as wrong; on the task's hard level
it gave a worse filter than the oracle (benchmarks/RESULTS.md, "Headroom").

On-policy data fixes both: ``labels="rollout:TAU"`` labels each recorded state on its own path (does the
guess equal what a careful decode continuing from this very state writes there?), and ``policy=
"learn2pd:TAU"`` with a ``filter`` records the filter's own decodes, so rounds of collect, train, collect
with the new filter (DAgger; ``train_filter`` takes several folders) train it on the states it meets.
Prompts are processed in shards of ``shard_size`` (default one batch); each shard is written atomically as
``shard-NNNNN.safetensors``, so an interrupted run resumes where it stopped, with the same shards it would
have written in one go.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from l2pd_kernels.reference import filter_channel, update_history

from .decode import generate
from .distributed import barrier, env_world, mine
from .files import token_hash
from .filter import model_fingerprint
from .models import adapter_for

# 2 adds margin, entropy and step; 3 the guesses' run length and previous confidence (history filters); older
# folders still train the filters their channels allow
COLLECT_VERSION = 3


def _pad_left(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p))
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def parse_policy(policy: str) -> tuple[str, float | None]:
    """``"oracle"``, ``"threshold:TAU"`` or ``"learn2pd:TAU"`` (0 < TAU <= 1; learn2pd decodes with the
    collection's ``filter``) as (strategy, tau)."""
    if policy == "oracle":
        return "oracle", None
    name, _, tau = policy.partition(":")
    value = _tau(tau)
    if name not in ("threshold", "learn2pd") or not 0 < value <= 1:
        raise ValueError(f"policy {policy!r}: expected 'oracle', 'threshold:TAU' or 'learn2pd:TAU' with "
                         "0 < TAU <= 1")
    return name, value


def parse_labels(labels: str) -> float | None:
    """``"final"`` (None: the one-token-per-step answer) or ``"rollout:TAU"`` (the tau of the continuation)."""
    if labels == "final":
        return None
    name, _, tau = labels.partition(":")
    value = _tau(tau)
    if name != "rollout" or not 0 < value <= 1:
        raise ValueError(f"labels {labels!r}: expected 'final' or 'rollout:TAU' with 0 < TAU <= 1")
    return value


def _tau(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


@torch.no_grad()
def replay(model: Any, ids: torch.Tensor, mask: torch.Tensor, gen_length: int, block_length: int,
           cache: str = "none", policy: str = "oracle", labels: str = "final",
           filter: Any = None) -> dict[str, torch.Tensor]:
    """Features/labels/masks [N, block_length] of every (row, step) where the row had masked positions.

    ``labels="final"``: a position's label is whether its guess equals the one-token-per-step answer.
    ``labels="rollout:TAU"``: whether it equals what a careful decode (threshold TAU + EoTP) continuing from
    that very state writes there: each state is labelled on its own path (``rollout_labels``); the recorded
    decode then runs with EoTP, as decoding does."""
    P = ids.shape[1]
    strategy, tau = parse_policy(policy)
    careful = parse_labels(labels)
    if careful is not None and adapter_for(model).block_causal:  # its states run past the answer's columns
        raise ValueError("labels='rollout:TAU' is not supported for block-causal models (LLaDA 2.x) yet; use "
                         "labels='final'")
    final = None
    if careful is None or strategy == "oracle":
        final = generate(model, ids, mask, max_new_tokens=gen_length, block_length=block_length,
                         strategy="steps", cache=cache)[:, P:]
    mask_id = adapter_for(model).mask_id
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("features", "margin", "entropy", "step", "labels",
                                                            "masked", "run", "previous")}
    states: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # each position's guess history, advanced as the decision does (l2pd_kernels.reference.update_history);
    # shaped like the canvas (a block-causal model's runs past P + gen_length to its last block's end)
    history: list[torch.Tensor] = []

    def on_step(s, step, token, prob, canvas, margin, entropy, target=None):
        if not history:
            history.extend([torch.full_like(canvas, -1), torch.zeros_like(canvas, dtype=torch.int32),
                            torch.zeros_like(canvas, dtype=torch.float32)])
        masked = canvas[:, s : s + token.shape[1]] == mask_id
        active = masked.any(-1)
        pad = block_length - token.shape[1]
        run, previous = update_history(history, token, prob, s)
        rows["run"].append(torch.nn.functional.pad(run, (0, pad), value=1)[active].cpu())
        rows["previous"].append(torch.nn.functional.pad(previous, (0, pad))[active].cpu())
        for key, name, value in (("features", "confidence", prob), ("margin", "margin", margin),
                                 ("entropy", "entropy", entropy)):
            rows[key].append(filter_channel(value, masked, block_length, name)[active].cpu())
        rows["step"].append(torch.full((int(active.sum()),), step, dtype=torch.int32))
        rows["masked"].append(torch.nn.functional.pad(masked, (0, pad))[active].cpu())
        if careful is None:
            label = token == target  # the block's slice of ``final`` in canvas columns
            rows["labels"].append(torch.nn.functional.pad(label & masked, (0, pad))[active].cpu())
        else:  # labelled once the continuations have run
            states.append((active.nonzero().flatten(), s - P, token[active].clone(), masked[active],
                           canvas[active, P:].clone()))

    how: dict[str, Any] = {}
    if strategy != "oracle":
        how = dict(threshold=tau, filter=filter)
    if careful is not None:
        how["eotp"] = "accepted"
    generate(model, ids, mask, max_new_tokens=gen_length, block_length=block_length, strategy=strategy,
             on_step=on_step, step_stats=True, cache=cache, target=final, **how)
    if careful is not None:
        rows["labels"] = rollout_labels(model, ids, mask, states, careful, block_length, cache, ids.shape[0])
    return {k: torch.cat(v) for k, v in rows.items()}


def rollout_labels(model: Any, ids: torch.Tensor, mask: torch.Tensor, states: list, tau: float,
                   block_length: int, cache: str, batch: int) -> list[torch.Tensor]:
    """Per recorded state (rows, block offset in the answer, guesses [n, L], masked [n, L], answer [n, G]
    before the step's decision): whether each still-masked position's guess equals what threshold ``tau`` +
    EoTP writes there when it continues the decode from that answer (``generate(answer=...)``), padded to
    ``block_length``; in ``batch``-row chunks."""
    if not states:
        return []
    rows = torch.cat([st[0] for st in states])
    answers = torch.cat([st[4] for st in states])
    G, P = answers.shape[1], ids.shape[1]
    done = []
    for lo in range(0, len(rows), batch):
        r = rows[lo : lo + batch]
        out = generate(model, ids[r], None if mask is None else mask[r], max_new_tokens=G,
                       block_length=block_length, strategy="threshold", threshold=tau, eotp="accepted", cache=cache,
                       answer=answers[lo : lo + batch])
        done.append(out[:, P:])
    cont = torch.cat(done)
    labels, at = [], 0
    for _, offset, token, masked, _ in states:
        n, L = token.shape
        label = (token == cont[at : at + n, offset : offset + L]) & masked
        labels.append(torch.nn.functional.pad(label, (0, block_length - L)).cpu())
        at += n
    return labels


def collect(
    model: Any,
    prompts: Sequence[Sequence[int]],
    out_dir: str,
    gen_length: int = 256,
    block_length: int = 32,
    batch_size: int = 32,
    shard_size: int | None = None,
    cache: str = "none",
    progress: bool = True,
    max_shards: int | None = None,
    policy: str = "oracle",
    labels: str = "final",
    filter: Any = None,
) -> dict[str, Any]:
    """Collect replay data for token-id ``prompts`` (chat-formatted) into ``out_dir``; resumes if present.

    Prompts go in shards of ``shard_size`` (default: the folder's when resuming, else ``batch_size``, so that an
    interrupted run loses at most one batch), each written atomically. ``collect.json`` (the settings) is
    written with the first shard, so a run that fails before it leaves a folder any settings can use. A lock
    file keeps a second collection out of a folder in use. ``max_shards`` stops after writing that many new
    shards (for tests and time-boxed runs). Under ``torchrun`` each process takes the shards whose index is
    its rank modulo the world size and writes them into the same folder: the folder ends up exactly as one
    process would have written it. ``policy``, ``labels`` and ``filter``: see ``replay`` and the module docstring.
    """
    from .files import save_safetensors

    if not prompts:
        raise ValueError("no prompts to collect from")
    filter = _check_policy(policy, labels, filter, block_length)
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("batch_size", batch_size),
                        ("shard_size", 1 if shard_size is None else shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    os.makedirs(out_dir, exist_ok=True)
    rank, world, _ = env_world()
    lock = _lock(out_dir) if rank == 0 else None
    try:
        path = os.path.join(out_dir, "collect.json")
        n_done = shards_in(out_dir)
        old = _read_manifest(path) if n_done else None  # a manifest without shards binds nothing
        if shard_size is None:
            shard_size = int(old["shard_size"]) if old and "shard_size" in old else batch_size
        adapter = adapter_for(model)
        device, pad_id = adapter.device, adapter.pad_id
        manifest = {
            "version": COLLECT_VERSION, "model_fingerprint": model_fingerprint(model), "gen_length": gen_length,
            "block_length": block_length, "prompts": len(prompts), "shard_size": shard_size, "cache": cache,
            "prompts_sha256": token_hash(prompts),
        }
        if policy != "oracle":  # only then: folders collected before the option resume as they were
            manifest["policy"] = policy
        if labels != "final":
            manifest["labels"] = labels
        if filter is not None:
            manifest["policy_filter"] = filter.digest()
        if old is not None:
            _check_resume(out_dir, old, manifest)
        if rank == 0:
            for name in os.listdir(out_dir):  # what an interrupted write left
                if name.startswith("shard-") and ".tmp" in name:
                    os.remove(os.path.join(out_dir, name))
        barrier()  # no process starts writing before the leftovers are gone
        n_shards = -(-len(prompts) // shard_size)
        written = 0
        bar = tqdm(total=len(prompts), disable=not progress or rank != 0, desc="collect", unit="prompt")
        for shard in range(n_shards):
            lo, hi = shard * shard_size, min((shard + 1) * shard_size, len(prompts))
            if not mine(shard, rank, world):
                continue
            name = os.path.join(out_dir, f"shard-{shard:05d}.safetensors")
            if os.path.exists(name):
                bar.update(hi - lo)
                continue
            if max_shards is not None and written >= max_shards:
                break
            parts = []
            for b in range(lo, hi, batch_size):
                ids, mask = _pad_left(prompts[b : min(b + batch_size, hi)], pad_id, device)
                parts.append(replay(model, ids, mask, gen_length, block_length, cache, policy, labels, filter))
                bar.update(ids.shape[0])
            data = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
            data["labels"] = data["labels"].to(torch.uint8)
            data["masked"] = data["masked"].to(torch.uint8)
            meta = {k: str(v) for k, v in manifest.items()}
            meta.update(first_prompt=str(lo), last_prompt=str(hi - 1), rows=str(len(data["features"])))
            if written == 0:  # the settings go down with the first shard, never before
                _write_json_atomic(path, manifest)
            tmp = f"{name}.tmp{os.getpid()}"
            save_safetensors(data, tmp, metadata=meta)
            os.replace(tmp, name)  # atomic: a shard is either complete or absent
            written += 1
        bar.close()
        barrier()
    finally:
        if lock is not None:
            lock.close()
    done = sum(os.path.exists(os.path.join(out_dir, f"shard-{i:05d}.safetensors")) for i in range(n_shards))
    return {**manifest, "shards": n_shards, "shards_done": done, "shards_written_here": written}


def _check_policy(policy: str, labels: str, filter: Any, block_length: int) -> Any:
    """The policy and labels checked; the policy's filter (loaded from a folder) or None."""
    from .spec import _as_filter

    strategy, _ = parse_policy(policy)
    parse_labels(labels)
    filter = _as_filter(filter)
    if (strategy == "learn2pd") != (filter is not None):
        raise ValueError(f"policy {policy!r} with filter={filter!r}: a filter is what the learn2pd policy decodes "
                         "with, and only that policy takes one")
    if filter is not None and filter.block_length != block_length:
        raise ValueError(f"the policy's filter was trained for block_length={filter.block_length}, not "
                         f"{block_length}")
    return filter


def shards_in(out_dir: str) -> int:
    return sum(n.startswith("shard-") and n.endswith(".safetensors") for n in os.listdir(out_dir))


def _read_manifest(path: str) -> dict[str, Any] | None:
    from .files import read_json

    if not os.path.isfile(path):
        raise ValueError(f"{os.path.dirname(path)} holds shards but no collect.json: not a folder `l2pd collect` "
                         "can resume; use a new --out folder")
    old = read_json(path, "collect.json")
    if not isinstance(old, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return old


def _check_resume(out_dir: str, old: dict[str, Any], manifest: dict[str, Any]) -> None:
    if "prompts_sha256" not in old:  # written before prompts were hashed: the rest must still agree
        old = {**old, "prompts_sha256": manifest["prompts_sha256"]}
    if old == manifest:
        return
    if {**old, "prompts_sha256": None} == {**manifest, "prompts_sha256": None}:
        raise ValueError(f"{out_dir} holds a collection over other prompts (same count, other content): resuming "
                         "would mix the two; use a new --out folder")
    diff = {k: (old.get(k), manifest.get(k)) for k in manifest if old.get(k) != manifest.get(k)}
    raise ValueError(f"{out_dir} holds a collection with other settings (was, now): {diff}; use a new --out "
                     "folder or the same settings")


def _lock(out_dir: str):
    """An exclusive lock on ``out_dir`` held while the returned file is open (released when the process ends,
    however it ends); a clear refusal when another collection holds it."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        return None
    f = open(os.path.join(out_dir, ".collect.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out_dir} is being written by another collection ({holder}); wait for it to finish "
                         "or use another --out folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_shards(out_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All shards of a collection concatenated, and its manifest."""
    from .files import load_safetensors, read_json

    path = os.path.join(out_dir, "collect.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no collect.json in {out_dir!r}: not a folder written by `l2pd collect`")
    manifest = read_json(path, "collect.json")
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("shard-") and n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no shards in {out_dir!r}")
    parts = [load_safetensors(os.path.join(out_dir, n)) for n in names]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, manifest
