"""Which weights a captured few-row forward prefetches into L2, and when (``l2pd_kernels.prefetch``).

A layer's products read their weights at HBM's rate; the kernels between them (RoPE and attention after the
q/k/v product, the norm after the output product, the norm after the MLP) leave HBM mostly idle. At the start
of each gap a prefetch of the next product's weight goes out on a side stream, after the product just issued:
- ``o``: after q/k/v, the output projection (and the MoE's router) while RoPE and attention run;
- ``mlp``: after the output product, the gate/up weight, or a MoE layer's shared expert;
- ``qkv``: after the MLP, the next layer's q/k/v weight (the LM head after the last layer).
Each slot has a budget in MB (L2 holds 50 MB on an H100/H200): the first bytes of a weight larger than that.

Only while a CUDA graph is being captured (a replay launches the prefetches at no host cost; an eager forward
would pay launches it cannot afford), on CUDA, for forwards of at most ``MAX_ROWS`` rows (the few-row products;
larger ones are compute-bound). ``L2PD_PREFETCH=0`` turns it off; ``L2PD_PREFETCH=o:40,mlp:8,qkv:8`` sets the
budgets. The forward's values do not depend on it.
"""

from __future__ import annotations

import os

import torch

MAX_ROWS = 64


def _budgets(spec: str) -> dict[str, int]:
    if spec.strip() in ("0", "off", ""):
        return {}
    out = {}
    for part in spec.split(","):
        slot, _, mb = part.partition(":")
        if slot not in ("o", "mlp", "qkv") or not mb.isdigit():
            raise ValueError(f"L2PD_PREFETCH={spec!r}: expected 0 or slot:MB pairs over o, mlp and qkv")
        out[slot] = int(mb) << 20
    return out


BUDGETS = _budgets(os.environ.get("L2PD_PREFETCH", "o:40,mlp:8,qkv:8"))
_SIDE: dict[int, torch.cuda.Stream] = {}


class Prefetch:
    """The prefetches of one forward; ``issue(slot, tensors)`` after the product that opens the gap, ``join()``
    at the end (a captured side stream must rejoin the capture)."""

    def __init__(self, device: torch.device) -> None:
        self.main = torch.cuda.current_stream(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SIDE:  # high priority: the few prefetch programs start at once; and never the capture's stream
            _SIDE[index] = torch.cuda.Stream(device, priority=-1)
        self.side = _SIDE[index]
        self.forked = False

    def issue(self, slot: str, tensors: list[torch.Tensor | None]) -> None:
        from l2pd_kernels.prefetch import prefetch_l2

        budget = BUDGETS.get(slot, 0)
        tensors = [t for t in tensors if t is not None and t.is_contiguous()]
        if budget <= 0 or not tensors:
            return
        self.side.wait_stream(self.main)  # after the product just issued: the gap, not the product, carries it
        with torch.cuda.stream(self.side):
            for t in tensors:
                if budget <= 0:
                    break
                budget -= prefetch_l2(t, min(budget, t.numel() * t.element_size()))
        self.forked = True

    def join(self) -> None:
        if self.forked:
            self.main.wait_stream(self.side)
            self.forked = False


def prefetcher(ops: object, device: torch.device, rows: int) -> Prefetch | None:
    """A ``Prefetch`` for this forward, or None where it does not apply (see the module's docstring)."""
    from l2pd_kernels import reference

    if ops is reference or device.type != "cuda" or not BUDGETS or rows > MAX_ROWS \
            or not torch.cuda.is_current_stream_capturing():
        return None
    return Prefetch(device)
