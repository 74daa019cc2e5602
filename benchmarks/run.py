"""One entry point for the benchmark suites, named for what they answer:

    python benchmarks/run.py SUITE [the suite's own arguments]

  kernels    the per-step kernels against their references and the memory floor (pytest-benchmark, GPU)
  step       the LLaDA-8B-shaped step and generate against the floors (pytest-benchmark, GPU)
  generate   the LLaDA-8B-shaped generate grid, profile and token identity as one table (GPU)
  dream      Dream-7B shapes: step and generate against the floor (GPU)
  llada2     LLaDA2.0-mini shapes: checks, the MoE layer, generate against the touched-weight floor (GPU)
  moe        fused_moe tile sweep at LLaDA2.0-mini shapes (GPU)
  serve      continuous batching against static generate batches (GPU at 8B shapes, or the bundled model)
  frontier   accuracy against forwards of threshold, learn2pd and the shared filter (bundled model; GPU for
             the full sizes)
  quality    Learn2PD end to end on the bundled model: collect, train, the tables
  profile    where a cached 8B step's device time goes, by kernel (GPU)

The microbenchmarks also run together with ``pytest benchmarks/ --benchmark-only``. Scripts that answered
a one-time question are in benchmarks/studies/ (its README says what each showed); data files in
benchmarks/data/.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SUITES = {
    "kernels": ["-m", "pytest", os.path.join(HERE, "test_kernels_bench.py"), "--benchmark-only"],
    "step": ["-m", "pytest", os.path.join(HERE, "test_decode_bench.py"), "--benchmark-only"],
    "generate": [os.path.join(HERE, "decode_8b.py")],
    "dream": [os.path.join(HERE, "dream_7b.py")],
    "llada2": [os.path.join(HERE, "llada2_mini.py")],
    "moe": [os.path.join(HERE, "moe_configs.py")],
    "serve": [os.path.join(HERE, "serve_bench.py")],
    "frontier": [os.path.join(HERE, "filter_frontier.py")],
    "quality": [os.path.join(HERE, "learn2pd_bundled.py")],
    "profile": [os.path.join(HERE, "profile_step.py")],
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd = [sys.executable, *SUITES[argv[0]], *argv[1:]]
    root = os.path.dirname(HERE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, cwd=root, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
