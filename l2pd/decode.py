"""The block decoding loop: the one place where a step's policy lives.

One step: a forward over the canvas (or, with a cache, over the part of it the cache does not hold) gives
the logits of the current block; ``confidence`` turns them into (token, probability); ``decide`` accepts
positions by the strategy's rule, writes them into the canvas and applies EoTP (``l2pd.step`` runs it, eager
or replayed from a CUDA graph). ``generate`` resolves its arguments into a ``DecodeSpec`` (``l2pd.spec``)
and ``run`` executes the block loop on it. Strategies:

- ``steps``: LLaDA's low-confidence remasking: the k most confident masked positions, k from an even
  per-block schedule (``steps`` forwards in all; default one token per step).
- ``threshold``: every masked position with confidence > ``threshold``, and at least the most confident.
- ``margin``: every masked position whose top-1 minus top-2 probability > ``threshold``, and at least the most
  confident (Prophet's early-commit criterion as a rule).
- ``persistence``: every masked position whose guess has stayed the same for ``persist`` forwards in a row
  (this one included) with confidence > ``threshold``, and at least the most confident (persistence gating);
  the step keeps each position's previous guess and run length in device memory.
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
from dataclasses import dataclass, replace
from typing import Any

import torch

from .hf import FinalTokenStream
from .models import adapter_for
from .spec import DecodeSpec, resolve
from .step import DecodeState, Policy, Stepper, stepper_for, takes_target

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


def block_bounds(prompt: int, new: int, block: int, aligned: bool = False) -> list[tuple[int, int]]:
    """The decoding blocks [start, end) of a canvas holding ``prompt`` + ``new`` tokens: blocks of ``block``
    from the prompt's end; or, ``aligned`` (block-causal models), blocks at multiples of ``block`` from position
    0, as the model's attention groups them: the first one also holds the prompt's last partial block and the
    last one runs to its end, past ``prompt + new`` (those tokens are decoded and dropped, as LLaDA 2.x's own
    loop does)."""
    if not aligned:
        return [(s, min(s + block, prompt + new)) for s in range(prompt, prompt + new, block)]
    end = -(-(prompt + new) // block) * block
    starts = [prompt] + list(range((prompt // block + 1) * block, end, block))
    return list(zip(starts, starts[1:] + [end]))


def block_phase(input_ids: torch.Tensor, attention_mask: torch.Tensor, block: int, new: int, mask_id: int,
                eos_id: int, stops: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Left-padded prompts laid out for a block-causal model: each row's left padding is cut down to a
    multiple of ``block``, so every row's attention blocks (multiples of ``block`` from its first token) fall
    on the canvas' blocks, and the masks of its answer follow its prompt at once. Returns (ids, attention mask,
    answer start per row, end of each row's last block, filler token): past its last block a row holds the
    filler, which is never decoded (later blocks cannot change earlier ones)."""
    B, P = input_ids.shape
    lengths = attention_mask.long().sum(-1)
    lead = (P - lengths) // block * block  # left padding kept: whole blocks
    starts = lead + lengths
    col = torch.arange(P, device=input_ids.device)[None]
    src = (col - lead[:, None] + (P - lengths)[:, None]).clamp(0, P - 1)
    prompt = (col >= lead[:, None]) & (col < starts[:, None])
    filler = next(t for t in range(3) if t not in (mask_id, eos_id))  # padding: neither a mask nor an end of text
    ids = torch.where(prompt, input_ids.gather(1, src), torch.where(col < lead[:, None], filler, mask_id))
    if stops:
        raise ValueError("stop strings with a padded batch of a block-causal model (LLaDA 2.x) are not supported: "
                         "pass the prompts one at a time or without stop_strings")
    first = int(starts.min())
    if first < P and bool(((ids[:, first:] == eos_id) & prompt[:, first:]).any()):
        raise ValueError("a prompt of this padded batch holds the end-of-text token in its last block, which "
                         "its decoding block would read as an answer's end: pass the prompts one at a time")
    ends = lead + (lengths + new + block - 1) // block * block
    return ids, (col >= lead[:, None]).long().expand(B, P).contiguous(), starts, ends, filler


