"""Lockstep decoding on the engine: a batch whose rows decode the same block at the same step, as seen in
``generate``'s frame (left-padded prompts, one canvas column per position of the padded batch).

A per-step callback (``on_step``) and a reference answer (``target``: the ``oracle`` strategy, collect's
labels) need this: the engine runs only the rows at the batch's current block; a row whose block is done
waits until every row's is (``Engine._barrier``), and the block after is the earliest block any row still
has to decode. Each row decodes in its own positions (the engine strips the padding); ``offset`` maps them
to the batch's canvas columns.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Lockstep:
    """The batch of one lockstep decode and its frame."""

    requests: list[Any]  # the rows, in batch order
    offsets: list[int]  # canvas column of each row's position 0
    base: torch.Tensor  # [B, T] the canvas as the batch lays it out before decoding (prompts, padding)
    on_step: Callable | None = None  # (block_start, step, token, prob, canvas[, margin, entropy][, target])
    stats: bool = False  # on_step gets margins and entropies
    with_target: bool = False  # on_step gets the block's slice of ``target``
    target: torch.Tensor | None = None  # [B, T] the reference answer in canvas columns (-1 elsewhere)
    block: int | None = None  # the batch's current block start (a canvas column)

    def __post_init__(self) -> None:
        self.index = {id(r): b for b, r in enumerate(self.requests)}
        B, T = self.base.shape
        device = self.base.device
        offsets = torch.tensor(self.offsets, device=device)[:, None]
        cols = torch.arange(T, device=device)[None] - offsets
        self.src, self.inside = cols.clamp(min=0), cols >= 0  # pool column per canvas column, and where it is

    def canvas_start(self, row: Any) -> int:
        """A row's current block start as a canvas column."""
        return row.block + self.offsets[self.index[id(row.request)]]

    def canvas(self, pool: torch.Tensor) -> torch.Tensor:
        """The batch's canvas [B, T] now, gathered from the engine's pool rows."""
        slots = torch.tensor([r.slot for r in self.requests], device=pool.device)
        width = pool.shape[1]
        held = pool[slots[:, None], self.src.clamp(max=width - 1)]
        return torch.where(self.inside & (self.src < width), held, self.base)

    def rows_of(self, order: list[Any]) -> torch.Tensor:
        """Batch indices of the engine rows ``order``."""
        return torch.tensor([self.index[id(r.request)] for r in order], device=self.base.device)

    def call(self, order: list[Any], pool: torch.Tensor, token: torch.Tensor, prob: torch.Tensor,
             margin: torch.Tensor | None, entropy: torch.Tensor | None, mask_id: int) -> None:
        """``on_step`` with [B, W] tensors of the block (``token``/``prob`` [rows, L] of the rows that ran; a
        row that did not run shows the mask id and probability 0) and the batch's canvas before the
        decision."""
        s, step = self.canvas_start(order[0]), order[0].step
        W = order[0].end - order[0].block
        B, idx = len(self.requests), self.rows_of(order)

        def full(x: torch.Tensor, fill: float | int) -> torch.Tensor:
            out = torch.full((B, W), fill, dtype=x.dtype, device=x.device)
            out[idx] = x[: len(order), :W]
            return out

        extra: dict[str, Any] = {}
        if self.stats:
            extra.update(margin=full(margin, 0.0), entropy=full(entropy, 0.0))
        if self.with_target:
            extra["target"] = self.target[:, s : s + W]
        self.on_step(s, step, full(token, mask_id), full(prob, 0.0), self.canvas(pool), **extra)

    def oracle(self, pool: torch.Tensor, order: list[Any], slots: torch.Tensor, cols: torch.Tensor,
               token: torch.Tensor, mask_id: int) -> None:
        """The oracle's decision for rows ``order`` (pool rows ``slots``, block columns ``cols`` [rows, W]):
        every masked position whose guess equals the target; a row that accepts none takes the target's
        whole block. Positions past the answer (target -1) take their guess."""
        s, W = self.canvas_start(order[0]), cols.shape[1]
        target = self.target[self.rows_of(order), s : s + W]
        block = pool[slots[:, None], cols]
        masked = block == mask_id
        want = torch.where(target < 0, token, target)
        accept = masked & (token == want)
        accept |= masked & (masked.any(-1) & ~accept.any(-1))[:, None]
        pool[slots[:, None], cols] = torch.where(accept, want, block)


def takes_target(fn: Any) -> bool:
    """Whether a step callback takes ``target=`` (by name or ``**kwargs``): callbacks written before it existed
    keep working."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "target" or p.kind is p.VAR_KEYWORD for p in params)
