"""The block decoding loop: the one place where a step's policy lives.

One step: a forward over the canvas (or, with a cache, over the part of it the cache does not hold) gives
the logits of the current block; ``confidence`` turns them into (token, probability); ``decide`` accepts
positions by the strategy's rule, writes them into the canvas and applies EoTP (``l2pd.step`` runs it, eager
or replayed from a CUDA graph). ``generate`` checks its arguments and runs the block loop. Strategies:

- ``steps``: LLaDA's low-confidence remasking: the k most confident masked positions, k from an even
  per-block schedule (``steps`` forwards in all; default one token per step).
- ``threshold``: every masked position with confidence > ``threshold``, and at least the most confident.
- ``learn2pd``: every masked position where sigmoid(filter(block confidences)) > ``threshold``, plus the
  schedule's top-k, so that each step makes progress.
- ``oracle`` (for collecting filter training data): Learn2PD's "extremely greedy parallel" replay: every
  masked position whose current guess already equals ``target`` (the final answer of a reference decode);
  a step that accepts nothing fills the block with ``target``.

The only host reads are one small count per step (loop control) and one per block.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from .cache import CACHE_MODES, REFRESH_MODES
from .hf import FinalTokenStream, StopCutter, as_input_ids, end_ids, from_generation_config, refuse_unknown
from .models import adapter_for
from .step import DecodeState, Policy, Stepper, stepper_for

STRATEGIES = ("steps", "threshold", "learn2pd", "oracle")
BACKENDS = ("auto", "triton", "torch")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, P + G]: prompt (as given, padding included) and the answer
    nfe: torch.Tensor  # [B] forwards during which the row still had masked positions
    forwards: int  # forward passes the batch ran
    seconds: float
    graphed: int = 0  # forwards replayed from a CUDA graph (the rest ran eagerly)

    @property
    def path(self) -> str:
        """'graph' (every forward replayed), 'eager' (none) or 'mixed' (the first call of each shape is eager)."""
        return "graph" if self.graphed == self.forwards else "eager" if self.graphed == 0 else "mixed"


def select_ops(backend: str | None, device: torch.device):
    """(confidence, decide) for a backend: Triton kernels on CUDA or under TRITON_INTERPRET=1, else torch.

    ``backend`` or the environment variable ``L2PD_BACKEND`` ('auto', 'triton', 'torch') forces one.
    """
    backend = backend or os.environ.get("L2PD_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        backend = "triton" if (device.type == "cuda" or interpret) and _triton_available() else "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the Triton kernels need a CUDA device or TRITON_INTERPRET=1 (tensors are on {device})")
        from l2pd_kernels import confidence, decide
    else:
        from l2pd_kernels.reference import confidence, decide
    return confidence, decide


def _triton_available() -> bool:
    try:
        import l2pd_kernels.confidence  # noqa: F401
    except ImportError:
        return False
    return True


def block_schedule(masks: int, steps: int) -> list[int]:
    """LLaDA's schedule: ``masks`` tokens over ``steps`` steps, evenly, the remainder to the first steps."""
    steps = max(1, min(steps, masks))
    base, rem = divmod(masks, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _bucket(rows: int) -> int:
    """Rows a compacted step runs: the next power of two (few distinct shapes, so few graph captures)."""
    return 1 << max(0, rows - 1).bit_length()


def _unpermute(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` back in input order (slot i holds input row ``order[i]``); a new tensor."""
    out = torch.empty_like(t)
    out[order] = t
    return out


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


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    block_length: int | None = None,
    strategy: str | None = None,
    threshold: float | None = None,
    eotp: bool | str | None = None,
    cache: str = "none",
    refresh: str = "full",
    temperature: float | None = None,
    steps: int | None = None,
    seed: int | None = None,
    filter: Any = None,
    backend: str | None = None,
    streamer: Any = None,
    return_dict_in_generate: bool | None = None,
    mask_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    target: torch.Tensor | None = None,
    on_step: Any = None,
    step_stats: bool = False,
    cuda_graph: bool | None = None,
    compact: bool = True,
    max_length: int | None = None,
    do_sample: bool | None = None,
    num_return_sequences: int | None = None,
    generation_config: Any = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    inputs: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateOutput:
    """Decode ``max_new_tokens`` after left-padded prompts ``input_ids`` [B, P].

    ``strategy`` defaults to ``learn2pd`` when a filter is given, else ``threshold``. With ``learn2pd``,
    ``block_length``, ``threshold`` and ``eotp`` default to the filter's operating point (its block length, its
    tau, the ``eotp`` stored in its filter.json); otherwise to 32, 0.9 and off. ``threshold`` above 1 passes no
    position (threshold: one token per step; learn2pd: its schedule only). ``steps`` (total forwards of the
    schedule; default ``max_new_tokens``) sets the per-block top-k of ``steps`` and ``learn2pd``. ``eotp``:
    False/'off', True/'accepted' or 'predicted' (see ``l2pd_kernels.reference.decide``). ``cache``: 'none',
    'prefix' or 'dual'; ``refresh``: 'full', 'tail' or 'window' (see ``l2pd.cache``). ``cuda_graph``: replay steps
    from CUDA graphs where they apply (default on; ``L2PD_CUDA_GRAPH=0`` turns it off). ``compact``: rows
    that have finished (EoTP, or every block decoded) stop costing: at each block start the rows still
    decoding move to the front and the step runs on those (rounded up to a power of two).
    ``on_step(block_start, step, token, prob, canvas)`` is called after each forward, before the decision
    (``canvas`` still holds the masks); with ``step_stats=True`` it also gets the softmax's ``margin=`` and
    ``entropy=`` [B, L] (what a richer filter reads). Returns the sequences [B, P + max_new_tokens], or a
    ``GenerateOutput``.

    Hugging Face conventions: ``input_ids`` may be a list or array; ``max_length`` (prompt + answer) when
    ``max_new_tokens`` is not given (default 256 new tokens); ``do_sample=False`` is greedy whatever the
    temperature, ``do_sample=True`` samples at ``temperature`` (default 1.0); ``num_return_sequences``
    repeats each prompt; ``generation_config`` (a ``transformers.GenerationConfig``) supplies any of these
    not given; ``eos_token_id`` may be a list (the first is the end-of-text of EoTP and padding, the others
    end a row too) and ``stop_strings`` (with ``tokenizer``) end a row after the text; ``streamer`` (batch
    1) gets the prompt, then each token once it and all before it are fixed, up to the end of text;
    ``inputs=`` is another name for ``input_ids``; ``filter`` may be a folder.
    Autoregressive-only arguments (``num_beams``, ``top_p``, ...) raise a ValueError unless neutral.
    """
    adapter = adapter_for(model)
    config = adapter.config
    refuse_unknown(kwargs)
    if inputs is not None:
        if input_ids is not None:
            raise ValueError("give the prompt as input_ids or as inputs, not both")
        input_ids = inputs
    if input_ids is None:
        raise ValueError("generate() needs input_ids (the prompt's token ids, [B, P])")
    filter = _as_filter(filter)
    if generation_config is not None:
        given = dict(max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                     temperature=temperature, num_return_sequences=num_return_sequences, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, stop_strings=stop_strings,
                     return_dict_in_generate=return_dict_in_generate)
        given.update(from_generation_config(generation_config, given))
        max_new_tokens, max_length, do_sample = given["max_new_tokens"], given["max_length"], given["do_sample"]
        temperature, num_return_sequences = given["temperature"], given["num_return_sequences"]
        eos_token_id, pad_token_id, stop_strings = given["eos_token_id"], given["pad_token_id"], given["stop_strings"]
        return_dict_in_generate = given["return_dict_in_generate"]
    return_dict_in_generate = bool(return_dict_in_generate)
    if do_sample is False:
        temperature = 0.0  # greedy, as transformers does whatever the temperature says
    elif do_sample:
        temperature = 1.0 if temperature is None else temperature
        if _finite("temperature", temperature) <= 0:
            raise ValueError(f"do_sample=True needs temperature > 0, got {temperature}")
    elif temperature is None:
        temperature = 0.0
    input_ids = as_input_ids(input_ids, adapter.vocab_rows)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask)
    if attention_mask is not None and attention_mask.device.type == "meta":
        raise ValueError("attention_mask is on the meta device (shapes without data); give real values")
    if max_new_tokens is None:
        if max_length is not None:
            max_length = _positive_int("max_length", max_length)
            if max_length <= input_ids.shape[-1]:
                raise ValueError(f"max_length={max_length} leaves no room after the prompt of "
                                 f"{input_ids.shape[-1]} tokens (use max_new_tokens)")
            max_new_tokens = max_length - input_ids.shape[-1]
        else:
            max_new_tokens = 256
    if num_return_sequences is not None and _positive_int("num_return_sequences", num_return_sequences) > 1:
        if strategy == "oracle" or on_step is not None:
            raise ValueError("num_return_sequences > 1 does not go with the oracle or on_step")
        input_ids = input_ids.repeat_interleave(num_return_sequences, 0)
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1]).repeat_interleave(
                num_return_sequences, 0)
    vocab = adapter.vocab_rows
    ends = [_token_id("eos_token_id", i, vocab) for i in end_ids(eos_token_id)]
    mask_id = _token_id("mask_token_id", mask_token_id if mask_token_id is not None else adapter.mask_id, vocab)
    eos_id = ends[0] if ends else adapter.eos_id
    pad_id = _token_id("pad_token_id", pad_token_id if pad_token_id is not None else _cfg_id(config, "pad_token_id",
                                                                                           eos_id), vocab)

    if strategy is None:
        strategy = "learn2pd" if filter is not None else "threshold"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    # learn2pd's defaults are the filter's operating point: its block length, tau and EoTP mode
    point = filter if strategy == "learn2pd" and filter is not None else None
    if block_length is None:
        block_length = point.block_length if point is not None else 32
    if eotp is None:
        eotp = point.meta.get("eotp", "off") if point is not None else "off"
    if cache not in CACHE_MODES:
        raise ValueError(f"cache {cache!r}: expected one of {CACHE_MODES}")
    if refresh not in REFRESH_MODES:
        raise ValueError(f"refresh {refresh!r}: expected one of {REFRESH_MODES}")
    eotp_mode = {False: "off", True: "accepted"}.get(eotp, eotp) if isinstance(eotp, bool) else eotp
    if eotp_mode not in ("off", "accepted", "predicted"):
        raise ValueError(f"eotp {eotp!r}: expected True, False, 'accepted' or 'predicted'")
    block_length = _positive_int("block_length", block_length)
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    if steps is not None:
        steps = _positive_int("steps", steps)
    temperature = _finite("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if threshold is not None:
        threshold = _finite("threshold", threshold)
        if threshold < 0:
            raise ValueError(f"threshold={threshold} must be >= 0 (above 1 no position passes it: threshold "
                             "decodes one token per step, learn2pd follows its schedule only)")
    if pad_id == mask_id:
        raise ValueError(f"pad_token_id={pad_id} equals mask_token_id={mask_id}; padding would read as masks")
    if strategy == "learn2pd":
        if filter is None:
            raise ValueError("strategy 'learn2pd' needs a filter (l2pd.patch(model, filter=...) or filter=...)")
        if filter.block_length != block_length:
            raise ValueError(
                f"the filter was trained for block_length={filter.block_length}, got block_length={block_length}"
            )
    if threshold is None:
        threshold = filter.threshold if strategy == "learn2pd" else 0.9
    if strategy == "oracle" and (target is None or target.shape != (input_ids.shape[0], max_new_tokens)):
        got = None if target is None else tuple(target.shape)
        raise ValueError(f"strategy 'oracle' needs target [B, max_new_tokens], got {got}")

    if attention_mask is not None and attention_mask.dim() == 1:
        attention_mask = attention_mask.view(1, -1)
    B, P = input_ids.shape
    if streamer is not None and B != 1:
        raise ValueError(f"a streamer takes one sequence (as in transformers), got {B} rows")
    stops = StopCutter(ends[1:], stop_strings, tokenizer, eos_id, mask_id)
    G = max_new_tokens
    T = P + G
    limit = adapter.max_length
    if limit is not None and T > limit:
        raise ValueError(f"prompt length {P} + max_new_tokens {G} = {T} exceeds max_sequence_length={limit}")
    device = adapter.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (prompt)")
        empty = torch.nonzero(~attention_mask.bool().any(-1)).flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask is all zeros in row(s) {empty[:8]}: an empty prompt (give at least one "
                             "token, e.g. a chat template)")
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise ValueError("attention_mask must be left-padded (zeros before the prompt, never after)")
        real = attention_mask.bool()
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    if bool(((input_ids == mask_id) & real).any()):
        raise ValueError(f"the prompt contains the mask token id {mask_id}")

    confidence, decide = select_ops(backend, device)
    kernels = decide.__module__ == "l2pd_kernels.decide"
    if temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    padded = attention_mask is not None and not bool(attention_mask.all())
    num_blocks = -(-G // block_length)
    # Default: one token per step (LLaDA's baseline); else ``steps`` forwards spread evenly over the blocks.
    steps_per_block = block_length if steps is None else max(1, steps // num_blocks)
    filter_weights = filter.weights(device) if strategy == "learn2pd" else None
    inputs = tuple(filter.inputs) if filter_weights is not None else ("confidence",)
    step_threshold = float("inf") if strategy == "steps" else float(threshold)
    decide_kwargs = dict(threshold=step_threshold, mask_id=mask_id, eos_id=eos_id, eotp=eotp_mode,
                         filter_weights=filter_weights, filter_block=block_length)
    if filter_weights is not None:
        decide_kwargs.update(filter_inputs=inputs, filter_kind=filter.kind)
    policy = Policy(strategy, mask_id, decide_kwargs, temperature=temperature, on_step=on_step, filter=filter,
                    target=None if target is None else target.to(device=device, dtype=torch.long),
                    stats=bool(step_stats) or (filter_weights is not None and filter.needs_stats),
                    step_input="step" in inputs)
    if cuda_graph is None:
        cuda_graph = os.environ.get("L2PD_CUDA_GRAPH", "1") != "0"
    dtype = adapter.dtype

    if device.type == "cuda" and os.environ.get("L2PD_PACK", "1") != "0":
        adapter.pack()

    def build() -> Stepper:
        state = DecodeState.allocate(adapter, B, P, T, padded, cache, refresh, dtype, device)
        return Stepper(adapter, state, policy, confidence, decide, kernels, cuda_graph)

    # Steppers that can replay graphs stay on the model, keyed by everything a graph bakes in.
    keep = cuda_graph and kernels and device.type == "cuda" and policy.graphable()
    # refresh and prefix/dual only choose the fed ranges: one stepper (and its graphs) serves them all
    key = (B, P, G, str(dtype), cache != "none", padded, strategy, step_threshold, eotp_mode, mask_id, eos_id,
           block_length, id(filter) if filter_weights is not None else None, adapter.key())
    stepper = stepper_for(model, key, build, keep)
    # a kept stepper keeps its own policy (its graphs point at its filter weights); only the per-call parts move
    stepper.policy.target, stepper.policy.on_step = policy.target, policy.on_step
    state = stepper.state
    state.load(input_ids, attention_mask if padded else None, mask_id)
    if state.kv is not None:
        state.kv.mode, state.kv.refresh = cache, refresh
    canvas, kv = state.canvas, state.kv

    stream = None if streamer is None else FinalTokenStream(streamer, input_ids[0], P, eos_id, mask_id)
    nfe = torch.zeros(B, dtype=torch.int64, device=device)
    # Finished rows are compacted out at block starts: rows still decoding move to the front of the buffers
    # and the step runs on the first n rows (n a power of two, so that few graph shapes arise). ``order[i]``
    # is the input row held in slot i. Not with a per-step callback or the oracle, which index rows.
    compact = compact and on_step is None and strategy != "oracle" and B > 1
    order = torch.arange(B, device=device)
    n, step_fn = B, stepper
    forwards = graphed = 0
    t0 = time.perf_counter()
    previous = None  # start of the last block decoded (the tail and window refreshes start there)
    for b in range(num_blocks):
        s, e = P + b * block_length, min(P + (b + 1) * block_length, T)
        left = (canvas[:n, s:e] == mask_id).sum(-1)
        alive = int((left > 0).sum())  # the one host read of the block
        if alive == 0:  # EoTP already filled this block in every row
            continue
        if compact and _bucket(alive) < n:
            keep_rows = _bucket(alive)
            perm = torch.argsort((left == 0).to(torch.int8), stable=True)  # rows still decoding first
            state.reorder(perm, keep_rows)
            order[:n] = order[:n].index_select(0, perm)
            nfe[:n] = nfe[:n].index_select(0, perm)
            n, step_fn = keep_rows, stepper.narrow(keep_rows)
            left = left.index_select(0, perm[:n])
        schedule = block_schedule(e - s, steps_per_block)
        i = 0
        while True:
            if kv is None:
                lo, hi = 0, T
            elif i == 0:  # with a cache, the block's first forward refreshes the slots
                lo, hi = kv.refresh_range(previous, e)
            else:
                lo, hi = kv.feed_range(s, e)
            nfe[:n] += left > 0
            k = schedule[i] if (strategy != "threshold" and i < len(schedule)) else 1
            if i == e - s - 1:  # the cap: a block never takes more forwards than its length
                k = e - s  # (every step accepts >= 1, so this binds only for rules that stall, e.g. oracle)
            step_seed = None if temperature == 0 else (seed * 1000003 + forwards) & 0x7FFFFFFF
            left, replayed = step_fn(lo, hi - lo, s, e - s, k, step=i, seed=step_seed)
            forwards += 1
            graphed += replayed
            i += 1
            if stream is not None:  # batch 1: cut at a stop among the fixed tokens, send what is final
                if stops.active:
                    stops.cut(canvas, P, e, 1)
                    left = (canvas[:1, s:e] == mask_id).sum(-1)
                stream.update(canvas, e)
            if int(left.max()) == 0:  # the one host read of the step
                break
        previous = s
        if stops.active:  # rows that reached a stop end here (the rest of their canvas becomes end-of-text)
            stops.cut(canvas, P, e, n)
    if stream is not None:
        stream.update(canvas, T)
        stream.end()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if compact:
        sequences, nfe = _unpermute(canvas, order), _unpermute(nfe, order)
    else:
        sequences = canvas.clone() if keep else canvas  # a kept stepper's canvas is reused by the next call
    if return_dict_in_generate:
        return GenerateOutput(sequences, nfe, forwards, seconds, graphed)
    return sequences
