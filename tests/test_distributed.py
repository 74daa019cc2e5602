"""Data-parallel collection and evaluation: 2 processes (gloo, CPU) give what one process gives."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from l2pd.collect import collect
from l2pd.distributed import finish
from tests.conftest import tiny_model

PROMPTS = [[int(t) for t in torch.randint(0, 58, (3 + i % 4,), generator=torch.Generator().manual_seed(i))]
           for i in range(10)]
COLLECT_KW = dict(gen_length=8, block_length=4, batch_size=2, shard_size=2, progress=False)
EVAL_KW = dict(batch_size=2, progress=False, max_new_tokens=32, block_length=32, strategy="threshold",
               cache="dual", backend="torch")


def _eval_problems():
    from l2pd.demo.task import split

    return split("test", 6)


def _worker(rank, world, tmp):
    # one intra-op thread per rank, as torchrun sets OMP_NUM_THREADS=1 for several processes; two ranks with
    # full thread pools on a 2-core machine crashed natively now and then (SIGABRT/SIGBUS in a native thread)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        info = collect(tiny_model(seed=3), PROMPTS, f"{tmp}/multi", **COLLECT_KW)
        import l2pd.demo
        from l2pd.evaluate import evaluate

        model, tok = l2pd.demo.load(device="cpu", filter=False)
        r = evaluate(model, tok, _eval_problems(), **EVAL_KW)
        with open(f"{tmp}/eval{rank}.json", "w") as f:
            keys = ("problems", "accuracy", "mean_nfe", "texts", "nfe", "processes", "problems_per_process")
            json.dump({**{k: r[k] for k in keys}, "shards_written": info["shards_written_here"]}, f)
        finish()  # what the CLI does: leave the group together
    finally:
        if dist.is_initialized():  # only after a failure above
            dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    tmp = str(tmp_path)
    mp.spawn(_worker, args=(2, tmp), nprocs=2, join=True)
    single = collect(tiny_model(seed=3), PROMPTS, f"{tmp}/single", **COLLECT_KW)
    names = sorted(n for n in os.listdir(f"{tmp}/single") if n.endswith(".safetensors"))
    assert len(names) == single["shards"] == 5
    assert sorted(n for n in os.listdir(f"{tmp}/multi") if n.endswith(".safetensors")) == names
    for n in names:
        a, b = load_file(f"{tmp}/single/{n}"), load_file(f"{tmp}/multi/{n}")
        assert all(torch.equal(a[k], b[k]) for k in a)

    import l2pd.demo
    from l2pd.evaluate import evaluate

    model, tok = l2pd.demo.load(device="cpu", filter=False)
    one = evaluate(model, tok, _eval_problems(), **EVAL_KW)
    written = []
    for rank in (0, 1):  # every process holds the merged figures
        with open(f"{tmp}/eval{rank}.json") as f:
            two = json.load(f)
        written.append(two["shards_written"])
        assert two["processes"] == 2 and two["problems"] == 6
        assert two["problems_per_process"] == [4, 2]  # batches 0 and 2 on rank 0, batch 1 on rank 1
        assert two["texts"] == one["texts"] and two["nfe"] == one["nfe"]
        assert two["accuracy"] == one["accuracy"] and two["mean_nfe"] == one["mean_nfe"]
    assert written == [3, 2]  # shards 0, 2, 4 on rank 0; 1, 3 on rank 1: the work was split, not repeated
