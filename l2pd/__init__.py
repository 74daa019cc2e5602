"""l2pd: fast parallel decoding for diffusion language models (LLaDA, Dream, LLaDA 2.x)."""

import importlib
from typing import Any

from .cache import BlockKVCache
from .collect import collect  # the function; the module stays importable as l2pd.collect via sys.modules
from .decode import GenerateOutput, generate
from .evaluate import evaluate  # the function, as with collect
from .filter import Filter
from .models import DreamConfig, DreamModel, LLaDA2Config, LLaDA2MoeModelLM, LLaDAConfig, LLaDAModelLM, load_pretrained
from .patch import patch, unpatch
from .quantize import quantize
from .train import train_filter

__version__ = "0.1.0"

__all__ = [
    "BlockKVCache",
    "DreamConfig",
    "DreamModel",
    "Filter",
    "GenerateOutput",
    "LLaDA2Config",
    "LLaDA2MoeModelLM",
    "LLaDAConfig",
    "LLaDAModelLM",
    "collect",
    "demo",
    "evaluate",
    "generate",
    "load_pretrained",
    "patch",
    "quantize",
    "trace",
    "train_filter",
    "unpatch",
]

_LAZY = ("demo", "trace", "sweep", "cli")  # submodules imported on first use: `l2pd.demo.load()` after `import l2pd`


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'l2pd' has no attribute {name!r}")
