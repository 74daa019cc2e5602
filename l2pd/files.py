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


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The ``"prompt"`` strings of a JSONL file (one ``{"prompt": ...}`` object per line; blank lines skipped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such prompts file")
    prompts = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                got = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(obj)}"
                raise ValueError(f'{path} line {lineno}: expected an object with a "prompt" string, got {got}')
            if not obj["prompt"].strip():
                raise ValueError(f'{path} line {lineno}: the "prompt" is empty')
            prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f'{path}: no prompts (expected one {{"prompt": ...}} object per line)')
    return prompts


def check_out_dir(path: str | os.PathLike, refuse_if_holds: str | None = None, flag: str = "--out") -> None:
    """Fail now, not after hours of work, if ``path`` cannot become a folder we write into; with
    ``refuse_if_holds``, also if it already holds that file (say ``--overwrite`` to replace it)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    if refuse_if_holds and os.path.exists(os.path.join(path, refuse_if_holds)):
        raise ValueError(f"{flag} {path}: already holds {refuse_if_holds}; choose another folder or pass --overwrite")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write there ({probe} is not writable)")


def token_hash(prompts: Any) -> str:
    """A content hash of token-id prompts: a resumed collection must be over the same prompts."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([int(t) for t in p]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
