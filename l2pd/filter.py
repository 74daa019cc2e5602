"""The Learn2PD filter: a small MLP from a block's confidence vector (and, for a richer filter, its margins,
entropies and the step index) to per-position "already final" logits."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from l2pd_kernels.reference import FILTER_INPUTS, HISTORY_FEATURES, SHARED_FEATURES, check_inputs, filter_width

# filter.json versions: 1 reads the confidences only; 2 records its inputs ("inputs") and kind (dense or
# shared); 3 adds the history kind. All load; a filter is written with the lowest version that describes it.
FILTER_VERSION = 3
RICH_INPUTS = FILTER_INPUTS  # confidence, margin, entropy, step
KINDS = ("dense", "shared", "history")
_PER_POSITION = {"shared": SHARED_FEATURES, "history": HISTORY_FEATURES}


def model_fingerprint(model: Any) -> str:
    """A short id of a model's shape and weights (config keys plus a sample of the embedding and head); a model
    quantized by ``l2pd.quantize`` keeps the id of its weights before (its filters still fit it)."""
    from .models import adapter_for

    kept = vars(model).get("_l2pd_fingerprint")
    if kept is not None:
        return kept

    keys, weights = adapter_for(model).fingerprint_parts()
    h = hashlib.sha256(json.dumps(keys, sort_keys=True).encode())
    for w in weights:
        sample = w.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16)  # bf16: same id for any load dtype
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


class Filter(nn.Module):
    """Linear(width, hidden) -> ReLU -> [Linear(hidden, hidden) -> ReLU] * (depth - 1) -> Linear(hidden,
    block_length). Input (``inputs``): the block's confidences (1.0 at decoded positions), as in Learn2PD;
    a richer filter adds the margins and entropies of the same softmax and the step index in the block (see
    ``l2pd_kernels.reference.filter_features``). Output: logits of "the current guess already equals the
    final answer" per position. ``threshold`` is the tau applied to their sigmoid.

    ``kind='shared'``: one MLP for every position, Linear(len(SHARED_FEATURES), hidden) -> ReLU -> ... ->
    Linear(hidden, 1), over each position's own features (``l2pd_kernels.reference.shared_features``); its
    size does not grow with the block and every masked position is a training example.

    ``kind='history'``: a shared filter over ``HISTORY_FEATURES``: also the run length of the position's
    guess over the block's forwards, its previous confidence and the change (the decode keeps them per
    position in device memory)."""

    def __init__(
        self, block_length: int = 32, hidden: int = 128, depth: int = 1, threshold: float = 0.9,
        meta: dict[str, Any] | None = None, inputs=("confidence",), kind: str = "dense",
    ) -> None:
        super().__init__()
        if block_length <= 0 or hidden <= 0 or depth < 1:
            raise ValueError(f"bad filter shape: block_length={block_length} hidden={hidden} depth={depth}")
        if kind not in KINDS:
            raise ValueError(f"filter kind {kind!r}: expected one of {list(KINDS)}")
        self.kind = kind
        if kind in _PER_POSITION:
            features = _PER_POSITION[kind]
            if tuple(inputs) not in (("confidence",), features):
                raise ValueError(f"a {kind} filter reads {list(features)}, got {list(inputs)}")
            self.inputs = features
            dims = [len(features)] + [hidden] * depth + [1]
        else:
            self.inputs = check_inputs(inputs)
            dims = [filter_width(self.inputs, block_length)] + [hidden] * depth + [block_length]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.block_length, self.hidden, self.depth, self.threshold = block_length, hidden, depth, threshold
        self.meta: dict[str, Any] = dict(meta or {})
        self._device_weights: dict[torch.device, list] = {}

    @property
    def needs_stats(self) -> bool:
        """Whether decoding must compute margins and entropies for this filter."""
        return self.kind != "dense" or "margin" in self.inputs or "entropy" in self.inputs

    @property
    def needs_history(self) -> bool:
        """Whether decoding must keep each position's guess history (previous guess, run, confidence)."""
        return self.kind == "history"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    def weights(self, device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) fp32 per layer on ``device``: copied once per device, and again, into the same
        tensors, once the filter's parameters change (trained, loaded or moved since): CUDA graphs that read
        them see the new values, and a decode never runs on stale ones."""
        device = torch.device(device)
        params = [p for layer in self.layers for p in (layer.weight, layer.bias)]
        stamp = [(p.data_ptr(), p._version) for p in params]
        held = self._device_weights.get(device)
        if held is None:
            copies = [(layer.weight.detach().float().to(device).contiguous(), layer.bias.detach().float().to(device))
                      for layer in self.layers]
            held = self._device_weights[device] = (copies, stamp)
        elif held[1] != stamp and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            # (a capture follows an eager run of the same iteration, which refreshed them already)
            for (w, b), layer in zip(held[0], self.layers):
                for copy, p in ((w, layer.weight), (b, layer.bias)):
                    if copy.data_ptr() != p.data_ptr():  # (an fp32 parameter on the device is its own copy)
                        copy.copy_(p.detach().float())
            self._device_weights[device] = (held[0], [(p.data_ptr(), p._version) for p in params])
        return held[0]

    def digest(self) -> str:
        """A short id of the filter's kind, inputs and weights (not its tau): what a sweep row was decoded with."""
        h = hashlib.sha256(json.dumps([self.kind, list(self.inputs), self.block_length]).encode())
        for name, value in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(value.detach().float().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def check_model(self, model: Any, allow_other_model: bool = False) -> None:
        want = self.meta.get("model_fingerprint")
        if want is None or allow_other_model:
            return
        got = model_fingerprint(model)
        if got != want:
            raise ValueError(
                f"this filter was trained for model {want}, not for this model ({got}); to use it anyway pass "
                "allow_other_model=True (l2pd.patch, Filter.check_model) or --allow-other-model (CLI)"
            )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from .files import save_safetensors

        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        version = 3 if self.kind == "history" else 2
        save_safetensors(state, os.path.join(folder, "filter.safetensors"), metadata={"version": str(version)})
        info = {
            "version": version, "block_length": self.block_length, "hidden": self.hidden,
            "depth": self.depth, "threshold": self.threshold, "inputs": list(self.inputs), "kind": self.kind,
            **self.meta,
        }
        with open(os.path.join(folder, "filter.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Filter":
        from .files import load_safetensors, read_json

        path = os.path.join(folder, "filter.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no filter.json in {os.fspath(folder)!r}")
        info = read_json(path, "filter.json")
        if not isinstance(info, dict):
            raise ValueError(f"{path}: expected a JSON object")
        version = info.get("version")
        if version not in range(1, FILTER_VERSION + 1):
            raise ValueError(f"filter version {version!r} is not supported (expected 1 to {FILTER_VERSION}; a "
                             "newer l2pd wrote it)")
        inputs = info.pop("inputs", ["confidence"]) if version >= 2 else ["confidence"]
        if not isinstance(inputs, list):
            raise ValueError(f"{path}: 'inputs' must be a list, got {inputs!r}")
        missing = [k for k in ("block_length", "hidden", "depth", "threshold") if k not in info]
        if missing:
            raise ValueError(f"{path} lacks {missing}")
        shape = {k: info.pop(k) for k in ("block_length", "hidden", "depth", "threshold")}
        info.pop("version")
        kind = info.pop("kind", "dense")
        if kind not in KINDS or (kind == "history" and version < 3):
            raise ValueError(f"{path}: filter kind {kind!r} is not supported (expected one of {list(KINDS)})")
        flt = cls(**shape, meta=info, inputs=inputs, kind=kind)
        weights = os.path.join(folder, "filter.safetensors")
        try:
            flt.load_state_dict(load_safetensors(weights))
        except RuntimeError as exc:
            raise ValueError(f"{weights} does not match {path}: {str(exc).splitlines()[0]}") from None
        return flt.eval()
