"""The block decoding loop: the one place where a step's policy lives.

One step: a forward over the canvas (or, with a cache, over the part of it the cache does not hold) gives
the logits of the current block; ``confidence`` turns them into (token, probability); ``decide`` accepts
positions by the strategy's rule, writes them into the canvas and applies EoTP. Strategies:

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

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from .cache import CACHE_MODES, BlockKVCache
from .models.llada import llada_forward, positions_from_mask

STRATEGIES = ("steps", "threshold", "learn2pd", "oracle")
BACKENDS = ("auto", "triton", "torch")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, P + G]: prompt (as given, padding included) and the answer
    nfe: torch.Tensor  # [B] forwards during which the row still had masked positions
    forwards: int  # forward passes the batch ran
    seconds: float


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


GRAPH_MAX_ROWS = 256  # batch * block_length up to which the decision runs from a CUDA graph


def _use_graph(device: torch.device, confidence: Any, strategy: str, temperature: float, on_step: Any,
               rows: int) -> bool:
    """CUDA-graph the decision where launches dominate it: small batches, greedy, Triton kernels on CUDA.

    ``L2PD_CUDA_GRAPH=0`` turns it off."""
    if os.environ.get("L2PD_CUDA_GRAPH", "1") == "0" or device.type != "cuda":
        return False
    from l2pd_kernels import confidence as kernel

    return (confidence is kernel and strategy != "oracle" and temperature == 0 and on_step is None
            and rows <= GRAPH_MAX_ROWS)


def block_schedule(masks: int, steps: int) -> list[int]:
    """LLaDA's schedule: ``masks`` tokens over ``steps`` steps, evenly, the remainder to the first steps."""
    steps = max(1, min(steps, masks))
    base, rem = divmod(masks, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _oracle_step(canvas: torch.Tensor, token: torch.Tensor, target: torch.Tensor, s: int, mask_id: int):
    block = canvas[:, s : s + token.shape[1]]
    masked = block == mask_id
    accept = masked & (token == target)
    stuck = masked.any(-1) & ~accept.any(-1)  # no guess equals the answer yet: fill the block to move on
    accept |= masked & stuck[:, None]
    block.copy_(torch.where(accept, target, block))
    return (block == mask_id).sum(-1)


def _core(model: Any) -> tuple[Any, Any]:
    transformer = getattr(getattr(model, "model", None), "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(model).__name__} has no model.transformer: not a LLaDA model")
    return transformer, model.config


def _cfg_id(config: Any, name: str, default: int) -> int:
    value = getattr(config, name, None)
    return default if value is None else int(value)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    block_length: int = 32,
    strategy: str | None = None,
    threshold: float | None = None,
    eotp: bool | str = False,
    cache: str = "none",
    temperature: float = 0.0,
    steps: int | None = None,
    seed: int | None = None,
    filter: Any = None,
    backend: str | None = None,
    streamer: Any = None,
    return_dict_in_generate: bool = False,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    target: torch.Tensor | None = None,
    on_step: Any = None,
) -> torch.Tensor | GenerateOutput:
    """Decode ``max_new_tokens`` after left-padded prompts ``input_ids`` [B, P].

    ``strategy`` defaults to ``learn2pd`` when a filter is given, else ``threshold``. ``threshold`` defaults
    to the filter's tau for ``learn2pd`` and to 0.9 for ``threshold``. ``steps`` (total forwards of the
    schedule; default ``max_new_tokens``) sets the per-block top-k of ``steps`` and ``learn2pd``. ``eotp``:
    False/'off', True/'accepted' or 'predicted' (see ``l2pd_kernels.reference.decide``). ``cache``: 'none',
    'prefix' or 'dual'. ``on_step(block_start, step, token, prob, canvas)`` is called after each forward,
    before the decision (``canvas`` still holds the masks). Returns the sequences [B, P + max_new_tokens], or
    a ``GenerateOutput``.
    """
    transformer, config = _core(model)
    mask_id = mask_token_id if mask_token_id is not None else _cfg_id(config, "mask_token_id", 126336)
    eos_id = eos_token_id if eos_token_id is not None else _cfg_id(config, "eos_token_id", 126081)
    pad_id = pad_token_id if pad_token_id is not None else _cfg_id(config, "pad_token_id", eos_id)

    if strategy is None:
        strategy = "learn2pd" if filter is not None else "threshold"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache {cache!r}: expected one of {CACHE_MODES}")
    eotp_mode = {False: "off", True: "accepted"}.get(eotp, eotp) if isinstance(eotp, bool) else eotp
    if eotp_mode not in ("off", "accepted", "predicted"):
        raise ValueError(f"eotp {eotp!r}: expected True, False, 'accepted' or 'predicted'")
    if block_length <= 0:
        raise ValueError(f"block_length={block_length} must be > 0")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be > 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
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

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.view(1, -1)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, P], got shape {tuple(input_ids.shape)}")
    B, P = input_ids.shape
    G = max_new_tokens
    T = P + G
    limit = getattr(config, "max_sequence_length", None)
    if limit is not None and T > limit:
        raise ValueError(f"prompt length {P} + max_new_tokens {G} = {T} exceeds max_sequence_length={limit}")
    device = transformer.wte.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise ValueError("attention_mask must be left-padded (zeros before the prompt, never after)")
        real = attention_mask.bool()
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    if bool(((input_ids == mask_id) & real).any()):
        raise ValueError(f"the prompt contains the mask token id {mask_id}")

    confidence, decide = select_ops(backend, device)
    if temperature > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())

    canvas = torch.cat([input_ids, torch.full((B, G), mask_id, dtype=input_ids.dtype, device=device)], 1)
    canvas = canvas.long().contiguous()
    full_mask = None
    positions = torch.arange(T, device=device).expand(B, T)
    if attention_mask is not None and not bool(attention_mask.all()):
        full_mask = torch.cat([attention_mask, torch.ones(B, G, dtype=attention_mask.dtype, device=device)], 1)
        positions = positions_from_mask(full_mask)
    kv = None
    if cache != "none":
        kv = BlockKVCache.for_model(config, B, T, cache, transformer.wte.weight.dtype, device)

    num_blocks = -(-G // block_length)
    # Default: one token per step (LLaDA's baseline); else ``steps`` forwards spread evenly over the blocks.
    steps_per_block = block_length if steps is None else max(1, steps // num_blocks)
    filter_weights = filter.weights(device) if strategy == "learn2pd" else None
    step_threshold = float("inf") if strategy == "steps" else float(threshold)
    decide_kwargs = dict(threshold=step_threshold, mask_id=mask_id, eos_id=eos_id, eotp=eotp_mode,
                         filter_weights=filter_weights, filter_block=block_length)
    use_graph = _use_graph(device, confidence, strategy, temperature, on_step, B * block_length)
    graphed = None  # built at the first full block, for the logits' own shape and dtype

    def forward(lo: int, hi: int, s: int, e: int) -> torch.Tensor:
        return llada_forward(
            transformer, config, canvas[:, lo:hi], full_mask, cache=kv, start=lo,
            position_ids=positions[:, lo:hi], logits_slice=(s - lo, e - lo),
        )

    nfe = torch.zeros(B, dtype=torch.int64, device=device)
    forwards = 0
    t0 = time.perf_counter()
    for b in range(num_blocks):
        s, e = P + b * block_length, min(P + (b + 1) * block_length, T)
        left = (canvas[:, s:e] == mask_id).sum(-1)
        if int(left.max()) == 0:  # EoTP already filled this block
            continue
        schedule = block_schedule(e - s, steps_per_block)
        i = 0
        while True:
            if kv is None or i == 0:  # with a cache, the block's first forward refreshes every slot
                logits = forward(0, T, s, e)
            else:
                lo, hi = kv.feed_range(s, e)
                logits = forward(lo, hi, s, e)
            nfe += left > 0
            k = schedule[i] if (strategy != "threshold" and i < len(schedule)) else 1
            if use_graph and graphed is None and e - s == block_length:
                from l2pd_kernels.graph import DecisionGraph

                graphed = DecisionGraph(canvas, tuple(logits.shape), logits.dtype, suppress=mask_id, **decide_kwargs)
            if graphed is not None and e - s == block_length and logits.shape == graphed.logits.shape:
                _, _, _, left, _ = graphed(logits, s, k)
            else:
                step_seed = None if temperature == 0 else (seed * 1000003 + forwards) & 0x7FFFFFFF
                token, prob = confidence(logits, temperature, step_seed, suppress=mask_id)
                if on_step is not None:
                    on_step(s, i, token, prob, canvas)
                if strategy == "oracle":
                    left = _oracle_step(canvas, token, target[:, s - P : e - P].to(device), s, mask_id)
                else:
                    _, left, _ = decide(canvas, token, prob, block_start=s, k=k, **decide_kwargs)
            forwards += 1
            i += 1
            if int(left.max()) == 0:  # the one host read of the step
                break
        if streamer is not None:
            streamer.put(canvas[:, s:e].cpu())
    if streamer is not None:
        streamer.end()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if return_dict_in_generate:
        return GenerateOutput(canvas, nfe, forwards, seconds)
    return canvas
