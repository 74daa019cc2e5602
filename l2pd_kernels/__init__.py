"""Triton kernels for the per-step work of masked-diffusion decoding (no model code, no policy).

Decision: ``confidence`` and ``decide``. Forward: ``rms_norm`` (with the residual add; ``rms_norm_fp8`` also
quantizes its output), ``rope_qkv`` (with the K/V cache write), ``silu_mul``, and the few-row matmuls of a
cached step (``skinny_matmul``, ``gate_up_silu``; ``linear`` and ``linear_gate_up_silu`` choose between them
and cuBLAS; ``linear_fp8`` and ``linear_w8a8`` for e4m3 weights with per-channel scales, the second with
per-token e4m3 activations from ``quantize_rows``; ``linear_gate_up_silu_fp8`` the gated half of an MLP from
packed e4m3 weights), ``linear_rope_qkv`` (a cached step's q/k/v product and ``rope_qkv`` in one launch),
``pool_attention`` (packed requests over the engine's slot pool), ``cached_attention``
(a cached step's few queries over a long canvas, its keys split across programs), ``fused_moe`` and
``moe_route`` (a mixture-of-experts MLP's routed experts and its router; ``moe_combine`` their last step). They
run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``; ``l2pd_kernels.reference`` holds the
same ops in plain PyTorch.
"""

from .attention import cached_attention, pool_attention
from .confidence import confidence
from .decide import decide
from .fp8 import linear_fp8, linear_gate_up_silu_fp8, linear_w8a8, quantize_rows
from .moe import fused_moe, moe_combine, moe_route
from .qkv_rope import linear_rope_qkv
from .rms_norm import rms_norm, rms_norm_fp8
from .rope import rope_qkv
from .silu_mul import silu_mul
from .skinny import gate_up_silu, linear, linear_f32, linear_gate_up_silu, skinny_matmul

__all__ = ["cached_attention", "confidence", "decide", "fused_moe", "gate_up_silu", "linear", "linear_f32",
           "linear_fp8", "linear_gate_up_silu", "linear_gate_up_silu_fp8", "linear_rope_qkv", "linear_w8a8",
           "moe_combine", "moe_route", "pool_attention", "quantize_rows", "rms_norm", "rms_norm_fp8", "rope_qkv",
           "silu_mul", "skinny_matmul"]
