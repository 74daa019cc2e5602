"""The host's share of an engine iteration: packing the iteration's indices (`pytest benchmarks/
--benchmark-only -k engine_pack`). Runs on any machine (host work; the bundled LLaDA-format model on the CPU).

A pack is rebuilt (a *miss*) when a row starts or leaves a block or joins, which at batch 1 is every forward
but those inside a block: with a threshold rule at block 128 (about 2.4 forwards per block) most of them. A
*hit* only rewrites the decide words. ``pad``: the token, row and program counts rounded up to the CUDA-graph
buckets, as on the GPU.
"""

import pytest


@pytest.fixture(scope="module")
def bundled():
    from l2pd.demo import load
    from l2pd.demo.task import split
    from l2pd.demo.tokenizer import prompt_text

    model, tok = load(device="cpu")
    return model, [tok(prompt_text(tok, p.question))["input_ids"] for p in split("test", 64)]


@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.parametrize("kind", ["miss", "hit"])
def test_engine_pack(benchmark, bundled, rows, kind):
    from l2pd.engine import Engine

    model, prompts = bundled
    engine = Engine(model, max_batch=rows, max_length=768, max_block_length=32, backend="torch")
    for p in prompts[:rows]:
        engine.submit(p, max_new_tokens=128, block_length=32, strategy="steps", steps=128, cache="dual",
                      refresh="window", eotp=False)
    engine.step()
    engine.step()  # every row inside its first block
    order = sorted(engine.rows.values(), key=lambda r: r.slot)
    assert len(order) == rows

    def pack():
        if kind == "miss":
            engine._packed = None
        return engine._pack(order, [rows], True)

    pack()
    parts, meta, _ = benchmark(pack)
    benchmark.extra_info.update(rows=rows, fed_tokens=len(parts[0]), kind=kind)
    assert meta["rows"] >= rows
