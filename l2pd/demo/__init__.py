"""The bundled model: a small LLaDA-format masked-diffusion LM trained on the word problems of ``task``."""

from __future__ import annotations

import os
from typing import Any

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
MODEL_DIR = os.path.join(ASSETS, "model")
FILTER_DIR = os.path.join(ASSETS, "filter")


def load(device: str | None = None, dtype: Any = None, filter: bool = True):
    """(model, tokenizer) of the bundled checkpoint, from package data (no network).

    The model comes patched (``model.generate``), with the bundled filter as its default when one ships and
    ``filter`` is true. Default dtype: bf16 on CUDA, fp32 on the CPU (faster there).
    """
    import torch
    from transformers import PreTrainedTokenizerFast

    from .. import patch
    from ..models.llada import LLaDAModelLM

    if not os.path.isfile(os.path.join(MODEL_DIR, "config.json")):
        raise FileNotFoundError(f"the bundled model is missing from {MODEL_DIR}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model = LLaDAModelLM.from_pretrained(MODEL_DIR, torch_dtype=dtype, device=device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR)  # AutoTokenizer works too; this skips config.json
    flt = None
    if filter and os.path.isfile(os.path.join(FILTER_DIR, "filter.json")):
        from ..filter import Filter

        flt = Filter.from_pretrained(FILTER_DIR)
    return patch(model, filter=flt), tokenizer
