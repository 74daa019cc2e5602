"""Bring a tensor's bytes into the GPU's L2 cache ahead of the kernel that reads them.

At batch 1 a decoder layer's products stream their weights, and between them the norms, RoPE and attention
leave HBM mostly idle. A prefetch issued at the start of such a gap, on a side stream, could load the next
product's weight into L2. Measured on an H200 (``benchmarks/studies/l2_prefetch.py``; ``benchmarks/RESULTS.md``,
"Prefetching weights into L2"), it does not pay: a 32-row product of an 8 to 32 MB weight takes about as long
with its weight in L2 as from HBM (its programs, not HBM, bound it), and a forward with prefetches was 0% to 2%
slower. So no forward calls this; it stays with its study. A prefetch writes nothing: no value changes.

Hopper (sm_90): one ``cp.async.bulk.prefetch.L2`` per 16 KB chunk. Other GPUs (or ``lines``):
``prefetch.global.L2::evict_last`` per 128-byte line.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128  # chunks per program: one per thread at 4 warps


@triton.jit
def _prefetch_kernel(addr, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BULK: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    # lanes past the end fetch the last whole chunk again (a prefetch has no mask; fetching twice is free)
    at = addr + tl.minimum(offs, nbytes - CHUNK)
    if BULK:
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                  [at, tl.full([BLOCK], CHUNK, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                                  [at], dtype=tl.int32, is_pure=False, pack=1)


def chunk_bytes(device: torch.device) -> int:
    """The bytes one prefetch instruction covers on ``device``: 16 KB bulk prefetches on sm_90 and later,
    128-byte lines elsewhere."""
    return 16384 if torch.cuda.get_device_capability(device)[0] >= 9 else 128


def prefetch_l2(t: torch.Tensor, nbytes: int | None = None, lines: bool = False) -> int:
    """Ask the GPU to bring the first ``nbytes`` of ``t`` (contiguous, on CUDA; all of it by default) into L2.
    Asynchronous on the current stream, graph-safe, writes nothing. Returns the bytes asked for: ``nbytes``
    rounded down to whole chunks (``chunk_bytes``; ``lines``: 128-byte line prefetches on any GPU), 0 where
    that leaves nothing."""
    if t.device.type != "cuda":
        raise ValueError(f"prefetch_l2 needs a CUDA tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"prefetch_l2 needs a contiguous tensor, got strides {t.stride()} for {tuple(t.shape)}")
    size = t.numel() * t.element_size()
    nbytes = size if nbytes is None else nbytes
    if not 0 <= nbytes <= size:
        raise ValueError(f"nbytes={nbytes} outside the tensor's {size} bytes")
    chunk = 128 if lines else chunk_bytes(t.device)
    start = t.data_ptr()
    skip = -start % 16  # bulk prefetches start 16-byte aligned
    chunks = max(nbytes - skip, 0) // chunk
    if chunks == 0:
        return 0
    grid = (triton.cdiv(chunks, BLOCK),)
    _prefetch_kernel[grid](start + skip, chunks * chunk, CHUNK=chunk, BLOCK=BLOCK, BULK=chunk > 128, num_warps=4)
    return chunks * chunk
