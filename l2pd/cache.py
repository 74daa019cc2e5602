"""Block-level KV cache (prefix and dual), as in Fast-dLLM.

Keys are stored after RoPE, one slot per sequence position. A refresh (a forward over the whole canvas at a
block boundary) fills every slot. Inside a block, a step feeds a contiguous range of positions: in ``prefix``
mode the current block and everything after it, in ``dual`` mode the current block only. The fed positions
overwrite their own slots and attention runs over all slots, so the positions not fed (the prefix; in dual
mode the suffix too) use K/V from the last refresh. Prefix mode is exact once the prefix is final; dual mode
approximates the suffix's K/V until the next refresh.
"""

from __future__ import annotations

import torch

CACHE_MODES = ("none", "prefix", "dual")


class BlockKVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        length: int,
        head_dim: int,
        mode: str = "prefix",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if mode not in ("prefix", "dual"):
            raise ValueError(f"cache mode {mode!r}: expected 'prefix' or 'dual'")
        self.mode = mode
        self.length = length
        shape = (n_layers, batch, n_kv_heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, config, batch: int, length: int, mode: str, dtype, device) -> "BlockKVCache":
        n_kv = config.n_kv_heads or config.n_heads
        return cls(config.n_layers, batch, n_kv, length, config.d_model // config.n_heads, mode, dtype, device)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write K/V of positions ``start .. start + S`` and return this layer's full K/V."""
        end = start + k.shape[2]
        if end > self.length:
            raise ValueError(f"positions {start}..{end} exceed the cache length {self.length}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer], self.v[layer]

    def feed_range(self, block_start: int, block_end: int) -> tuple[int, int]:
        """Positions a step inside the block [block_start, block_end) must feed."""
        return (block_start, self.length) if self.mode == "prefix" else (block_start, block_end)
