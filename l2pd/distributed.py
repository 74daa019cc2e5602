"""Data parallelism over the GPUs of a host for ``collect`` and ``eval``: one process per GPU, started by
``torchrun`` or ``accelerate launch`` (which set RANK / WORLD_SIZE / LOCAL_RANK).

Work is split in fixed units (collection shards, evaluation batches) assigned round-robin by rank, so every
unit is computed exactly as a single process computes it and the merged result is the same.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from an initialised process group or the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_from_env() -> tuple[int, int, str | None]:
    """Join the process group when launched with several processes; returns (rank, world, device or None).

    The device is ``cuda:LOCAL_RANK`` when GPUs are present (NCCL), else None (gloo, CPU)."""
    rank, world, local = env_world()
    if world <= 1:
        return rank, world, None
    device = f"cuda:{local}" if torch.cuda.is_available() else None
    if not dist.is_initialized():
        if device is not None:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device is not None else "gloo")
    return rank, world, device


def mine(index: int, rank: int, world: int) -> bool:
    """Whether work unit ``index`` belongs to ``rank`` (round-robin)."""
    return index % world == rank


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Leave the process group together: a rank that tears its group down while a peer still finishes the
    last collective can abort the peer (gloo), so every rank waits at a barrier first."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` in rank order (all ranks receive the list)."""
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
