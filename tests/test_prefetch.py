"""L2 prefetches of the next product's weight: what a forward prefetches, when it does, that the kernel compiles,
and (on a GPU) that a graphed forward with prefetches gives the values of one without."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from test_llada2 import tiny_llada2

from l2pd.models import adapter_for, pack_layers
from l2pd.models import prefetch as policy
from l2pd.models.decoder import _gap_weights
from l2pd_kernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_budgets_parse_and_bad_settings_raise():
    assert policy._budgets("o:40,mlp:8,qkv:8") == {"o": 40 << 20, "mlp": 8 << 20, "qkv": 8 << 20}
    assert policy._budgets("0") == {} and policy._budgets("off") == {}
    for bad in ("o", "o:x", "attn:4", "o:4;mlp:2", "o:-1"):
        with pytest.raises(ValueError, match="L2PD_PREFETCH"):
            policy._budgets(bad)


def test_no_prefetch_outside_a_capture_on_the_cpu_or_for_many_rows():
    import l2pd_kernels

    cpu = torch.device("cpu")
    assert policy.prefetcher(l2pd_kernels, cpu, 32) is None
    assert policy.prefetcher(reference, cpu, 32) is None
    if torch.cuda.is_available():  # on a GPU outside a capture, and over the row limit
        gpu = torch.device("cuda")
        assert policy.prefetcher(l2pd_kernels, gpu, 32) is None
        assert policy.prefetcher(l2pd_kernels, gpu, policy.MAX_ROWS + 1) is None


def _ptrs(ts):
    return [t.data_ptr() for t in ts if t is not None]


def test_gap_weights_are_the_next_products_weights_in_reading_order():
    model = tiny_model(0)
    dec = adapter_for(model).decoder
    blk = dec.layers[0]
    assert _ptrs(_gap_weights(blk, "o")) == [blk.o.weight.data_ptr()]
    assert _ptrs(_gap_weights(blk, "qkv")) == _ptrs([blk.q.weight, blk.k.weight, blk.v.weight])
    assert _ptrs(_gap_weights(blk, "mlp")) == _ptrs([blk.gate.weight, blk.up.weight, blk.down.weight])
    assert pack_layers(dec.layers, cpu=True)  # packed: the packed buffers, read as one product
    qkv, gate_up = vars(blk.owner)["_l2pd_qkv"], vars(blk.owner)["_l2pd_gate_up"]
    assert _ptrs(_gap_weights(blk, "qkv")) == [qkv.data_ptr()]
    assert _ptrs(_gap_weights(blk, "mlp")) == [gate_up.data_ptr(), blk.down.weight.data_ptr()]

    moe = adapter_for(tiny_llada2(0)).decoder.layers[1]  # a fused q/k/v, the router, a shared expert
    assert _ptrs(_gap_weights(moe, "qkv")) == [moe.qkv.weight.data_ptr()]
    assert _ptrs(_gap_weights(moe, "o")) == _ptrs([moe.o.weight, moe.moe.router.weight])
    assert _ptrs(_gap_weights(moe, "mlp")) == _ptrs([moe.gate.weight, moe.up.weight, moe.down.weight])


def test_e4m3_weights_bring_their_scales():
    import l2pd

    model = l2pd.quantize(tiny_model(1).to(torch.bfloat16), "fp8")
    blk = adapter_for(model).decoder.layers[0]
    assert _ptrs(_gap_weights(blk, "o")) == _ptrs([blk.o.weight, blk.o.weight_scale])


def test_prefetch_kernel_compiles_for_hopper_and_the_a100():
    """The interpreter cannot run inline PTX, so the kernel is compiled ahead of time (Triton's ptxas), as the
    other kernels are in test_kernels_compile.py: bulk 16 KB prefetches for sm_90, line prefetches for sm_80."""
    types = {"addr": "i64", "nbytes": "i64"}
    cases = [{"module": "l2pd_kernels.prefetch", "kernel": "_prefetch_kernel", "types": types,
              "constexprs": {"CHUNK": chunk, "BLOCK": 128, "BULK": chunk > 128}, "options": {"num_warps": 4},
              "targets": targets} for chunk, targets in ((16384, [90]), (128, [90, 80]))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "test_kernels_compile.py")],
                         input=json.dumps(cases), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["ok", "ok"]


@cuda
def test_prefetch_l2_checks_its_input_and_rounds_to_chunks():
    from l2pd_kernels.prefetch import chunk_bytes, prefetch_l2

    t = torch.zeros(1 << 16, dtype=torch.bfloat16, device="cuda")
    c = chunk_bytes(t.device)
    assert prefetch_l2(t) == (t.numel() * 2) // c * c
    assert prefetch_l2(t, c + 5) == c and prefetch_l2(t, c - 1) == 0
    with pytest.raises(ValueError, match="CUDA"):
        prefetch_l2(t.cpu())
    with pytest.raises(ValueError, match="contiguous"):
        prefetch_l2(t.view(256, 256).t())
    with pytest.raises(ValueError, match="outside"):
        prefetch_l2(t, t.numel() * 2 + 1)
    torch.cuda.synchronize()
    assert (t == 0).all()  # a hint: nothing written


@cuda
@pytest.mark.parametrize("make", [lambda: tiny_model(0), lambda: tiny_llada2(0)], ids=["llada", "llada2"])
def test_graphed_forward_with_prefetches_equals_one_without(make, monkeypatch):
    model = make().to(device="cuda", dtype=torch.bfloat16)
    ad = adapter_for(model)
    ids = torch.randint(0, 50, (2, 16), device="cuda")

    def graphed(budgets):
        monkeypatch.setattr(policy, "BUDGETS", budgets)
        with torch.no_grad():
            ad.forward(ids, fused=True)  # compile outside the capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = ad.forward(ids, fused=True)
            g.replay()
            torch.cuda.synchronize()
        return out.clone()

    launched = []
    real = policy.Prefetch.issue
    monkeypatch.setattr(policy.Prefetch, "issue", lambda self, slot, ts: (launched.append(slot), real(self, slot, ts)))
    on = graphed({"o": 1 << 20, "mlp": 1 << 20, "qkv": 1 << 20})
    assert set(launched) == {"o", "mlp", "qkv"}
    off = graphed({})
    assert torch.equal(on, off)
