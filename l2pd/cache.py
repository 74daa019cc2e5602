"""Block-level KV cache (prefix and dual), as in Fast-dLLM, with a full, tail or window refresh.

Keys are stored after RoPE, one slot per sequence position; the forward writes the K/V of the positions it
is fed into their slots and attends over all slots. Inside a block, a step feeds a contiguous range of
positions: in ``prefix`` mode the current block and everything after it, in ``dual`` mode the current block
only, so the positions not fed (the prefix; in dual mode the suffix too) use K/V from the last refresh.

The refresh is the first forward of each block. ``refresh="full"`` feeds the whole canvas (Fast-dLLM):
prefix mode is then exact once the prefix is final. ``refresh="tail"`` feeds the whole canvas only at the
first block; later blocks feed from the start of the block just finished (so its final tokens get their K/V)
to the end, and keep the prompt's K/V and those of older blocks from earlier refreshes: about a quarter of
the tokens of a full refresh at prompt 512 + 256 new tokens, approximate in the same way as the dual cache.
``refresh="window"`` (dual mode) feeds only the block just finished and the new block: two blocks, the cost
of about one step; the suffix then keeps the K/V of the first forward (computed over masks). In prefix mode,
whose steps feed the suffix anyway, ``window`` is ``tail``.

``dtype=torch.float8_e4m3fn`` stores K and V in e4m3 with one fp32 scale per (row, K/V head, position) in
``k_scale``/``v_scale``: half the memory (``l2pd.quantize(model, kv_cache="fp8")``).
"""

from __future__ import annotations

import torch

CACHE_MODES = ("none", "prefix", "dual")
REFRESH_MODES = ("full", "tail", "window")


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
        refresh: str = "full",
    ) -> None:
        if mode not in ("prefix", "dual"):
            raise ValueError(f"cache mode {mode!r}: expected 'prefix' or 'dual'")
        if refresh not in REFRESH_MODES:
            raise ValueError(f"refresh {refresh!r}: expected one of {REFRESH_MODES}")
        self.mode, self.refresh, self.length = mode, refresh, length
        shape = (n_layers, batch, n_kv_heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_scale = self.v_scale = None
        if dtype == torch.float8_e4m3fn:
            self.k_scale = torch.ones(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.ones(shape[:-1], dtype=torch.float32, device=device)

    def narrow(self, n: int) -> "BlockKVCache":
        """The first ``n`` rows, sharing this cache's memory (each layer's [n, H, T, D] stays contiguous)."""
        view = object.__new__(BlockKVCache)
        view.mode, view.refresh, view.length = self.mode, self.refresh, self.length
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        view.k_scale = view.v_scale = None
        if self.k_scale is not None:
            view.k_scale, view.v_scale = self.k_scale[:, :n], self.v_scale[:, :n]
        return view

    def reorder(self, rows: torch.Tensor) -> None:
        """Rows ``[:len(rows)]`` take the K/V of rows ``rows``, a layer at a time (a small temporary)."""
        n = rows.shape[0]
        for layer in range(self.k.shape[0]):
            for t in (self.k, self.v, self.k_scale, self.v_scale):
                if t is not None:
                    t[layer, :n] = t[layer].index_select(0, rows)

    @classmethod
    def for_model(cls, config, batch: int, length: int, mode: str, dtype, device,
                  refresh: str = "full") -> "BlockKVCache":
        n_kv = config.n_kv_heads or config.n_heads
        return cls(config.n_layers, batch, n_kv, length, config.d_model // config.n_heads, mode, dtype, device,
                   refresh)

    def feed_range(self, block_start: int, block_end: int) -> tuple[int, int]:
        """Positions a step inside the block [block_start, block_end) must feed."""
        return feed_range(self.mode, block_start, block_end, self.length)

    def refresh_range(self, previous_block_start: int | None, block_end: int) -> tuple[int, int]:
        """Positions the first forward of the block ending at ``block_end`` feeds (``previous_block_start``:
        None at the first block)."""
        return refresh_range(self.mode, self.refresh, previous_block_start, block_end, self.length)


def feed_range(mode: str, block_start: int, block_end: int, length: int) -> tuple[int, int]:
    """Positions a step inside the block [block_start, block_end) of a canvas of ``length`` feeds."""
    if mode == "none":
        return 0, length
    return (block_start, length) if mode == "prefix" else (block_start, block_end)


def refresh_range(mode: str, refresh: str, previous_block_start: int | None, block_end: int,
                  length: int) -> tuple[int, int]:
    """Positions the first forward of a block feeds (``previous_block_start``: None at the first block)."""
    if mode == "none" or refresh == "full" or previous_block_start is None:
        return 0, length
    end = block_end if refresh == "window" and mode == "dual" else length
    return previous_block_start, end
