"""Triton kernels for the per-step work of masked-diffusion decoding (no model code, no policy).

``confidence`` and ``decide`` run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``;
``l2pd_kernels.reference`` holds the same ops in plain PyTorch.
"""

from .confidence import confidence
from .decide import decide

__all__ = ["confidence", "decide"]
