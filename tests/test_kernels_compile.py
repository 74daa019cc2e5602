"""Kernels compile for Hopper (sm_90) on this machine, no GPU needed: Triton compiles ahead of time for a named
target. The interpreter (TRITON_INTERPRET=1) checks the kernels' numbers but not what only the compiler
checks (a loop-carried value that changes shape, a return whose type depends on a branch), so the kernels
here are compiled in the configurations the forward launches."""

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from l2pd_kernels import moe, rope

HOPPER = GPUTarget("cuda", 90, 32)


def _compile(fn, types: dict, constexprs: dict, **options):
    """``fn`` compiled for HOPPER: every argument typed (``types``; the rest i32) or fixed (``constexprs``)."""
    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=HOPPER, options={"num_warps": 4, **options})


ROPE_TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
              "slots_ptr": "*i64", "rows_ptr": "*i64", "qo_ptr": "*bf16", "ko_ptr": "*bf16", "vo_ptr": "*bf16",
              "qw_ptr": "*bf16", "kw_ptr": "*bf16", "eps": "fp32"}


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("half,rest", [(64, 0), (32, 64)])  # whole heads; LLaDA 2.x's partial RoPE
def test_rope_qkv_compiles(norm, rows, half, rest):
    k = _compile(rope._rope_qkv_kernel, ROPE_TYPES,
                 dict(HALF=half, VHALF=64, REST=rest, HB=16, HKVB=4, ROWS=rows, NORM=norm))
    assert k.asm["cubin"]


def test_moe_align_compiles():
    types = {"ids_ptr": "*i64", "counts_ptr": "*i32", "pairs_ptr": "*i64", "block_expert_ptr": "*i64"}
    assert _compile(moe._align_count_kernel, types, dict(CHUNK=1024)).asm["cubin"]
    assert _compile(moe._align_place_kernel, types, dict(BLOCK_M=64, CHUNK=1024, E_P=256, NB=128)).asm["cubin"]


@pytest.mark.parametrize("scan", [False, True])
def test_moe_gemms_and_combine_compile(scan):
    block_m, (bn, bk, warps, stages), _ = moe.pick_config(32 if scan else 2048, 8, 256)
    fixed = dict(UPCAST=False, PREC="tf32", SCAN=scan, PAIRS=256 if scan else 16384, BLOCK_M=block_m,
                 BLOCK_N=bn, BLOCK_K=bk)
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "act_ptr": "*bf16", "out_ptr": "*bf16", "pairs_ptr": "*i64",
            "expert_ptr": "*i64"}
    assert _compile(moe._gate_up_kernel, ptrs, dict(fixed, TOPK=8), num_warps=warps, num_stages=stages).asm["cubin"]
    assert _compile(moe._down_kernel, ptrs, fixed, num_warps=warps, num_stages=stages).asm["cubin"]
    types = {"part_ptr": "*bf16", "weight_ptr": "*fp32", "shared_ptr": "*bf16", "out_ptr": "*bf16"}
    assert _compile(moe._combine_kernel, types, dict(K=8, SHARED=True, BLOCK_D=1024),
                    enable_fp_fusion=False).asm["cubin"]


def test_moe_route_compiles():
    types = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": "*i64", "w_ptr": "*fp32", "scale": "fp32"}
    fixed = dict(TOPK=8, TOPK_P=8, E_P=256, GROUPS=8, GROUPS_P=8, KEEP=4, SIGMOID=True, HAS_BIAS=True,
                 NORMALIZE=True)
    assert _compile(moe._route_kernel, types, fixed, num_warps=1).asm["cubin"]
