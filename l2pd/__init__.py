"""l2pd: fast parallel decoding for diffusion language models (LLaDA)."""

from .cache import BlockKVCache
from .decode import GenerateOutput, generate
from .models.llada import LLaDAConfig, LLaDAModelLM
from .patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "BlockKVCache",
    "GenerateOutput",
    "LLaDAConfig",
    "LLaDAModelLM",
    "generate",
    "patch",
    "unpatch",
]
