"""l2pd: fast parallel decoding for diffusion language models (LLaDA)."""

from .cache import BlockKVCache
from .collect import collect  # the function; the module stays importable as l2pd.collect via sys.modules
from .decode import GenerateOutput, generate
from .filter import Filter
from .models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, load_pretrained
from .patch import patch, unpatch
from .train import train_filter

__version__ = "0.1.0"

__all__ = [
    "BlockKVCache",
    "DreamConfig",
    "DreamModel",
    "Filter",
    "GenerateOutput",
    "LLaDAConfig",
    "LLaDAModelLM",
    "collect",
    "generate",
    "load_pretrained",
    "patch",
    "train_filter",
    "unpatch",
]
