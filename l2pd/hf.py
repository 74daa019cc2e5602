"""Hugging Face ``generate`` conventions on top of l2pd's decoder: argument resolution (``generation_config``,
``do_sample``, ``max_length``, ``num_return_sequences``, lists of end ids, stop strings), input checks, and
streaming tokens as they become final.

A masked-diffusion decoder fixes tokens out of order inside a block; a streamer receives a token once it and
every token before it are fixed, so what it prints never changes (as with an autoregressive model).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

# GenerationConfig fields l2pd honours; any other field set away from its default is refused by name.
_HONOURED = {"max_new_tokens", "max_length", "do_sample", "temperature", "num_return_sequences", "eos_token_id",
             "pad_token_id", "stop_strings", "return_dict_in_generate"}
# Fields whose defaults mean "nothing special" (an autoregressive sampler's knobs l2pd has no use for).
_NEUTRAL = {"num_beams": 1, "top_k": (None, 50), "top_p": (None, 1.0), "min_p": None, "typical_p": (None, 1.0),
            "repetition_penalty": (None, 1.0), "length_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
            "num_beam_groups": (None, 1), "penalty_alpha": None, "min_length": (None, 0), "min_new_tokens": None,
            "bad_words_ids": None, "force_words_ids": None, "constraints": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "guidance_scale": None, "sequence_bias": None, "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
            "diversity_penalty": (None, 0.0), "encoder_repetition_penalty": (None, 1.0), "watermarking_config": None,
            "assistant_model": None, "prompt_lookup_num_tokens": None, "output_scores": (None, False),
            "output_logits": (None, False), "output_attentions": (None, False),
            "output_hidden_states": (None, False), "renormalize_logits": (None, False), "use_cache": (None, True)}


def _neutral(name: str, value: Any) -> bool:
    """Unset (None: transformers 5 leaves every field unset) or set to its no-op value."""
    ok = _NEUTRAL[name]
    return value is None or value in (ok if isinstance(ok, tuple) else (ok,))


def from_generation_config(config: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The arguments a ``transformers.GenerationConfig`` sets, under those given explicitly (which win)."""
    out = {}
    for name in _HONOURED:
        value = getattr(config, name, None)
        if value is not None and given.get(name) is None:
            out[name] = value
    refused = [n for n in _NEUTRAL if hasattr(config, n) and not _neutral(n, getattr(config, n))]
    if refused:
        raise ValueError(f"generation_config sets {refused}, which l2pd's decoder does not support (it honours "
                         f"{sorted(_HONOURED)}; the rest of a masked-diffusion step is strategy/threshold/eotp)")
    return out


def refuse_unknown(kwargs: dict[str, Any]) -> None:
    """A clear error for autoregressive-only arguments (num_beams, top_p, ...) and for typos."""
    if not kwargs:
        return
    neutral = [k for k in kwargs if k in _NEUTRAL and _neutral(k, kwargs[k])]
    for k in neutral:  # e.g. num_beams=1, use_cache=True: no effect, accepted as Hugging Face does
        kwargs.pop(k)
    if kwargs:
        raise ValueError(f"generate() does not support {sorted(kwargs)}: l2pd decodes by masked diffusion "
                         "(see help(l2pd.generate) for its arguments)")


def as_input_ids(input_ids: Any, vocab_size: int | None) -> torch.Tensor:
    """``input_ids`` as an int64 tensor [B, P] (lists and numpy arrays accepted), with a clear error for shapes
    and ids that cannot be a prompt."""
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"input_ids must be a tensor, array or list of token ids [B, P] ({exc})") from None
    if input_ids.device.type == "meta":
        raise ValueError("input_ids is on the meta device (shapes without data); give real token ids")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no rows (batch size 0)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens (an empty prompt); give at least one token, e.g. a chat template")
    input_ids = input_ids.long()
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise ValueError(f"input_ids holds ids outside the vocabulary [0, {vocab_size}): min {lo}, max {hi} "
                         "(a tokenizer for another model?)")
    return input_ids


def end_ids(eos_token_id: Any) -> list[int]:
    """``eos_token_id`` as a list (Hugging Face allows an int or a list; the first is the main one)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else list(eos_token_id)
    if not ids or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r} must be an int or a non-empty list of ints")
    return [int(i) for i in ids]


class StopCutter:
    """Ends rows at extra end ids and stop strings, checked on the answer tokens fixed so far (in order from
    its start): the answer is cut after the stop (the rest becomes end-of-text), so the row stops costing
    forwards."""

    def __init__(self, extra_ids: list[int], stop_strings: Any, tokenizer: Any, eos_id: int, mask_id: int) -> None:
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.strings = [s for s in (stop_strings or []) if s]
        if self.strings and tokenizer is None:
            raise ValueError("stop_strings needs tokenizer=... (as in transformers' generate)")
        self.extra = torch.tensor(extra_ids, dtype=torch.long)
        self.tokenizer, self.eos_id, self.mask_id = tokenizer, eos_id, mask_id

    @property
    def active(self) -> bool:
        return bool(self.extra.numel() or self.strings)

    def cut_index(self, ids: list[int]) -> int:
        """Where a row whose answer tokens fixed in order are ``ids`` is cut: the index of the extra end id or
        of the token completing a stop string, whichever comes first, or -1."""
        extra = set(self.extra.tolist())
        hits = [i for i, t in enumerate(ids) if t in extra][:1]
        if self.strings:
            end = self._string_end(ids)
            if end >= 0:
                hits.append(end)
        return min(hits) if hits else -1

    def _string_end(self, ids: list[int]) -> int:
        """Index of the token that completes the first stop string, or -1."""
        text = self.tokenizer.decode(ids)
        found = [text.find(s) + len(s) for s in self.strings if s in text]
        if not found:
            return -1
        need = min(found)
        for i in range(len(ids)):  # the shortest prefix whose text reaches the stop
            if len(self.tokenizer.decode(ids[: i + 1])) >= need:
                return i
        return len(ids) - 1