def _layout(adapter: Any, spec: DecodeSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            padded: bool) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
    """(prompts, attention mask, phase) as the canvas holds them. A block-causal model attends in blocks of the
    decoding block length; its padded rows are shifted by ``block_phase`` (phase: answer starts, row ends,
    filler), else phase is None."""
    if not adapter.block_causal:
        return input_ids, attention_mask, None
    adapter.decoder.block_causal = spec.block_length  # the attention's blocks are the decoding blocks
    if not padded:
        return input_ids, attention_mask, None
    if spec.edit is not None:  # a shifted row's prompt tail may sit in a decision block
        raise ValueError("token editing with a padded batch of a block-causal model is not supported: pass "
                         "prompts of one length, or one at a time")
    ids, mask, starts, ends, filler = block_phase(input_ids, attention_mask, spec.block_length, spec.max_new_tokens,
                                                  spec.mask_id, spec.eos_id, bool(spec.stops.active))
    return ids, mask, (starts, ends, filler)


def canvas_target(target: torch.Tensor, starts: int | torch.Tensor, T: int) -> torch.Tensor:
    """A reference answer [B, G] placed in canvas columns [B, T]: row r's answer from ``starts`` (P, or each
    row's answer start of a shifted block-causal layout), -1 elsewhere."""
    B, G = target.shape
    out = torch.full((B, T), -1, dtype=torch.long, device=target.device)
    start = torch.as_tensor(starts, device=target.device).reshape(-1, 1).expand(B, 1)
    out.scatter_(1, start + torch.arange(G, device=target.device), target.long())
    return out


def _policy(spec: DecodeSpec, device: torch.device) -> Policy:
    """The step's policy: the decision's settings (baked into a captured graph) and the per-call parts."""
    flt = spec.filter
    inputs = tuple(flt.inputs) if flt is not None else ("confidence",)
    decide_kwargs = dict(threshold=spec.threshold, mask_id=spec.mask_id, eos_id=spec.eos_id, eotp=spec.eotp,
                         filter_weights=flt.weights(device) if flt is not None else None,
                         filter_block=spec.block_length)
    if spec.rule != "confidence":
        decide_kwargs.update(rule=spec.rule, persist=spec.persist)
    if flt is not None:
        decide_kwargs.update(filter_inputs=inputs, filter_kind=flt.kind)
    return Policy(spec.strategy, spec.mask_id, decide_kwargs, temperature=spec.temperature, on_step=spec.on_step,
                  filter=flt, target=spec.target,
                  stats=spec.step_stats or (flt is not None and flt.needs_stats) or spec.rule == "margin",
                  step_input="step" in inputs, edit=spec.edit)


def _stepper(model: Any, adapter: Any, spec: DecodeSpec, policy: Policy, B: int, P: int, T: int,
             padded: bool) -> tuple[Stepper, bool]:
    """(the stepper for this decode, whether it stays on the model): steppers that can replay graphs are kept,
    keyed by everything a graph bakes in."""
    device, dtype = adapter.device, adapter.dtype
    confidence, decide = select_ops(spec.backend, device)
    kernels = decide.__module__ == "l2pd_kernels.decide"
    if device.type == "cuda" and os.environ.get("L2PD_PACK", "1") != "0":
        adapter.pack()

    def build() -> Stepper:
        state = DecodeState.allocate(adapter, B, P, T, padded, spec.cache, spec.refresh, dtype, device,
                                     history=spec.rule == "persistence" or (spec.filter is not None
                                                                            and spec.filter.needs_history))
        return Stepper(adapter, state, policy, confidence, decide, kernels, spec.cuda_graph)

    keep = spec.cuda_graph and kernels and device.type == "cuda" and policy.graphable()
    # refresh and prefix/dual only choose the fed ranges: one stepper (and its graphs) serves them all
    flt = spec.filter
    key = (B, P, spec.max_new_tokens, str(dtype), spec.cache != "none", padded, spec.strategy, spec.threshold,
           spec.eotp, spec.mask_id, spec.eos_id, spec.block_length, spec.persist, spec.edit,
           id(flt) if flt is not None else None, adapter.key())
    stepper = stepper_for(model, key, build, keep)
    # a kept stepper keeps its own policy (its graphs point at its filter weights); only the per-call parts move
    stepper.policy.target, stepper.policy.on_step = policy.target, policy.on_step
    return stepper, keep


