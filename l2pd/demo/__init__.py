"""The bundled models: small masked-diffusion LMs trained on the word problems of ``task``, one in LLaDA's
format (``assets/model``, its filter in ``assets/filter``), one in Dream's (``assets/dream``, its filter in
``assets/dream/filter``) and one in LLaDA 2.x's (``assets/llada2``: mixture of experts, block-causal; its filter
in ``assets/llada2/filter``)."""

from __future__ import annotations

import os
from typing import Any

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
MODEL_DIR = os.path.join(ASSETS, "model")
FILTER_DIR = os.path.join(ASSETS, "filter")
DREAM_DIR = os.path.join(ASSETS, "dream")
LLADA2_DIR = os.path.join(ASSETS, "llada2")
FAMILIES = {"llada": (MODEL_DIR, FILTER_DIR), "dream": (DREAM_DIR, os.path.join(DREAM_DIR, "filter")),
            "llada2": (LLADA2_DIR, os.path.join(LLADA2_DIR, "filter"))}


def load(device: str | None = None, dtype: Any = None, filter: bool = True, family: str = "llada"):
    """(model, tokenizer) of the bundled checkpoint of ``family`` ('llada', 'dream' or 'llada2'), from package
    data (no network).

    The model comes patched (``model.generate``), with the bundled filter as its default when one ships and
    ``filter`` is true. Default dtype: bf16 on CUDA, fp32 on the CPU (faster there).
    """
    import torch
    from transformers import PreTrainedTokenizerFast

    from .. import patch
    from ..models import load_pretrained

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: the bundled models are {list(FAMILIES)}")
    model_dir, filter_dir = FAMILIES[family]
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"the bundled {family} model is missing from {model_dir}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    model = load_pretrained(model_dir, torch_dtype=dtype, device=device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)  # AutoTokenizer works too; this skips config.json
    flt = None
    if filter and os.path.isfile(os.path.join(filter_dir, "filter.json")):
        from ..filter import Filter

        flt = Filter.from_pretrained(filter_dir)
    return patch(model, filter=flt), tokenizer
