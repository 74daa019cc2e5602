"""One decode's settings, resolved and checked once: ``resolve`` turns ``generate``'s arguments (Hugging Face
conventions, a filter's operating point, defaults) into a ``DecodeSpec`` and the prompt tensors on the model's
device, or raises a ValueError naming the argument. The block loop and the step read the spec, never the raw
arguments.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .cache import CACHE_MODES, REFRESH_MODES
from .hf import StopCutter, as_input_ids, end_ids, from_generation_config, refuse_unknown

STRATEGIES = ("steps", "threshold", "margin", "persistence", "learn2pd", "oracle")
# rules that accept by a score against the threshold, plus the most confident position (no schedule)
THRESHOLD_RULES = ("threshold", "margin", "persistence")
EOTP_MODES = ("off", "accepted", "predicted")


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode does, every value resolved: the loop and the step read these fields."""

    strategy: str  # steps | threshold | margin | persistence | learn2pd | oracle
    threshold: float  # the rule's tau (inf for steps: no position passes, the schedule decides)
    eotp: str  # off | accepted | predicted
    block_length: int
    max_new_tokens: int
    steps_per_block: int  # the schedule's forwards per block (its top-k spreads the block's masks over them)
    temperature: float  # 0: greedy
    seed: int | None  # set when sampling
    cache: str  # none | prefix | dual
    refresh: str  # full | tail | window
    mask_id: int
    eos_id: int  # the end of text of EoTP and of the answer's padding
    pad_id: int
    filter: Any  # learn2pd's filter, else None
    backend: str | None  # the decision's ops: None (auto), 'triton' or 'torch'
    cuda_graph: bool
    return_dict: bool
    step_stats: bool  # on_step also gets margins and entropies
    stops: StopCutter  # extra end ids and stop strings
    streamer: Any = None
    target: torch.Tensor | None = None  # a reference answer [B, G]: the oracle's, or collect's labels
    on_step: Any = None  # (block_start, step, token, prob, canvas) after each forward
    persist: int = 1  # persistence: forwards a guess must stay the same
    edit: float | None = None  # token editing (LLaDA 2.1): rewrite decided positions whose guess passes this
    edit_steps: int = 16  # forwards a block may keep editing once it has no masks
    answer: torch.Tensor | None = None  # a partial answer [B, G] to continue from (mask ids where undecided)

    @property
    def rule(self) -> str:
        """The decision's score without a filter: confidence, margin or persistence."""
        return self.strategy if self.strategy in ("margin", "persistence") else "confidence"

    @property
    def fixed_k(self) -> bool:
        """Whether the top-k fallback is the most confident position only (the threshold rules)."""
        return self.strategy in THRESHOLD_RULES


