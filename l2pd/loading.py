"""Loading a model for the commands and the lm-eval model: a checkpoint folder or a bundled model, patched,
with its filter (the one given, one stored beside the checkpoint, or the bundled one)."""

from __future__ import annotations

import os


def default_device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def filter_beside(model_dir: str) -> str | None:
    """A filter stored with a checkpoint: ``filter.json`` in the folder itself or in ``filter/``; for a bundled
    model's folder, however its path is spelled, the bundled filter."""
    import l2pd.demo

    for folder in (model_dir, os.path.join(model_dir, "filter")):
        if os.path.isfile(os.path.join(folder, "filter.json")):
            return folder
    real = os.path.realpath(model_dir)
    for bundled_model, bundled_filter in l2pd.demo.FAMILIES.values():
        if real == os.path.realpath(bundled_model) and os.path.isfile(os.path.join(bundled_filter, "filter.json")):
            return bundled_filter
    return None


def load_model(model_dir: str | None, device: str, filter_dir: str | None = None, allow_other_model: bool = False,
               family: str | None = None, weights: str | None = None, kv_cache: str | None = None):
    """(patched model, tokenizer): a checkpoint folder, or the bundled model of ``family`` (default LLaDA's)
    when ``model_dir`` is None. The filter: ``filter_dir``, else one stored beside the checkpoint, else
    (bundled model) the bundled one. ``weights='fp8'`` or ``'w8a8'``: ``l2pd.quantize(model, weights)`` after
    loading; ``kv_cache='fp8'``: an e4m3 K/V cache (``l2pd.quantize(model, kv_cache='fp8')``)."""
    import torch
    from transformers import PreTrainedTokenizerFast

    import l2pd
    import l2pd.demo

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch here (use --device cpu)")
    if model_dir is not None and family is not None:
        raise ValueError("--model-family picks a bundled model; with --model the checkpoint's config decides")
    if filter_dir is not None and not os.path.isfile(os.path.join(filter_dir, "filter.json")):
        raise FileNotFoundError(f"--filter {filter_dir}: no filter.json there (a folder written by `l2pd "
                                "train-filter --out`)")
    if model_dir is None:
        model, tok = l2pd.demo.load(device=device, filter=filter_dir is None, family=family or "llada")
    else:
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"--model {model_dir}: no such folder")
        for name, why in (("config.json", "the model's configuration"),
                          ("tokenizer.json", "the fast tokenizer file; tokenizer.save_pretrained(folder) writes it")):
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise FileNotFoundError(f"--model {model_dir}: no {name} ({why})")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        from .models import load_pretrained

        model = load_pretrained(model_dir, torch_dtype=dtype, device=device)
        tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
        filter_dir = filter_dir or filter_beside(model_dir)
        l2pd.patch(model)
    if weights not in (None, "native") or kv_cache not in (None, "native"):  # before the filter check:
        # quantizing keeps the model's fingerprint
        l2pd.quantize(model, weights or "native", kv_cache=kv_cache)
    if filter_dir is not None:
        l2pd.patch(model, filter=filter_dir, allow_other_model=allow_other_model)
    return model, tok
