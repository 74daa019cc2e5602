"""Triton kernels for the per-step work of masked-diffusion decoding (no model code, no policy).

Decision: ``confidence`` and ``decide``. Forward: ``rms_norm`` (with the residual add), ``rope_qkv`` (with the
K/V cache write) and ``silu_mul``. They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``;
``l2pd_kernels.reference`` holds the same ops in plain PyTorch.
"""

from .confidence import confidence
from .decide import decide
from .rms_norm import rms_norm
from .rope import rope_qkv
from .silu_mul import silu_mul

__all__ = ["confidence", "decide", "rms_norm", "rope_qkv", "silu_mul"]
