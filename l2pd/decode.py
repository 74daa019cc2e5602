"""``generate``: block decoding of a batch of prompts on the model's decode engine.

``generate`` resolves its arguments into a ``DecodeSpec`` (``l2pd.spec``) and ``run`` makes each row a
request of the engine the model keeps (``l2pd.engine``: the loop and the step, forward, confidence,
decision, live there), decoding its whole canvas; a per-step callback or a target runs the rows in lockstep
(``l2pd.lockstep``). A step: a forward over the canvas (or, with a cache, over the part of it the cache does
not hold) gives the logits of the current block; ``confidence`` turns them into (token, probability);
``decide`` accepts positions by the strategy's rule, writes them into the canvas and applies EoTP.
Strategies:

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

The only host read of an iteration is the rows' blocks after the decision.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from .lockstep import takes_target
from .models import adapter_for
from .spec import DecodeSpec, resolve

BACKENDS = ("auto", "triton", "torch")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, P + G]: prompt (as given, padding included) and the answer
    nfe: torch.Tensor  # [B] forwards during which the row still had masked positions
    forwards: int  # forward passes the batch ran
    seconds: float
    graphed: int = 0  # forwards replayed from a CUDA graph (the rest ran eagerly)
    fed_tokens: int = 0  # positions the forwards fed, all rows (the prompt's first forward and refreshes included)
    logit_rows: int = 0  # positions the LM head ran over (still-masked ones only at many rows; padding included)

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


def canvas_target(target: torch.Tensor, starts: int | torch.Tensor, T: int) -> torch.Tensor:
    """A reference answer [B, G] placed in canvas columns [B, T]: row r's answer from ``starts`` (P, or each
    row's answer start of a shifted block-causal layout), -1 elsewhere."""
    B, G = target.shape
    out = torch.full((B, T), -1, dtype=torch.long, device=target.device)
    start = torch.as_tensor(starts, device=target.device).reshape(-1, 1).expand(B, 1)
    out.scatter_(1, start + torch.arange(G, device=target.device), target.long())
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
    ``persist``: the persistence rule's run length, default 2) defaults to the decoding stored with the filter
    (``l2pd tune --rules``: the tuned pick among learn2pd and the training-free rules, with its tau, block
    length and EoTP mode), to ``learn2pd`` for a filter tuned alone, else ``threshold``. With ``learn2pd``,
    ``block_length``, ``threshold`` and ``eotp`` default to the filter's operating point (its block length, its
    tau, the ``eotp`` stored in its filter.json); otherwise to 32, 0.9 and off. ``threshold`` above 1 passes no
    position (threshold: one token per step; learn2pd: its schedule only). ``steps`` (total forwards of the
    schedule; default ``max_new_tokens``) sets the per-block top-k of ``steps`` and ``learn2pd``. ``eotp``:
    False/'off', True/'accepted' or 'predicted' (see ``l2pd_kernels.reference.decide``). ``cache``: 'none',
    'prefix' or 'dual'; ``refresh``: 'full', 'tail' or 'window' (see ``l2pd.cache``). ``cuda_graph``: replay steps
    from CUDA graphs where they apply (default on; ``L2PD_CUDA_GRAPH=0`` turns it off). Each row is a request
    of the model's engine (``l2pd.engine``): a row that finishes (EoTP, every block decoded) leaves its
    iterations at once, and its tokens are those of its prompt alone. ``compact`` is accepted and has no
    effect. Sampling (``temperature > 0``) gives row 0 the call's seed and each other row a seed of its own.
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
    (``l2pd.engine``): a request per row, all at once, each decoding its whole canvas as ``generate`` does;
    in lockstep (``l2pd.lockstep``) with a per-step callback or a target."""
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
    lock = None
    if spec.on_step is not None or spec.target is not None:
        lock = _lockstep(adapter, spec, reqs, input_ids, lengths)
    with engine.drive:  # (other threads' calls wait: they would reuse these rows' slots)
        before = dict(engine.counters)
        t0 = time.perf_counter()
        engine.run_batch(reqs, lock)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize(adapter.device)
        seconds = time.perf_counter() - t0
        failed = [r for r in reqs if r.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"decoding failed: {failed[0].error}")
        answers = torch.stack([engine.canvas[r.slot, n : n + G] for r, n in zip(reqs, lengths)])
        iterations, graphed, fed, heads = (engine.counters[k] - before[k]
                                           for k in ("iterations", "graphed", "fed_tokens", "logit_rows"))
    for b, r in enumerate(reqs):
        if r.cut is not None:  # cut at a stop: end of text after it
            answers[b, r.cut :] = spec.eos_id
    sequences = torch.cat([input_ids, answers.to(input_ids.device)], 1)
    if spec.return_dict:
        nfe = torch.tensor([r.forwards for r in reqs], dtype=torch.int64, device=adapter.device)
        return GenerateOutput(sequences, nfe, iterations, seconds, graphed, fed, heads)
    return sequences


def _lockstep(adapter: Any, spec: DecodeSpec, reqs: list, input_ids: torch.Tensor, lengths: list[int]) -> Any:
    """The lockstep frame of a padded batch: each row's answer after the padded prompts (a block-causal model:
    after its prompt, its padding cut to whole blocks), the canvas' columns as ``on_step`` sees them."""
    from .lockstep import Lockstep

    (B, P), G, L = input_ids.shape, spec.max_new_tokens, spec.block_length
    if adapter.block_causal:
        offsets = _leads(P, L, lengths)
        T = max(o + -(-(n + G) // L) * L for o, n in zip(offsets, lengths))
    else:
        offsets, T = [P - n for n in lengths], P + G
    base = torch.full((B, T), spec.mask_id, dtype=torch.long, device=input_ids.device)
    base[:, :P] = input_ids
    if adapter.block_causal:  # what lies before a shifted row: a filler, neither a mask nor an end of text
        filler = next(t for t in range(3) if t not in (spec.mask_id, spec.eos_id))
        lead = torch.tensor(offsets, device=base.device)[:, None]
        base = torch.where(torch.arange(T, device=base.device)[None] < lead, filler, base)
    target = None
    if spec.target is not None:
        starts = torch.tensor([o + n for o, n in zip(offsets, lengths)], device=base.device)
        target = canvas_target(spec.target, starts, T)
    return Lockstep(reqs, offsets, base, on_step=spec.on_step, target=target,
                    stats=spec.step_stats or spec.rule == "margin" or (
                        spec.filter is not None and spec.filter.needs_stats),
                    with_target=target is not None and spec.on_step is not None and takes_target(spec.on_step))


def _row_spec(spec: DecodeSpec, b: int) -> DecodeSpec:
    """Row ``b``'s spec: its slice of the partial answer, and when sampling a seed of its own (row 0 keeps the
    call's seed, so a batch of one samples as before)."""
    seed = spec.seed if spec.seed is None or b == 0 else (spec.seed + b * 0x9E3779B1) & 0x7FFFFFFF
    answer = None if spec.answer is None else spec.answer[b : b + 1]
    return replace(spec, answer=answer, seed=seed, streamer=None)


def _first_blocks(adapter: Any, spec: DecodeSpec, input_ids: torch.Tensor, lengths: list[int]) -> list[int | None]:
    """Where each row's first decision block starts, in its own positions (None: at its answer). A padded batch
    of a block-causal model decides in the batch's blocks: each row's padding is cut to whole blocks
    (``_leads``), so the first block starts at the batch's earliest answer start, and a row whose answer
    starts in a later block decides over that whole block (its prompt's tail included)."""
    P, L = input_ids.shape[1], spec.block_length
    if not adapter.block_causal or min(lengths) == P or spec.edit is not None:
        return [None] * len(lengths)
    if spec.answer is not None:
        raise ValueError("answer= with a padded batch of a block-causal model is not supported: pass prompts of "
                         "one length")
    leads = _leads(P, L, lengths)
    first = min(lead + n for lead, n in zip(leads, lengths))
    starts = [max(first - lead, n // L * L) for lead, n in zip(leads, lengths)]
    host = input_ids.cpu()
    for b, (n, s) in enumerate(zip(lengths, starts)):
        if s < n and spec.eos_id in host[b, P - n + s :].tolist():
            raise ValueError("a prompt of this padded batch holds the end-of-text token in its last block, which "
                             "its decoding block would read as an answer's end: pass the prompts one at a time")
    return starts


def _leads(P: int, L: int, lengths: list[int]) -> list[int]:
    """A padded block-causal batch's frame: the left padding each row keeps, cut to whole blocks, so that its
    attention blocks fall on the batch's blocks."""
    return [(P - n) // L * L for n in lengths]


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
    with _ENGINES:  # (threads: one engine per key, and the model's weights packed once)
        held = vars(model).get("_l2pd_engine")
        if held is not None and held[0] == key:
            return held[1]
        vars(model).pop("_l2pd_engine", None)  # its buffers go before the new ones are allocated
        engine = Engine(model, max_batch=rows, max_length=max(length, 2), backend=spec.backend,
                        cuda_graphs=spec.cuda_graph, max_block_length=spec.block_length)
        model._l2pd_engine = (key, engine)
        return engine


_ENGINES = threading.Lock()


def release(model: Any) -> None:
    """Drop the engine (its buffers and captured CUDA graphs) that ``generate`` keeps on ``model``."""
    vars(model).pop("_l2pd_engine", None)