def resolve(adapter: Any, input_ids: Any = None, attention_mask: Any = None, max_new_tokens: Any = None,
            block_length: Any = None, strategy: str | None = None, threshold: Any = None, eotp: Any = None,
            cache: str = "none", refresh: str = "full", temperature: Any = None, steps: Any = None,
            seed: int | None = None, filter: Any = None, backend: str | None = None, streamer: Any = None,
            return_dict_in_generate: bool | None = None, mask_token_id: Any = None, eos_token_id: Any = None,
            pad_token_id: Any = None, target: torch.Tensor | None = None, on_step: Any = None,
            step_stats: bool = False, cuda_graph: bool | None = None, compact: bool = True, max_length: Any = None,
            do_sample: bool | None = None, num_return_sequences: Any = None, generation_config: Any = None,
            stop_strings: Any = None, tokenizer: Any = None, inputs: Any = None, persist: Any = None,
            edit_threshold: Any = None, edit_steps: Any = None, answer: Any = None,
            kwargs: dict[str, Any] | None = None) -> tuple[DecodeSpec, torch.Tensor, torch.Tensor | None]:
    """(spec, input_ids [B, P] int64, attention_mask [B, P] or None), both on the model's device; the
    arguments are ``l2pd.generate``'s (see its docstring), ``kwargs`` the unknown ones (refused by name)."""
    refuse_unknown(dict(kwargs or {}))
    _compact(compact)
    if inputs is not None:
        if input_ids is not None:
            raise ValueError("give the prompt as input_ids or as inputs, not both")
        input_ids = inputs
    if input_ids is None:
        raise ValueError("generate() needs input_ids (the prompt's token ids, [B, P])")
    filter = _as_filter(filter)
    if generation_config is not None:  # the arguments given win over the config's
        (max_new_tokens, max_length, do_sample, temperature, num_return_sequences, eos_token_id, pad_token_id,
         stop_strings, return_dict_in_generate) = _with_generation_config(generation_config, dict(
            max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample, temperature=temperature,
            num_return_sequences=num_return_sequences, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            stop_strings=stop_strings, return_dict_in_generate=return_dict_in_generate))
    temperature = _temperature(do_sample, temperature)
    input_ids = as_input_ids(input_ids, adapter.vocab_rows)
    attention_mask = _as_mask(attention_mask)
    if max_new_tokens is None:
        max_new_tokens = _from_max_length(max_length, input_ids.shape[-1])
    if num_return_sequences is not None and _positive_int("num_return_sequences", num_return_sequences) > 1:
        input_ids, attention_mask = _repeat(input_ids, attention_mask, num_return_sequences,
                                            strategy == "oracle" or on_step is not None)
    ends, mask_id, eos_id, pad_id = _ids(adapter, eos_token_id, mask_token_id, pad_token_id)

    strategy, block_length, threshold, eotp, persist = _defaults(filter, strategy, block_length, threshold, eotp,
                                                                 persist)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    eotp_mode = _modes(cache, refresh, eotp)
    block_length = _positive_int("block_length", block_length)
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    if steps is not None:
        steps = _positive_int("steps", steps)
    if persist is not None:
        persist = _positive_int("persist", persist)
        if strategy != "persistence":
            raise ValueError(f"persist={persist} is the persistence rule's setting (strategy='persistence')")
    edit_threshold, edit_steps = _editing(edit_threshold, edit_steps, strategy)
    temperature, threshold = _nonnegative("temperature", temperature), _threshold(threshold)
    if pad_id == mask_id:
        raise ValueError(f"pad_token_id={pad_id} equals mask_token_id={mask_id}; padding would read as masks")
    if strategy == "learn2pd":
        _check_filter(filter, block_length)
    if threshold is None:
        threshold = filter.threshold if strategy == "learn2pd" else 0.9
    if (strategy == "oracle" or target is not None) and (
            target is None or tuple(target.shape) != (input_ids.shape[0], max_new_tokens)):
        got = None if target is None else tuple(target.shape)
        raise ValueError(f"target must be [B, max_new_tokens] (strategy 'oracle' needs one), got {got}")

    if attention_mask is not None and attention_mask.dim() == 1:
        attention_mask = attention_mask.view(1, -1)
    B, P = input_ids.shape
    if streamer is not None and B != 1:
        raise ValueError(f"a streamer takes one sequence (as in transformers), got {B} rows")
    stops = StopCutter(ends[1:], stop_strings, tokenizer, eos_id, mask_id)
    T, limit = P + max_new_tokens, adapter.max_length
    if limit is not None and T > limit:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {T} exceeds "
                         f"max_sequence_length={limit}")
    device = adapter.device
    input_ids, attention_mask = _place(input_ids, attention_mask, device, mask_id)
    if temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    num_blocks = -(-max_new_tokens // block_length)
    spec = DecodeSpec(
        strategy=strategy, threshold=float("inf") if strategy == "steps" else float(threshold), eotp=eotp_mode,
        block_length=block_length, max_new_tokens=max_new_tokens,
        # default: one token per step (LLaDA's baseline); else ``steps`` forwards spread evenly over the blocks
        steps_per_block=block_length if steps is None else max(1, steps // num_blocks),
        temperature=temperature, seed=seed, cache=cache, refresh=refresh, mask_id=mask_id, eos_id=eos_id,
        pad_id=pad_id, filter=filter if strategy == "learn2pd" else None, backend=backend,
        cuda_graph=os.environ.get("L2PD_CUDA_GRAPH", "1") != "0" if cuda_graph is None else bool(cuda_graph),
        # finished rows leave the step; not with a per-step callback or the oracle, which index rows
        return_dict=bool(return_dict_in_generate), step_stats=bool(step_stats), stops=stops, streamer=streamer,
        target=None if target is None else target.to(device=device, dtype=torch.long), on_step=on_step,
        persist=2 if persist is None else persist, edit=edit_threshold,
        edit_steps=16 if edit_steps is None else edit_steps,
        answer=_answer(answer, B, max_new_tokens, adapter, mask_id, strategy, device))
    return spec, input_ids, attention_mask


def _compact(compact: Any) -> None:
    """``compact`` is accepted for old callers: finished rows always leave the engine's iterations."""
    if not compact:
        warnings.warn("compact=False has no effect: rows that finish leave the engine's iterations at once",
                      DeprecationWarning, stacklevel=4)


def _answer(answer: Any, B: int, G: int, adapter: Any, mask_id: int, strategy: str,
            device: Any) -> torch.Tensor | None:
    """A partial answer to continue from, checked: int64 [B, G] of token ids, ``mask_id`` where undecided."""
    if answer is None:
        return None
    if strategy == "oracle":
        raise ValueError("answer= (a partial answer to continue) does not go with the oracle")
    try:
        answer = as_input_ids(answer, adapter.vocab_rows).long()
    except ValueError as exc:
        raise ValueError(f"answer: {str(exc).replace('input_ids', 'answer')}") from None
    if tuple(answer.shape) != (B, G):
        raise ValueError(f"answer must be [B, max_new_tokens] = [{B}, {G}] (mask_token_id {mask_id} where "
                         f"undecided), got {tuple(answer.shape)}")
    return answer.to(device)


def _temperature(do_sample: Any, temperature: Any) -> float:
    """transformers' habit: do_sample=False is greedy whatever the temperature, True samples (default 1.0)."""
    if do_sample is False:
        return 0.0
    if do_sample:
        temperature = 1.0 if temperature is None else temperature
        if _finite("temperature", temperature) <= 0:
            raise ValueError(f"do_sample=True needs temperature > 0, got {temperature}")
        return temperature
    return 0.0 if temperature is None else temperature


def _from_max_length(max_length: Any, prompt_length: int) -> int:
    """max_new_tokens from transformers' max_length (prompt + answer); 256 without either."""
    if max_length is None:
        return 256
    max_length = _positive_int("max_length", max_length)
    if max_length <= prompt_length:
        raise ValueError(f"max_length={max_length} leaves no room after the prompt of {prompt_length} tokens "
                         "(use max_new_tokens)")
    return max_length - prompt_length


def _editing(edit_threshold: Any, edit_steps: Any, strategy: str) -> tuple[float | None, int | None]:
    """Token editing's settings, checked: (tau_edit or None, post-block editing forwards or None)."""
    if edit_threshold is not None:
        edit_threshold = _finite("edit_threshold", edit_threshold)
        if edit_threshold < 0 or strategy == "oracle":
            raise ValueError(f"edit_threshold={edit_threshold}: token editing takes a tau >= 0, with a decoding "
                             "strategy (not the oracle)")
    if edit_steps is not None:
        if edit_threshold is None:
            raise ValueError("edit_steps is token editing's setting: give edit_threshold too")
        edit_steps = _positive_int("edit_steps", edit_steps) if edit_steps != 0 else 0
    return edit_threshold, edit_steps


def _repeat(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, n: int,
            per_row: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each prompt ``n`` times (num_return_sequences)."""
    if per_row:
        raise ValueError("num_return_sequences > 1 does not go with the oracle or on_step")
    if attention_mask is not None:
        attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1]).repeat_interleave(n, 0)
    return input_ids.repeat_interleave(n, 0), attention_mask


def _modes(cache: str, refresh: str, eotp: Any) -> str:
    """The EoTP mode, with the cache and refresh modes checked."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache {cache!r}: expected one of {CACHE_MODES}")
    if refresh not in REFRESH_MODES:
        raise ValueError(f"refresh {refresh!r}: expected one of {REFRESH_MODES}")
    mode = {False: "off", True: "accepted"}.get(eotp, eotp) if isinstance(eotp, bool) else eotp
    if mode not in EOTP_MODES:
        raise ValueError(f"eotp {eotp!r}: expected True, False, 'accepted' or 'predicted'")
    return mode


def _nonnegative(name: str, value: Any) -> float:
    value = _finite(name, value)
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0 (0 = greedy)")
    return value


def _threshold(threshold: Any) -> float | None:
    if threshold is None:
        return None
    threshold = _finite("threshold", threshold)
    if threshold < 0:
        raise ValueError(f"threshold={threshold} must be >= 0 (above 1 no position passes it: threshold decodes "
                         "one token per step, learn2pd follows its schedule only)")
    return threshold


def _check_filter(filter: Any, block_length: int) -> None:
    if filter is None:
        raise ValueError("strategy 'learn2pd' needs a filter (l2pd.patch(model, filter=...) or filter=...)")
    if filter.block_length != block_length:
        raise ValueError(f"the filter was trained for block_length={filter.block_length}, got "
                         f"block_length={block_length}")


def _ids(adapter: Any, eos_token_id: Any, mask_token_id: Any, pad_token_id: Any) -> tuple[list[int], int, int, int]:
    """(every end id, the mask id, the end of text, the padding id), from the arguments or the model's config."""
    vocab = adapter.vocab_rows
    ends = [_token_id("eos_token_id", i, vocab) for i in end_ids(eos_token_id)]
    mask_id = _token_id("mask_token_id", mask_token_id if mask_token_id is not None else adapter.mask_id, vocab)
    eos_id = ends[0] if ends else adapter.eos_id
    pad = pad_token_id if pad_token_id is not None else _cfg_id(adapter.config, "pad_token_id", eos_id)
    return ends, mask_id, eos_id, _token_id("pad_token_id", pad, vocab)


def _place(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, device: Any,
           mask_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts and mask on the model's device, the mask checked, no mask token among the prompts."""
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = _check_mask(attention_mask.to(device), input_ids)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if bool(((input_ids == mask_id) & real).any()):
        raise ValueError(f"the prompt contains the mask token id {mask_id}")
    return input_ids, attention_mask


def rule_name(config: dict[str, Any]) -> str:
    """A decoding rule's name: its strategy, and the persistence rule's run length (``persistence/2``)."""
    return config["strategy"] + (f"/{config['persist']}" if config.get("persist") else "")


def stored_default(filter: Any) -> dict[str, Any] | None:
    """The default decoding ``l2pd tune`` stored with ``filter`` (strategy, threshold, block_length, eotp and,
    for persistence, persist), or None (no filter, or one tuned before defaults were stored)."""
    return (filter.meta.get("operating_point") or {}).get("default") if filter is not None else None


def default_decoding(filter: Any, block_length: Any = None, threshold: Any = None, eotp: Any = None,
                     persist: Any = None) -> str:
    """What decoding without a strategy means with ``filter`` (None: no filter) and the settings given, in
    words."""
    strategy, block, tau, eotp, persist = _defaults(filter, None, block_length, threshold, eotp, persist)
    tau = filter.threshold if strategy == "learn2pd" else (0.9 if tau is None else tau)
    return f"{rule_name(dict(strategy=strategy, persist=persist))} (tau {tau:g}, block {block}, EoTP {eotp})"


def _defaults(filter: Any, strategy: Any, block_length: Any, threshold: Any, eotp: Any, persist: Any) -> tuple:
    """(strategy, block_length, threshold, eotp, persist) with what was not given filled in. Without a
    strategy: the default decoding stored with the filter (its operating point's pick over learn2pd and the
    training-free rules, ``l2pd tune --rules``), or learn2pd for a filter tuned without rules; threshold 0.9 at
    block 32 without a filter. learn2pd's block length, tau and EoTP mode default to the filter's."""
    default = stored_default(filter)
    if strategy is None and default is not None:
        strategy = default["strategy"]
        if strategy != "learn2pd":  # a training-free rule won: its tau, block, EoTP mode and run length
            threshold = default.get("threshold") if threshold is None else threshold
            eotp = default.get("eotp") if eotp is None else eotp
            persist = default.get("persist") if persist is None else persist
            block_length = default.get("block_length") if block_length is None else block_length
    if strategy is None:
        strategy = "learn2pd" if filter is not None else "threshold"
    point = filter if strategy == "learn2pd" and filter is not None else None
    if block_length is None:
        block_length = point.block_length if point is not None else 32
    if eotp is None:
        eotp = point.meta.get("eotp", "off") if point is not None else "off"
    return strategy, block_length, threshold, eotp, persist


def _with_generation_config(config: Any, given: dict[str, Any]) -> tuple:
    """The values of ``given`` (in its order), those left None taken from a ``transformers.GenerationConfig``."""
    given = {**given, **from_generation_config(config, given)}
    return tuple(given.values())


def _as_mask(attention_mask: Any) -> torch.Tensor | None:
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask)
    if attention_mask is not None and attention_mask.device.type == "meta":
        raise ValueError("attention_mask is on the meta device (shapes without data); give real values")
    return attention_mask


def _check_mask(mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (prompt)")
    empty = torch.nonzero(~mask.bool().any(-1)).flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask is all zeros in row(s) {empty[:8]}: an empty prompt (give at least one "
                         "token, e.g. a chat template)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded (zeros before the prompt, never after)")
    return mask


def _positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int > 0: ints, numpy integers and one-element integer tensors are accepted."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if int(value) <= 0:
        raise ValueError(f"{name}={int(value)} must be > 0")
    return int(value)


def _token_id(name: str, value: Any, vocab: int) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < vocab:
        raise ValueError(f"{name}={value!r} must be a token id in [0, {vocab})")
    return int(value)


def _as_filter(filter: Any) -> Any:
    """A ``Filter``, a folder holding one (loaded), or None."""
    from .filter import Filter

    if filter is None or isinstance(filter, Filter):
        return filter
    if isinstance(filter, (str, os.PathLike)):
        return Filter.from_pretrained(filter)
    raise ValueError(f"filter={filter!r}: expected an l2pd.Filter or the folder of one")


def _finite(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    return value


def _cfg_id(config: Any, name: str, default: int) -> int:
    value = getattr(config, name, None)
    return default if value is None else int(value)
