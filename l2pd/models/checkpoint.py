"""Checkpoint folders in the official Hugging Face layout, for every family: ``config.json`` plus
``model.safetensors`` or shards with a ``model.safetensors.index.json``."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from ..files import load_safetensors, read_json, save_safetensors


def dtype_alias(torch_dtype: Any, dtype: Any) -> Any:
    """``dtype=`` (transformers 5) and ``torch_dtype=`` (earlier releases) name the same thing."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
    return dtype if dtype is not None else torch_dtype


def check_device(device: Any) -> torch.device:
    """``device`` as a torch.device l2pd can load onto (cpu, or a CUDA GPU torch sees), else a ValueError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA GPU is visible to torch here (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    elif dev.type != "cpu" or dev.index not in (None, 0):
        raise ValueError(f"device={device!r}: l2pd loads models on 'cpu' or 'cuda[:N]'")
    return dev


def resolve_dtype(torch_dtype: torch.dtype | str | None, config: Any) -> torch.dtype:
    if torch_dtype is None or torch_dtype == "auto":
        torch_dtype = getattr(config, "torch_dtype", None) or "float32"
    if isinstance(torch_dtype, str):
        name = torch_dtype.removeprefix("torch.")
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={torch_dtype!r}: expected float32, bfloat16 or float16")
        torch_dtype = getattr(torch, name)
    if torch_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={torch_dtype!r}: expected float32, bfloat16 or float16")
    return torch_dtype


def load(cls: Any, config_cls: Any, folder: str | os.PathLike, torch_dtype: Any, device: Any,
         tied_key: Callable[[Any], str | None]) -> Any:
    """``cls(config)`` with the folder's weights; ``tied_key(config)`` names a head tied to the embedding
    (dropped from the file's tensors), or None."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    device = check_device(device)
    config = config_cls.from_json(cfg_path)
    dtype = resolve_dtype(torch_dtype, config)
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no \"weight_map\" object")
        files = [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder!r}")
    with torch.device("meta"):
        model = cls(config)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_safetensors(path, device=str(device)))
    state = {k: v.to(dtype) for k, v in state.items()}
    tied = tied_key(config)
    if tied is not None:
        state.pop(tied, None)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # torch lists every mismatch; the first few say enough
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:4]
        raise ValueError(f"{folder}: the weights do not match config.json: {' '.join(lines)}") from None
    return model.eval()


def save(model: Any, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write ``config.json`` and safetensors (sharded above ``max_shard_bytes``)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_safetensors(state, os.path.join(folder, "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, os.path.join(folder, fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


class ConfigFile:
    """A config with the official keys as attributes, read from and written to config.json; ``REQUIRED``:
    the keys without which the family's defaults would load and then fail on every weight's shape."""

    REQUIRED: tuple[str, ...] = ()
    FAMILY = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @classmethod
    def from_json(cls, path: str) -> Any:
        cfg = read_json(path, "config.json")
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
        missing = [k for k in cls.REQUIRED if k not in cfg]
        if missing:
            raise ValueError(f"{path} lacks {missing}: not a {cls.FAMILY} config.json (copy the model's own)")
        return cls(**cfg)


class Checkpoint:
    """``from_pretrained`` / ``save_pretrained`` in the official layout for a model class whose
    ``config_class`` reads config.json and whose ``tied_head(config)`` names a head tied to the embedding."""

    config_class: Any = None

    @staticmethod
    def tied_head(config: Any) -> str | None:
        return None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype: Any = None, device: Any = "cpu",
                        dtype: Any = None) -> Any:
        """Load ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``);
        ``dtype`` is transformers 5's name for ``torch_dtype``."""
        return load(cls, cls.config_class, folder, dtype_alias(torch_dtype, dtype), device, cls.tied_head)

    def save_pretrained(self, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` and safetensors in the official layout (sharded above ``max_shard_bytes``)."""
        save(self, folder, max_shard_bytes)