def _block_done(spec: DecodeSpec, left: torch.Tensor, edits: torch.Tensor, post: int) -> tuple[bool, int]:
    """(whether the block's loop ends after this forward, forwards spent editing after its masks were gone):
    when no row has masks left; with token editing, once a forward changes nothing or after ``edit_steps``
    more. The one host read of the step."""
    if spec.edit is None:
        return int(left.max()) == 0, post
    masks, changed = torch.stack([left.max(), edits.max()]).tolist()
    if masks:
        return False, post
    if changed == 0 or post >= spec.edit_steps:
        return True, post
    return False, post + 1


def _bucket(rows: int) -> int:
    """Rows a compacted step runs: the next power of two (few distinct shapes, so few graph captures)."""
    return 1 << max(0, rows - 1).bit_length()


def _unpermute(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` back in input order (slot i holds input row ``order[i]``); a new tensor."""
    out = torch.empty_like(t)
    out[order] = t
    return out


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
    persist: int | None = None,
    edit_threshold: float | None = None,
    edit_steps: int | None = None,
    answer: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateOutput:
    """Decode ``max_new_tokens`` after left-padded prompts ``input_ids`` [B, P].

    ``strategy`` (``steps``, ``threshold``, ``margin``, ``persistence``, ``learn2pd``; see the module docstring;
    ``persist``: the persistence rule's run length, default 2) defaults to ``learn2pd`` when a filter is given,
    else ``threshold``. With ``learn2pd``,
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
    ``entropy=`` [B, L] (what a richer filter reads), and with ``target`` (a reference answer [B, G]; the
    ``oracle`` strategy's), if it takes ``target=``, the block's slice of it [B, L] in canvas columns (-1
    outside the answer). Returns the sequences [B, P + max_new_tokens], or a
    ``GenerateOutput``.

    Hugging Face conventions: ``input_ids`` may be a list or array; ``max_length`` (prompt + answer) when
    ``max_new_tokens`` is not given (default 256 new tokens); ``do_sample=False`` is greedy whatever the
    temperature, ``do_sample=True`` samples at ``temperature`` (default 1.0); ``num_return_sequences``
    repeats each prompt; ``generation_config`` (a ``transformers.GenerationConfig``) supplies any of these
    not given; ``eos_token_id`` may be a list (the first is the end-of-text of EoTP and padding, the others
    end a row too) and ``stop_strings`` (with ``tokenizer``) end a row after the text; ``streamer`` (batch
    1) gets the prompt, then each token once it and all before it are fixed, up to the end of text;
    ``inputs=`` is another name for ``input_ids``; ``filter`` may be a folder.
    Token editing (LLaDA 2.1): with ``edit_threshold`` (tau_edit; ``threshold`` plays tau_mask), each forward also
    rewrites the block's decided positions whose current guess differs with probability > ``edit_threshold``,
    and a block without masks keeps editing for up to ``edit_steps`` (default 16) more forwards while something
    changes.
    ``answer`` [B, max_new_tokens] continues a partial answer (infilling): its tokens stay as given, its
    ``mask_token_id`` positions are decoded (blocks without masks are skipped).
    Autoregressive-only arguments (``num_beams``, ``top_p``, ...) raise a ValueError unless neutral.
    """
    given = dict(locals())  # every argument as passed; resolve() checks them and applies the defaults
    adapter = adapter_for(model)
    spec, ids, mask = resolve(adapter, **{k: v for k, v in given.items() if k != "model"})
    return run(model, adapter, spec, ids, mask)


def run(model: Any, adapter: Any, spec: DecodeSpec, input_ids: torch.Tensor,
          attention_mask: torch.Tensor | None) -> torch.Tensor | GenerateOutput:
    """One resolved decode (``l2pd.spec.resolve``) of prompts on the model's device, on the model's engine
    (``l2pd.engine``): a request per row, all at once, each decoding its whole canvas as ``generate`` does."""
    if spec.on_step is not None or spec.target is not None:
        return _run_lockstep(model, adapter, spec, input_ids, attention_mask)
    from .engine import Request

    (B, P), G = input_ids.shape, spec.max_new_tokens
    lengths = [P] * B if attention_mask is None else attention_mask.sum(-1).tolist()
    if adapter.block_causal:
        adapter.decoder.block_causal = spec.block_length  # the attention's blocks are the decoding blocks
    first = _first_blocks(adapter, spec, input_ids, lengths)
    engine = _engine(model, adapter, spec, B, P + G)
    host = input_ids.cpu()
    stream = None if spec.streamer is None else _Stream(spec.streamer, host[0], spec.eos_id)
    reqs = [Request(id=f"generate-{b}", prompt=host[b, P - lengths[b] :].tolist(), spec=_row_spec(spec, b),
                    whole=True, first_block=first[b], on_event=stream) for b in range(B)]
    iterations, graphed = engine.counters["iterations"], engine.counters["graphed"]
    t0 = time.perf_counter()
    engine.run_batch(reqs)
    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)
    seconds = time.perf_counter() - t0
    failed = [r for r in reqs if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"decoding failed: {failed[0].error}")
    answers = torch.stack([engine.canvas[r.slot, n : n + G] for r, n in zip(reqs, lengths)])
    for b, r in enumerate(reqs):
        if r.cut is not None:  # cut at a stop: end of text after it
            answers[b, r.cut :] = spec.eos_id
    sequences = torch.cat([input_ids, answers.to(input_ids.device)], 1)
    if spec.return_dict:
        nfe = torch.tensor([r.forwards for r in reqs], dtype=torch.int64, device=adapter.device)
        return GenerateOutput(sequences, nfe, engine.counters["iterations"] - iterations, seconds,
                              engine.counters["graphed"] - graphed)
    return sequences


def _row_spec(spec: DecodeSpec, b: int) -> DecodeSpec:
    """Row ``b``'s spec: its slice of the partial answer, and when sampling a seed of its own (row 0 keeps the
    call's seed, so a batch of one samples as before)."""
    seed = spec.seed if spec.seed is None or b == 0 else (spec.seed + b * 0x9E3779B1) & 0x7FFFFFFF
    answer = None if spec.answer is None else spec.answer[b : b + 1]
    return replace(spec, answer=answer, seed=seed, streamer=None)


def _first_blocks(adapter: Any, spec: DecodeSpec, input_ids: torch.Tensor, lengths: list[int]) -> list[int | None]:
    """Where each row's first decision block starts, in its own positions (None: at its answer). A padded batch
    of a block-causal model decides in the batch's blocks: each row's padding is cut to whole blocks
    (``block_phase``), so the first block starts at the batch's earliest answer start, and a row whose answer
    starts in a later block decides over that whole block (its prompt's tail included)."""
    P, L = input_ids.shape[1], spec.block_length
    if not adapter.block_causal or min(lengths) == P or spec.edit is not None:
        return [None] * len(lengths)
    if spec.answer is not None:
        raise ValueError("answer= with a padded batch of a block-causal model is not supported: pass prompts of "
                         "one length")
    leads = [(P - n) // L * L for n in lengths]
    first = min(lead + n for lead, n in zip(leads, lengths))
    starts = [max(first - lead, n // L * L) for lead, n in zip(leads, lengths)]
    host = input_ids.cpu()
    for b, (n, s) in enumerate(zip(lengths, starts)):
        if s < n and spec.eos_id in host[b, P - n + s :].tolist():
            raise ValueError("a prompt of this padded batch holds the end-of-text token in its last block, which "
                             "its decoding block would read as an answer's end: pass the prompts one at a time")
    return starts


class _Stream:
    """A ``transformers`` streamer fed from engine events: the prompt first (so ``skip_prompt`` works), then
    each token once it and all before it are final, then the end of text if the answer has one."""

    def __init__(self, streamer: Any, prompt: torch.Tensor, eos_id: int) -> None:
        self.streamer, self.eos_id = streamer, eos_id
        streamer.put(prompt)

    def __call__(self, req: Any, tokens: list[int]) -> None:
        if tokens:
            self.streamer.put(torch.tensor(tokens, dtype=torch.long))
        if req.finish_reason is not None:
            G = req.spec.max_new_tokens
            if req.spec.eos_id in req.answer or (req.cut is not None and req.cut < G):
                self.streamer.put(torch.tensor([self.eos_id], dtype=torch.long))
            self.streamer.end()


def _engine(model: Any, adapter: Any, spec: DecodeSpec, rows: int, length: int) -> Any:
    """The engine ``generate`` runs on: kept on the model (``release`` drops it) while the batch size, the
    longest canvas (rounded up to 128) and what its graphs bake in stay the same."""
    from .engine import Engine

    limit = adapter.max_length
    length = -(-length // 128) * 128 if limit is None else min(-(-length // 128) * 128, limit)
    key = (rows, length, spec.block_length, spec.backend, spec.cuda_graph, adapter.key())
    held = vars(model).get("_l2pd_engine")
    if held is not None and held[0] == key:
        return held[1]
    vars(model).pop("_l2pd_engine", None)  # its buffers go before the new ones are allocated
    engine = Engine(model, max_batch=rows, max_length=max(length, 2), backend=spec.backend,
                    cuda_graphs=spec.cuda_graph, max_block_length=spec.block_length)
    model._l2pd_engine = (key, engine)
    return engine


def _run_lockstep(model: Any, adapter: Any, spec: DecodeSpec, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> torch.Tensor | GenerateOutput:
    """The block loop with every row in the same block and step (a per-step callback, a target)."""
    mask_id, eos_id = spec.mask_id, spec.eos_id
    block_length, stops, device = spec.block_length, spec.stops, adapter.device
    (B, P), G, given_ids = input_ids.shape, spec.max_new_tokens, input_ids
    padded = attention_mask is not None and not bool(attention_mask.all())
    # block-causal padded rows: each row's answer start and end in the canvas, and the filler past its end
    input_ids, attention_mask, phase = _layout(adapter, spec, input_ids, attention_mask, padded)
    starts = None if phase is None else phase[0]
    first = P if starts is None else int(starts.min())
    bounds = block_bounds(first, P + G - first, block_length, adapter.block_causal)
    T = bounds[-1][1]  # P + G, or (block-causal) up to the end of the last block
    policy = _policy(spec, device)
    stepper, keep = _stepper(model, adapter, spec, policy, B, P, T, padded)
    if spec.target is not None:
        stepper.policy.target = canvas_target(spec.target, P if starts is None else starts, T)
    # once per decode, not per step: whether the callback takes the reference answer's block slice
    stepper.policy.on_step_target = spec.target is not None and spec.on_step is not None and takes_target(spec.on_step)
    state = stepper.state
    state.load(input_ids, attention_mask if padded else None, mask_id)
    if phase is not None:  # nothing to decode past each row's own last block
        state.canvas.masked_fill_(torch.arange(T, device=device)[None] >= phase[1][:, None], phase[2])
    _place_answer(state.canvas, spec.answer, phase, P)
    if state.kv is not None:
        state.kv.mode, state.kv.refresh = spec.cache, spec.refresh
    canvas, kv = state.canvas, state.kv

    stream = None if spec.streamer is None else FinalTokenStream(spec.streamer, input_ids[0], P, eos_id, mask_id)
    nfe = torch.zeros(B, dtype=torch.int64, device=device)
    # finished rows leave at block starts: the rest move to the front, the step runs on the first n (a power of
    # two: few graph shapes); ``order[i]`` is the input row in slot i
    compact = spec.compact
    order = torch.arange(B, device=device)
    n, step_fn = B, stepper
    forwards = graphed = 0
    t0 = time.perf_counter()
    previous = None  # start of the last block decoded (the tail and window refreshes start there)
    for s, e in bounds:
        # block-causal: feed from the attention block's start (the first one holds the prompt's tail too)
        s_attn = s - (s % block_length) if adapter.block_causal else s
        left = (canvas[:n, s:e] == mask_id).sum(-1)
        # a row is done when its block has no masks (EoTP filled it), or with phase-shifted rows (block-causal,
        # padded) none after it either: such a row's answer may start a block later
        done = left == 0 if starts is None else (canvas[:n, s:] == mask_id).sum(-1) == 0
        alive, any_left = torch.stack([(~done).sum(), left.max()]).tolist()  # the one host read of the block
        if alive == 0 or any_left == 0:  # EoTP already filled this block in every row (or no row starts here)
            continue
        if compact and _bucket(alive) < n:
            keep_rows = _bucket(alive)
            perm = torch.argsort(done.to(torch.int8), stable=True)  # rows still decoding first
            state.reorder(perm, keep_rows)
            order[:n] = order[:n].index_select(0, perm)
            nfe[:n] = nfe[:n].index_select(0, perm)
            n, step_fn = keep_rows, stepper.narrow(keep_rows)
            left = left.index_select(0, perm[:n])
        # block-causal: the schedule of a whole block, also for a first block that holds the prompt's tail (as
        # LLaDA 2.x's loop does; top-k takes what is left)
        schedule = block_schedule(block_length if adapter.block_causal else e - s, spec.steps_per_block)
        i = post = 0  # post: forwards spent editing after the block's masks are gone
        started = left > 0
        while True:
            if kv is None:
                lo, hi = 0, T
            elif i == 0:  # with a cache, the block's first forward refreshes the slots
                lo, hi = kv.refresh_range(previous, e)
            else:
                lo, hi = kv.feed_range(s_attn, e)
            nfe[:n] += started if post else left > 0
            k = schedule[i] if (not spec.fixed_k and i < len(schedule)) else 1
            if i == e - s - 1:  # the cap: a block never takes more forwards than its length
                k = e - s  # (every step accepts >= 1, so this binds only for rules that stall, e.g. oracle)
            step_seed = None if spec.temperature == 0 else (spec.seed * 1000003 + forwards) & 0x7FFFFFFF
            left, replayed = step_fn(lo, hi - lo, s, e - s, k, step=i, seed=step_seed)
            forwards += 1
            graphed += replayed
            i += 1
            if stream is not None:  # batch 1: cut at a stop among the fixed tokens, send what is final
                if stops.active:
                    stops.cut(canvas, P, e, 1)
                    left = (canvas[:1, s:e] == mask_id).sum(-1)
                stream.update(canvas, min(e, P + G))
            done, post = _block_done(spec, left, step_fn.edits[:n], post)
            if done:
                break
        previous = s_attn
        if stops.active:  # rows that reached a stop end here (the rest of their canvas becomes end-of-text)
            stops.cut(canvas, P, e, n)
    if stream is not None:
        stream.update(canvas, P + G)
        stream.end()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if compact:
        canvas, nfe = _unpermute(canvas, order), _unpermute(nfe, order)
    sequences = _sequences(canvas, given_ids, starts, G, T, keep and not compact)
    if spec.return_dict:
        return GenerateOutput(sequences, nfe, forwards, seconds, graphed)
    return sequences


def _place_answer(canvas: torch.Tensor, answer: torch.Tensor | None, phase: tuple | None, P: int) -> None:
    """A partial answer into the canvas after the prompts: its decided tokens stay, its masks get decoded."""
    if answer is None:
        return
    if phase is not None:
        raise ValueError("answer= with a padded batch of a block-causal model is not supported: pass prompts of "
                         "one length")
    canvas[:, P : P + answer.shape[1]].copy_(answer)


def _sequences(canvas: torch.Tensor, given_ids: torch.Tensor, starts: torch.Tensor | None, G: int, T: int,
               kept: bool) -> torch.Tensor:
    """The decoded sequences [B, P + G] from the final canvas: each row's answer after its prompt as given."""
    P = given_ids.shape[1]
    if starts is not None:  # a shifted block-causal layout
        return torch.cat([given_ids, canvas.gather(1, starts[:, None] + torch.arange(G, device=canvas.device))], 1)
    # a kept stepper's canvas is reused by the next call
    return canvas[:, : P + G].clone() if kept or T > P + G else canvas
