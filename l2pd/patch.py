"""``l2pd.patch(model)``: give a LLaDA or Dream model (ours or the official remote-code class) l2pd's ``generate``.

Only the module tree and config keys of the official checkpoints are relied on; the model's own forward and
generate are never called, so the official class works as loaded with ``trust_remote_code=True``.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Any

from .decode import generate
from .models import adapter_for


def check_llada(model: Any) -> None:
    """Raise ValueError naming what is missing if ``model`` is not a LLaDA or Dream model l2pd can drive."""
    adapter_for(model)


def patch(model: Any, filter: Any = None, allow_other_model: bool = False) -> Any:
    """Attach ``model.generate(...)`` (``l2pd.decode.generate``); returns the same model.

    ``filter`` (an ``l2pd.Filter`` or a folder holding one) becomes the default for ``strategy='learn2pd'``
    and for ``l2pd.evaluate``, and the default decoding stored with it (``l2pd tune --rules``) the default
    without a strategy; without it, a filter attached earlier (``l2pd.demo.load`` attaches the
    bundled one) stays; ``filter=False`` drops it. A filter records the model it was trained for;
    ``allow_other_model=True`` uses it on another one (a fine-tune, another dtype of the same weights is not
    "other").
    """
    check_llada(model)
    if filter is None:
        filter = getattr(model, "l2pd_filter", None)
    elif filter is False:
        filter = None
    elif isinstance(filter, (str, os.PathLike)):
        from .filter import Filter

        filter = Filter.from_pretrained(filter)
    if filter is not None:
        filter.check_model(model, allow_other_model=allow_other_model)
    if "_l2pd_saved_generate" not in vars(model):
        model._l2pd_saved_generate = vars(model).get("generate", _MISSING)

    @functools.wraps(generate)
    def bound_generate(*args: Any, **kwargs: Any):
        if kwargs.get("filter") is None and filter is not None:
            block = kwargs.get("block_length")
            if kwargs.get("strategy") is None and block is not None and block != filter.block_length:
                # the attached filter is a default, not a demand: another block length decodes by threshold
                warnings.warn(f"the model's filter was trained for block_length={filter.block_length}, not "
                              f"{block}: decoding with strategy='threshold' (pass strategy= to choose)",
                              stacklevel=2)
                kwargs["strategy"] = "threshold"
            else:
                kwargs["filter"] = filter
        return generate(model, *args, **kwargs)

    # help(model.generate) and inspect show generate's own arguments, without the bound model
    sig = inspect.signature(generate)
    bound_generate.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])

    model.generate = bound_generate
    model.l2pd_filter = filter
    return model


_MISSING = object()


def unpatch(model: Any) -> Any:
    """Undo ``patch``: the model's own ``generate`` (if any) is back."""
    saved = vars(model).get("_l2pd_saved_generate", None)
    if saved is None:
        return model
    del model.generate
    if saved is not _MISSING:
        model.generate = saved
    del model._l2pd_saved_generate
    del model.l2pd_filter
    return model
