"""What the kernels' launch rules read of a GPU, read once per device: its SM count, its name and the shared
memory one program may use. Under the interpreter (CPU tensors): 4 SMs, no name, unlimited shared memory."""

from __future__ import annotations

import functools

import torch


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
