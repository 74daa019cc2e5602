"""Scaling of data-parallel collection over the GPUs of a host (needs 2 or more GPUs).

    python benchmarks/studies/collect_scaling.py --prompts 4000 --gpus 1,2

Runs `torchrun --nproc_per_node N -m l2pd.cli collect` on the bundled model for each N into fresh folders,
checks that every run wrote identical shards, and prints the wall time and the speedup over one GPU.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4000)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args()
    root = tempfile.mkdtemp()
    rows, ref = [], None
    for n in map(int, args.gpus.split(",")):
        out = os.path.join(root, f"gpus{n}")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "-m", "l2pd.cli", "collect",
               "--out", out, "--num-prompts", str(args.prompts), "--batch-size", str(args.batch_size),
               "--shard-size", str(args.batch_size)]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        seconds = time.time() - t0
        shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        data = [load_file(os.path.join(out, f)) for f in shards]
        if ref is None:
            ref = data
        same = len(ref) == len(data) and all(
            all((a[k] == b[k]).all() for k in a) for a, b in zip(ref, data))
        rows.append({"gpus": n, "seconds": seconds, "identical_to_first": bool(same)})
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
