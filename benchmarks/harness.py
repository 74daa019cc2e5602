"""The timing helpers every GPU benchmark script shares: device time as a median with its spread, the floors
of the run (copy bandwidth and the bf16 matmul rate, measured once per process), and the run's identity
(device, versions, date, commit) for the JSON each script writes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

_FLOORS: dict[str, float] = {}


def device_times(fn: Callable[[], Any], iters: int = 30, warmup: int = 3) -> list[float]:
    """Device time of each of ``iters`` calls of ``fn`` in ms (CUDA events around each; the host waits)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def device_ms(fn: Callable[[], Any], iters: int = 30, warmup: int = 3) -> float:
    """Median device time of ``fn`` in ms."""
    return statistics.median(device_times(fn, iters, warmup))


def graphed_us(fn: Callable[[int], Any], calls: int, iters: int = 15) -> float:
    """Median device time in microseconds of one of ``fn(0) .. fn(calls - 1)``, captured in one CUDA graph and
    replayed ``iters`` times (each call on its own inputs, so none comes from L2; no launch cost but the graph's)."""
    for i in range(calls):  # compile outside the capture
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return device_ms(g.replay, iters) * 1e3 / calls


def spread(times: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles and the count of a list of timings."""
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median": statistics.median(times), "p10": q[0], "p90": q[-1], "n": len(times)}


def floors(sustain_s: float = 3.0) -> dict[str, float]:
    """The run's floors, measured on first use: copy bandwidth (GB/s, read + write of a 2 GB buffer), the bf16
    matmul rate of an 8192^3 product in bursts and back to back for ``sustain_s`` (a GPU at its power cap lowers
    its clocks under sustained load)."""
    if _FLOORS:
        return dict(_FLOORS)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = device_ms(lambda: dst.copy_(src), iters=20)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    burst = 2 * n**3 / device_ms(lambda: a @ b, iters=20) / 1e9
    torch.cuda.synchronize()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < sustain_s:
        for _ in range(10):
            a @ b
        k += 10
        torch.cuda.synchronize()
    _FLOORS.update(copy_GBps=2 * (1 << 30) * 2 / copy_ms / 1e6, matmul_TFLOPs=burst,
                   matmul_TFLOPs_sustained=2 * n**3 * k / (time.perf_counter() - t0) / 1e12)
    return dict(_FLOORS)


def block_routing(tokens: int, spread: float = 0.3, experts: int = 256, top_k: int = 8):
    """(ids, weights) of LLaDA 2.x's router (sigmoid, 8 groups, 4 kept, scale 2.5) for ``tokens`` whose router
    logits are shared within blocks of 32 (a decode block's masks route alike), plus ``spread`` times each
    token's own noise."""
    from l2pd_kernels import reference as ref

    shared = torch.randn((tokens + 31) // 32, experts, device="cuda").repeat_interleave(32, 0)[:tokens]
    logits = shared + spread * torch.randn(tokens, experts, device="cuda")
    return ref.moe_route(logits, top_k, "sigmoid", torch.zeros(experts, device="cuda"), 8, 4, 2.5)


def run_info() -> dict[str, Any]:
    """Device, versions, date and commit of this run."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": commit or None}


def save(path: str | None, result: dict[str, Any]) -> None:
    """Write ``result`` with the run's identity as JSON (no-op without a path)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**run_info(), **result}, f, indent=1)
