"""Reading and writing the files l2pd touches, with one clear line for what is wrong and how to fix it: JSON
with its file and line, safetensors that are truncated, prompt files, output folders checked before any long
work."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = os.fspath(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                         f"fix or replace this {what}") from None


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(path, device=str(device))
    except Exception as exc:  # safetensors raises its own error type for a bad header or a short file
        raise ValueError(f"{path}: cannot read it as safetensors ({str(exc).strip()}); the file is truncated or "
                         "corrupt: copy or save it again") from None


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with the permissions any other written file gets (it creates files
    readable by their owner only)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_jsonl(path: str | os.PathLike, what: str) -> list[tuple[int, Any]]:
    """(line number, object) for each non-blank line of a UTF-8 JSONL file (a byte-order mark is fine); one clear
    line naming the file and line for anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); a "
                         f"{what} is JSONL, one JSON object per line") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return out


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The ``"prompt"`` strings of a JSONL file (one ``{"prompt": ...}`` object per line; blank lines skipped)."""
    return [obj["prompt"] for obj in read_prompt_objects(path)]


def read_prompt_objects(path: str | os.PathLike, what: str = "prompts file") -> list[dict]:
    """The objects of a JSONL file, each checked to hold a non-empty ``"prompt"`` string (other keys kept)."""
    path = os.fspath(path)
    objs = []
    for lineno, obj in read_jsonl(path, what):
        if not isinstance(obj, dict) or "prompt" not in obj:
            got = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(obj)}"
            raise ValueError(f'{path} line {lineno}: expected an object with a "prompt" string, got {got}')
        if not isinstance(obj["prompt"], str):
            raise ValueError(f'{path} line {lineno}: "prompt" must be a string, got {type(obj["prompt"]).__name__} '
                             f"{obj['prompt']!r:.40}")
        if not obj["prompt"].strip():
            raise ValueError(f'{path} line {lineno}: the "prompt" is empty')
        objs.append({**obj, "_line": lineno})
    if not objs:
        raise ValueError(f'{path}: no prompts (expected one {{"prompt": ...}} object per line)')
    return objs


def check_out_dir(path: str | os.PathLike, refuse_if_holds: str | None = None, flag: str = "--out") -> None:
    """Fail now, not after hours of work, if ``path`` cannot become a folder we write into; with
    ``refuse_if_holds``, also if it already holds that file (say ``--overwrite`` to replace it)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    if refuse_if_holds and os.path.exists(os.path.join(path, refuse_if_holds)):
        raise ValueError(f"{flag} {path}: already holds {refuse_if_holds}; choose another folder or pass --overwrite")
    _probe_write(path, flag)


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """Fail now if a file cannot be written at ``path`` later (missing folders above it are made then)."""
    full = os.path.abspath(os.fspath(path))
    if os.path.isdir(full):
        raise ValueError(f"{flag} {os.fspath(path)}: is a folder; give a file name")
    _probe_write(os.path.dirname(full), flag, shown=os.fspath(path))


def _probe_write(folder: str, flag: str, shown: str | None = None) -> None:
    """The nearest existing folder at or above ``folder`` must take a new file (tried for real: permission bits
    do not tell for root or for special file systems); nothing is left behind."""
    import tempfile

    shown = shown or folder
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {shown}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {shown}: cannot write there ({probe} is not writable)")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {shown}: cannot write there ({probe}: {exc.strerror or exc})") from None


def token_hash(prompts: Any) -> str:
    """A content hash of token-id prompts: a resumed collection must be over the same prompts."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([int(t) for t in p]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
