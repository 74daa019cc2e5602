"""Print a pytest-benchmark JSON file as a table: one line per case, its parameters and ``extra_info``.

    python benchmarks/bench_table.py runs/kernels.json [--keys GBps,graph_GBps,splits]
"""

from __future__ import annotations

import argparse
import json


def rows(path: str, keys: list[str] | None) -> list[str]:
    with open(path) as f:
        data = json.load(f)
    out = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        shown = {k: v for k, v in info.items() if keys is None or k in keys}
        cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
        out.append(f"{b['name']:<60} median {b['stats']['median'] * 1e3:9.3f} ms  " + "  ".join(cells))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--keys", help="comma-separated extra_info keys to show (default: all)")
    args = ap.parse_args(argv)
    for path in args.json:
        print("\n".join(rows(path, args.keys.split(",") if args.keys else None)))


if __name__ == "__main__":
    main()
