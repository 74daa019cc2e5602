"""What the kernels' launch rules read of a GPU, read once per device: its SM count, its name and the shared
memory one program may use (under the interpreter, CPU tensors: 4 SMs, no name, unlimited shared memory); and
whether kernels launch with programmatic dependent launch (``pdl``)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton 3.4 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None


@functools.lru_cache(maxsize=None)
def _props(device: torch.device) -> tuple[int, str, int]:
    if device.type != "cuda":
        return 4, "", 1 << 30
    p = torch.cuda.get_device_properties(device)
    # less what the compiler adds to a program's own tiles (227 KB usable on an H100, 163 KB on an A100)
    return p.multi_processor_count, p.name, int(getattr(p, "shared_memory_per_block_optin", 163 * 1024)) - 8 * 1024


def sm_count(device: torch.device) -> int:
    return _props(device)[0]


def device_name(device: torch.device) -> str:
    return _props(device)[1]


def smem_bytes(device: torch.device) -> int:
    return _props(device)[2]


# Programmatic dependent launch (Hopper and later; ``benchmarks/studies/launch_overlap.py``). Each kernel is
# launched while the one before it in the stream still runs; its programs wait (``griddepcontrol.wait``) for
# that kernel's completion and writes before they touch memory, so its launch overlaps the other's exit
# (LLaDA-8B's graphed step 1.0% faster, LLaDA2.0-mini's about 0.8%). Inside ``early_launch(True)`` each kernel
# also lets the next launch as soon as all its programs have started (``griddepcontrol.launch_dependents``):
# 4.1% off LLaDA2.0-mini's step; 8.6% onto LLaDA-8B's with the few-row products' pointer tiles of then (likely:
# started early on the SMs the kernel before leaves free, two to an SM), 1.3% off its `generate` since they
# take TMA tiles that fill an SM; the forward asks for it where ``l2pd.models.decoder._early_launch`` says.
# ``L2PD_PDL``: 0 off, 1 the wait only, 2 (default) the wait, and early launches where asked.
PDL = int(os.environ.get("L2PD_PDL", "2"))
EARLY: bool | None = None  # True / False: early launches everywhere / nowhere, whatever the forward asks
LATE: set[str] = set()  # kernels that never let the next launch early
class _Early(threading.local):
    on = False  # a class default: reading it on a new thread raises nothing (a missing attribute is slow)


_early = _Early()


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    """Hopper or later, and a Triton that launches with PDL (3.3 and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and _triton_pdl()


@functools.lru_cache(maxsize=None)
def _triton_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@contextlib.contextmanager
def early_launch(on: bool):
    """Within this (on this thread), kernels launched through ``pdl`` let the next one launch early."""
    before = _early.on
    _early.on = on
    try:
        yield
    finally:
        _early.on = before


_OFF, _WAIT, _EARLY = {"PDL": 0}, {"PDL": 1, "launch_pdl": True}, {"PDL": 2, "launch_pdl": True}


def pdl(device: torch.device, kernel: str) -> dict:
    """The PDL arguments of a launch of ``kernel`` on ``device``: the kernel's ``PDL`` mode (0 plain, 1 wait,
    2 wait and let the next launch early), and Triton's ``launch_pdl`` where it is on. Read on every launch,
    so kept to a cached lookup and an attribute read (about 0.3 us on a 2-core CPU)."""
    if PDL <= 0 or not _pdl_capable(device):
        return _OFF
    early = EARLY if EARLY is not None else _early.on
    return _EARLY if PDL > 1 and early and kernel not in LATE else _WAIT


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """The first statement of every kernel launched through ``pdl``: wait for the previous kernel (a no-op
    without PDL), then (mode 2) let the next one launch."""
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL > 1:
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def tma_capable(device: torch.device) -> bool:
    """A GPU whose kernels may load tiles by TMA (host descriptors): Hopper or later, with a Triton that has them."""
    return (TensorDescriptor is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (where TMA loads pay: an eager
    launch builds its descriptors on the host)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def tma_addressable(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can cover: unit stride along K, 16-byte aligned base and row stride."""
    es = t.element_size()
    return t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0
