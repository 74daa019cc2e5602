"""Load the bundled model on the CPU and decode one test problem with `steps` (256 tokens, block 32).

    python benchmarks/studies/cpu_decode_time.py --caches none,dual

Prints the decode time per cache, the time since start (imports and loading included) and the answer.
"""

import argparse
import time

T0 = time.perf_counter()

import torch  # noqa: E402

import l2pd.demo as demo  # noqa: E402
from l2pd.demo.task import split  # noqa: E402
from l2pd.evaluate import encode_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caches", default="none")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = demo.load(device="cpu")
    problem = split("test", 1)[0]
    ids, mask = encode_prompts(tok, [problem.question], "cpu")
    for cache in args.caches.split(","):
        t1 = time.perf_counter()
        out = model.generate(ids, mask, max_new_tokens=256, block_length=32, strategy="steps", cache=cache)
        now = time.perf_counter()
        print(f"cache {cache}: decode {now - t1:.1f} s, since start {now - T0:.1f} s")
        print(repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)), "expected", problem.answer)


if __name__ == "__main__":
    main()
