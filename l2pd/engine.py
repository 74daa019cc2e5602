"""The decode engine: continuous batching of block decodes over a pool of row slots.

Each request gets a *row* of the pool: its canvas (prompt, then ``max_new_tokens`` masks), its K/V, and its
own block position, step and policy. One *iteration* runs one forward for every active row, each at its own
block: the rows' fed tokens are packed into one sequence (``l2pd.models.decoder.Pack``: token t is position
``slots[t]`` of pool row ``rows[t]``), attention reads each row's own K/V (``pool_attention``), then one
``confidence`` over the blocks' logits and one ``decide`` per policy group (per-row block starts, k and step
in device memory, canvas rows by index). A row's forwards are exactly those of ``generate`` on its prompt
alone: the block's first forward is its refresh (``l2pd.cache.refresh_range``), the others feed what the
cache mode says (``feed_range``), with the same top-k schedule, cap and sampling seeds; so greedy tokens of a
row never depend on which rows share its iterations, or when they joined.

Scheduler policy, once per iteration (``Engine.step``):

1. **Retire** cancelled rows and rows past their deadline (their slots free at once).
2. **Admit** waiting requests, first come first served, into the lowest free slots, up to ``max_batch`` rows.
3. **Plan** under a budget of ``max_step_tokens`` fed tokens: every row inside a block takes its step (steps
   are never deferred, so a row's latency per step is bounded by one iteration); then block refreshes in
   slot order (rows that finished a block, then the rows that just joined), each while the budget allows, and
   at least one per iteration so that nothing starves. A deferred refresh waits one iteration; it changes
   when the row runs, never what it computes.
4. **Run** the packed forward, ``confidence``, ``decide``; read back the rows' blocks (the one host read).
5. **Advance**: tokens that are final (they and all before them decided) go to the request; a row finishes
   at its first end of text (once final), at its token budget, at an extra end id or a stop string.

**Run-ahead** (``run_ahead``): between 4 and 5, where every row's next state is sure (only the schedule's
top-k decides), the next iteration is packed and launched before this one is read back, so the device never
waits for the host's read-back, advancing and packing; it counts for the rows found where it supposed, and
the others (an end of text, a stop, a cancellation) wait for the next iteration (``_launch_ahead``).

Block-causal models (LLaDA 2.x): a row's blocks and attention blocks are multiples of its ``block_length``
from position 0 (the first block also holds the prompt's tail; the last runs past the answer, whose tokens
there are dropped); its fed tokens are cut into attention segments at those blocks, each seeing the keys up
to its block's end, and its decision covers its block's width: ``generate``'s layout for one prompt.
Token editing (LLaDA 2.1, ``edit_threshold``): before its decision a row rewrites its block's decided positions
whose guess passes tau_edit; once the block has no masks it keeps editing while a forward still rewrites
something, ``edit_steps`` forwards at most; its block's tokens become final when the block ends.

Front ends: ``submit`` (one request; the server), ``Engine.generate`` (prompts at once), and ``generate``
(``l2pd.decode``), which makes each row of its batch a *whole-canvas* request (``Request.whole``: decoded
past its first end of text, cut at stops as ``generate`` cuts) and runs the batch with ``run_batch``; with
a per-step callback or a target the batch runs in lockstep (``l2pd.lockstep``): only the rows at the batch's
current block run, and a row whose block is done waits for the others. ``counters`` and ``step_seconds``
feed the server's metrics.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from l2pd_kernels.attention import POOL_TILE_M, pool_tile_m
from l2pd_kernels.reference import edit_tokens

from .cache import BlockKVCache, feed_range, refresh_range
from .decode import block_schedule, select_ops
from .lockstep import Lockstep
from .models import adapter_for
from .models.decoder import Pack
from .spec import DecodeSpec, resolve

_RESOLVE_ARGS = set(inspect.signature(resolve).parameters) - {"adapter", "kwargs", "input_ids"}
MAX_BLOCK = 256  # default longest block: the pool keeps that many spare columns past the longest request


class EngineClosed(RuntimeError):
    """The engine no longer admits requests (it is draining or stopped)."""


@dataclass
class Request:
    """One request: its resolved spec and prompt, and what it has produced so far."""

    id: str
    prompt: list[int]
    spec: DecodeSpec
    stop: tuple[str, ...] = ()
    on_event: Callable[["Request", list[int]], None] | None = None  # (request, new final tokens); last: done
    deadline: float | None = None  # time.monotonic() after which the request is dropped ('timeout')
    tokens: list[int] = field(default_factory=list)  # final answer tokens, up to (not including) the end of text
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    stop_hit: str | None = None  # the stop string that ended it
    error: str | None = None
    forwards: int = 0
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    finished: float | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    # ``generate``'s rows (``whole``): the whole canvas is decoded, past the first end of text, and cut at
    # ``spec.stops`` as ``generate`` cuts; ``answer`` holds every final token, ``cut`` where the answer was cut
    # (it is end of text from there), ``slot`` the pool row that holds the canvas once it is done
    whole: bool = False
    first_block: int | None = None  # where the first decision block starts, if before the answer (generate)
    answer: list[int] = field(default_factory=list)
    cut: int | None = None
    slot: int | None = None
    queued: bool = False  # given to the engine (submit, run_batch): never queued twice

    def cancel(self) -> None:
        """Free the request's row at the next iteration (a client went away)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> "Request":
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self


@dataclass
class _Row:
    """A request's place in the pool and where its decode stands (host side)."""

    request: Request
    slot: int
    P: int
    T: int  # the canvas' end: P + max_new_tokens, or (block-causal) the end of the last attention block
    block: int  # the block's first position
    step: int = 0  # forwards taken in this block (0: the next one is the refresh)
    previous: int | None = None  # the last block decoded (where tail and window refreshes start)
    schedule: list[int] = field(default_factory=list)
    final: int = 0  # answer tokens final so far
    causal: bool = False  # a block-causal model: blocks (and attention) at multiples of block_length
    post: int = 0  # token editing: forwards spent editing after the block's masks were gone
    ended: bool = False  # a whole-canvas row past its first end of text: nothing more to send
    waiting: bool = False  # lockstep: its block is done, the batch's is not
    seen: list[int] | None = None  # token editing: the block as the last forward left it
    given: list[int] | None = None  # a partial answer (``answer=``): the canvas from P to T as admitted
    left: int | None = None  # masks left in the block after its last forward read back (None: not read yet)

    @property
    def start(self) -> int:
        """Where the block's fed range starts: its attention block's start for a block-causal model (the first
        block also holds the prompt's tail)."""
        return self.block - self.block % self.request.spec.block_length if self.causal else self.block

    @property
    def end(self) -> int:
        L = self.request.spec.block_length
        return min((self.block // L + 1) * L if self.causal else self.block + L, self.T)


_COUNTERS = ("iterations", "graphed", "forwards", "fed_tokens", "step_tokens", "refresh_tokens", "tokens_out",
             "admitted", "finished", "cancelled", "timed_out", "failed", "deferred_refreshes", "ahead",
             "ahead_wasted", "logit_rows")
RUN_AHEAD = ("auto", "off", "always")
# L2PD_HEAD_ROWS=1: the LM head over the blocks' still-masked positions only (``_head_rows``), from HEAD_ROWS_MIN
# block positions an iteration: a decision reads nothing else, and at many rows the head's product is
# compute-bound. Off by default: on an H200 a repeated `generate` at batch 64 took 2% to 5% less per forward, but
# the served engine's throughput fell 17% to 38% in two runs (each row count is a graph of its own;
# benchmarks/RESULTS.md)
HEAD_ROWS = os.environ.get("L2PD_HEAD_ROWS", "0") == "1"
HEAD_ROWS_MIN = 512


class _OnHost:
    """An adapter seen from the host: what ``resolve`` reads, with the prompt kept on the CPU."""

    device = torch.device("cpu")

    def __init__(self, adapter: Any) -> None:
        self._adapter = adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


@dataclass
class _EngineGraph:
    dev: torch.Tensor  # the iteration's indices (static input)
    # the group's filter (its id is in the key): the graph reads its weights' device copy, refreshed before each replay
    held: Any = None
    graph: Any = None
    out: torch.Tensor | None = None  # the rows' blocks after the decision (static output)
    warm: set = field(default_factory=set)  # the threads that ran it eagerly (a thread captures only after)


@dataclass
class _Launched:
    """An iteration on its way: its rows, their blocks on the device and (CUDA) their pinned host copy, ready
    once ``event`` is; an iteration launched ahead also says where each row must stand for it to count."""

    plan: list  # the rows in plan order
    order: list  # the rows in packed order
    blocks: torch.Tensor  # [rows (padded), width + 1] on the device
    fed: list[tuple[int, bool]]  # per row of ``order``: tokens fed, whether a step's (not a refresh's)
    graphed: bool
    head_rows: int = 0  # the head's rows when it ran over the masked positions only (0: every position)
    logit_rows: int = 0  # the rows the head ran over (padding included)
    host: torch.Tensor | None = None
    event: Any = None
    expect: list = field(default_factory=list)  # launched ahead: (row, block, step, previous) it supposed


_OVER = 1 << 40  # the read-back count's flag: more masked positions than the head's rows


def _top_k(row: _Row, step: int) -> int:
    """The positions forward ``step`` of the row's block decides at least: its schedule's (the threshold rules:
    the most confident one), and the whole block at its last possible forward (generate's cap)."""
    spec = row.request.spec
    if step == row.end - row.block - 1:
        return row.end - row.block
    return row.schedule[step] if not spec.fixed_k and step < len(row.schedule) else 1


def _bucket(n: int) -> int:
    """Rows a graphed iteration runs: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def _repeated(row: list[int], k: int) -> np.ndarray:
    """``row`` k times, as an int64 array [k, len(row)] (the few rows of padding a pack takes: no numpy calls
    per row)."""
    return np.array([row] * k, dtype=np.int64).reshape(k, len(row))


def _bucket_tokens(n: int) -> int:
    """Tokens (or attention programs) of a graphed iteration: rounded up by at most 1/8 (and to 16)."""
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-max(n, 1) // step) * step


class Engine:
    """Continuous batching over ``max_batch`` row slots of up to ``max_length`` positions each.

    ``submit`` adds a request (any thread); ``step`` runs one iteration; ``run`` steps until idle;
    ``start``/``stop`` drive the loop on a background thread (the server). ``filter`` is the learn2pd filter
    requests get; ``tokenizer`` decodes stop strings. ``pad_buckets``: pad iterations to the graphs' buckets
    without graphs too, where a graph could run them (None, the default: on CUDA, so an eager decode computes
    what a graphed one does).
    ``run_ahead``: 'auto' (default on CUDA; the environment
    variable ``L2PD_RUN_AHEAD`` sets the default), 'off' (default on the CPU, where nothing overlaps) or
    'always' (tests: wherever it can, guessing that rows go on in their blocks).
    """

    def __init__(self, model: Any, *, max_batch: int = 16, max_length: int | None = None, filter: Any = None,
                 tokenizer: Any = None, max_step_tokens: int = 8192, backend: str | None = None,
                 fused: bool | None = None, max_block_length: int = MAX_BLOCK,
                 cuda_graphs: bool | None = None, pad_buckets: bool | None = None,
                 run_ahead: str | None = None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} must be a positive integer")
        self.model, self.adapter = model, adapter_for(model)
        limit = self.adapter.max_length
        max_length = max_length or min(limit or 4096, 4096)
        if not isinstance(max_length, int) or max_length < 2 or (limit is not None and max_length > limit):
            raise ValueError(f"max_length={max_length!r} must be an integer in [2, {limit}] (the model's length)")
        from .spec import _as_filter

        self.filter, self.tokenizer = _as_filter(filter), tokenizer
        self.max_batch, self.max_length, self.max_step_tokens = max_batch, max_length, int(max_step_tokens)
        dec, device, dtype = self.adapter.decoder, self.adapter.device, self.adapter.dtype
        self.device = device
        self.max_block_length = int(max_block_length)
        width = max_length + self.max_block_length  # a last block may reach past the answer; never past the pool
        # row max_batch is spare: a place for nothing (kept so a padded pack has somewhere harmless to write)
        self.canvas = torch.full((max_batch + 1, width), self.adapter.eos_id, dtype=torch.int64, device=device)
        from .quantize import kv_cache_dtype

        self.kv = BlockKVCache(len(dec.layers), max_batch + 1, dec.n_kv, width, dec.head_dim, "dual",
                               kv_cache_dtype(model, dtype), device)
        self.heads = (dec.n_heads, dec.n_kv)  # the attention's query tile follows them (pool_tile_m)
        # per pool row and position: previous guess, run length, previous confidence (persistence, history filters)
        self.guesses = (torch.full((max_batch + 1, width), -1, dtype=torch.int64, device=device),
                        torch.zeros(max_batch + 1, width, dtype=torch.int32, device=device),
                        torch.zeros(max_batch + 1, width, dtype=torch.float32, device=device))
        self._columns = torch.arange(width, device=device)
        self.confidence, self.decide = select_ops(backend, device)
        self.fused = fused  # the forward's kernels (default: on CUDA)
        self.kernels = self.decide.__module__ == "l2pd_kernels.decide"
        if device.type == "cuda" and os.environ.get("L2PD_PACK", "1") != "0":
            self.adapter.pack()
        # iterations of one policy, greedy, on CUDA replay from a graph per (token, row, program) bucket
        # (the reference forward ops read the pack's segments on the host: they cannot be captured)
        fused_ops = fused if fused is not None else os.environ.get("L2PD_FUSED", "1") != "0"
        self.graphs = device.type == "cuda" and self.kernels and fused_ops and (
            cuda_graphs if cuda_graphs is not None else os.environ.get("L2PD_CUDA_GRAPH", "1") != "0")
        self._graphed: dict[tuple, _EngineGraph] = {}
        self.lockstep: Lockstep | None = None  # a lockstep batch being decoded (``run_batch``)
        # pinned host memory the iteration's indices go through, and its blocks come back through: two of each,
        # used in turn (an iteration launched ahead runs while the one before it is read back)
        self._staging: list[torch.Tensor | None] = [None, None]
        self._readback: list[torch.Tensor | None] = [None, None]
        self._parity = 0
        run_ahead = run_ahead or os.environ.get("L2PD_RUN_AHEAD") or ("auto" if device.type == "cuda" else "off")
        if run_ahead not in RUN_AHEAD:
            raise ValueError(f"run_ahead={run_ahead!r}: expected one of {RUN_AHEAD}")
        self.run_ahead = run_ahead
        self._ahead: _Launched | None = None  # the next iteration, launched before this one was read back
        self._packed: tuple | None = None  # the last iteration's packed indices and what they were built from
        # without graphs, still pad an iteration a graph could run to its bucket: on CUDA by default, since cuBLAS
        # picks its kernel (and so its sums' order) by the rows and an unpadded eager decode could decode other
        # tokens than the graphed one; on the CPU only when asked (tests)
        self.pad_buckets = device.type == "cuda" if pad_buckets is None else pad_buckets
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._capture_stream: Any = None
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: dict[int, _Row] = {}  # slot -> row
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=4096)
        # (time, tokens out so far) after each iteration: tokens/s over a recent window
        self.history: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        self.observers: list[Callable[[float], None]] = []  # called with each iteration's seconds (metrics)
        self._ids = itertools.count()
        self._lock = threading.Condition()
        # held by whoever steps the engine: one iteration, or a whole run_batch (its budget and lockstep are the
        # engine's while it runs), at a time; generate() called from several threads shares the model's engine
        # and holds it until it has read its rows' canvases (a finished row's slot is free for the next request)
        self.drive = threading.RLock()
        self._in_step: int | None = None  # the thread running an iteration: a callback inside it must not decode
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False

    # ---- front ends ----------------------------------------------------------------------------------

    def submit(self, prompt: Any, *, on_event: Callable | None = None, request_id: str | None = None,
               stop: Any = None, timeout: float | None = None, **options: Any) -> Request:
        """Queue a request: ``prompt`` token ids (1-D), ``options`` those of ``generate`` (``max_new_tokens``,
        ``strategy``, ``threshold``, ``eotp``, ``block_length``, ``cache``, ``refresh``, ``temperature``,
        ``seed``, ``steps``, ``persist``, ``edit_threshold``, ``edit_steps``, ``eos_token_id``, ``answer``: a
        partial answer of ``max_new_tokens`` ids); ``stop`` strings end it (with the engine's tokenizer); a
        ``timeout`` in seconds drops it. Raises ValueError (naming the argument) for a request it cannot run,
        ``EngineClosed`` once the engine drains."""
        spec, ids, stops = self._resolve(prompt, stop, options)
        req = Request(id=request_id or f"req-{next(self._ids)}", prompt=ids, spec=spec, stop=stops,
                      on_event=on_event, deadline=None if timeout is None else time.monotonic() + float(timeout))
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is shutting down and admits no new requests")
            req.queued = True
            self.waiting.append(req)
            self._lock.notify()
        return req

    def _resolve(self, prompt: Any, stop: Any, options: dict[str, Any]) -> tuple[DecodeSpec, list[int], tuple]:
        for name in ("on_step", "streamer", "target", "num_return_sequences", "attention_mask", "inputs",
                     "input_ids", "return_dict_in_generate", "stop_strings", "generation_config"):
            if options.get(name) is not None:
                raise ValueError(f"{name} is not an engine option (one request is one prompt)")
        if options.get("answer") is not None:  # one request's partial answer: [max_new_tokens] -> [1, G]
            answer = torch.as_tensor(options["answer"])
            options["answer"] = answer.view(1, -1) if answer.dim() == 1 else answer
        if options.get("strategy") == "oracle":
            raise ValueError("strategy 'oracle' is for collecting training data; use l2pd.collect")
        if options.get("strategy") in (None, "learn2pd") and options.get("filter") is None:
            options["filter"] = self.filter
        ids = torch.as_tensor(prompt, dtype=torch.long) if not isinstance(prompt, torch.Tensor) else prompt
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"prompt must be a non-empty list of token ids, got shape {tuple(ids.shape)}")
        known = {k: v for k, v in options.items() if k in _RESOLVE_ARGS}
        unknown = {k: v for k, v in options.items() if k not in _RESOLVE_ARGS}
        # checked on the host: submit runs on the caller's thread, which must not touch the device while the
        # engine's thread may be capturing a CUDA graph
        spec, input_ids, _ = resolve(_OnHost(self.adapter), input_ids=ids.view(1, -1), kwargs=unknown, **known)
        if spec.block_length > self.max_block_length:
            raise ValueError(f"block_length={spec.block_length} exceeds the engine's limit of {self.max_block_length}")
        P, G = input_ids.shape[1], spec.max_new_tokens
        if P + G > self.max_length:
            raise ValueError(f"prompt of {P} tokens + max_new_tokens {G} = {P + G} exceeds the engine's "
                             f"max_length={self.max_length}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) for s in stops):
            raise ValueError(f"stop={stop!r} must be a string or a list of strings")
        stops = tuple(s for s in stops if s)
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer (Engine(..., tokenizer=...))")
        return spec, input_ids[0].tolist(), stops

    def generate(self, prompts: list[Any], **options: Any) -> list[Request]:
        """Every prompt at once, run to completion on this thread (while the background loop runs: by the loop,
        this thread waiting); the finished requests in order.

        A batch call has no per-request latency to protect, so the token budget grows, for this call, to take
        every joining row's first refresh in one iteration, as ``generate``'s first forward does (at LLaDA-8B
        shapes, 64 rows of 512 + 256: the same throughput as ``generate``; with the serving budget, 0.89 of it:
        ``benchmarks/RESULTS.md``, "The engine as a batch decoder")."""
        return self.run_batch([self.submit(p, **options) for p in prompts])

    def run_batch(self, requests: list[Request], lockstep: Lockstep | None = None) -> list[Request]:
        """Queue ``requests`` (submitted, or built with a resolved spec: ``l2pd.decode``) and run until idle,
        every joining row's first refresh in the first iteration; with ``lockstep`` (``l2pd.lockstep``; the
        engine must be idle) the rows move from block to block together."""
        self._not_nested()
        if self._thread is not None:  # the background loop runs them
            if lockstep is not None:
                raise RuntimeError("a lockstep batch needs an engine without its background loop (stop() it)")
            self._enqueue(requests)
            for r in requests:
                r.done.wait()
            return requests
        with self.drive:
            if lockstep is not None and (self.rows or self.waiting):
                raise RuntimeError("a lockstep batch needs an idle engine")
            self._enqueue(requests)
            budget = self.max_step_tokens
            self.max_step_tokens = max(budget, sum(r.spec.max_new_tokens + len(r.prompt) + self.max_block_length
                                                   for r in requests))
            self.lockstep = lockstep
            try:
                self.run()
            finally:
                self.max_step_tokens, self.lockstep = budget, None
        return requests

    def _enqueue(self, requests: list[Request]) -> None:
        with self._lock:  # (submitted ones are queued already: a loop may even have admitted them by now)
            for r in requests:
                if not r.queued:
                    r.queued = True
                    self.waiting.append(r)
            self._lock.notify()

    def run(self) -> None:
        """Iterate until no request is waiting or active."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the loop on a background thread (idle iterations sleep on a condition)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="l2pd-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: float = 30.0) -> None:
        """Admit nothing more; let active and queued requests finish for up to ``drain`` seconds, then cancel
        what is left and stop the loop."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        deadline = time.monotonic() + drain
        while self.load() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.01)
        with self._lock:
            for req in list(self.waiting) + [r.request for r in self.rows.values()]:
                req.cancel()
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, drain))
            self._thread = None
        with self.drive:
            self._drop_ahead(failed=True)
        with self._lock:  # whatever the last iteration did not reach ends here, so no caller waits forever
            for row in list(self.rows.values()):
                self._retire(row, "cancelled")
            while self.waiting:
                self._finish(self.waiting.popleft(), "cancelled")

    def load(self) -> int:
        """Requests waiting or active."""
        return len(self.waiting) + len(self.rows)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Answer tokens per second over the last ``window`` seconds of iterations."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.history) if now - t <= window]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (now - recent[0][0])

    @property
    def closed(self) -> bool:
        return self._closed

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.waiting and not self.rows and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self.rows and not self.waiting:
                    return
            try:
                self.step()
            except Exception as exc:  # a failed iteration fails its rows, never the loop
                self._fail_all(exc)
            if self._stopping:
                return  # stop() ends what is left

    # ---- one iteration -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration (see the module docstring); returns whether any request is still waiting or active."""
        with self.drive:
            self._not_nested()
            self._in_step = threading.get_ident()
            try:
                return self._step()
            finally:
                self._in_step = None

    def _not_nested(self) -> None:
        if self._in_step == threading.get_ident():  # (a callback of this thread's iteration; the loop's too)
            raise RuntimeError("the engine was asked to decode from inside one of its own iterations (a callback "
                               "of a decode on this model, such as on_step, a streamer or on_event, called "
                               "generate): decode after it returns, or on another model object")

    def _step(self) -> bool:
        t0 = time.perf_counter()
        now = time.monotonic()
        for row in list(self.rows.values()):
            req = row.request
            if req.cancelled:
                self._retire(row, "cancelled")
            elif req.deadline is not None and now > req.deadline:
                self._retire(row, "timeout")
        self._admit(now)
        if self.lockstep is not None:
            self._barrier()
        if not self.rows:
            self._drop_ahead()
            return bool(self.waiting)
        ahead = self._ahead_if_valid()
        plan = ahead.plan if ahead is not None else self._plan()
        try:
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):  # Triton launches on the current device
                    blocks = self._run(plan, ahead)
            else:
                blocks = self._run(plan, ahead)
        except Exception as exc:
            self._drop_ahead(failed=True)
            for row in plan:
                self._retire(row, "error", error=f"{type(exc).__name__}: {exc}")
            raise
        for row, toks in zip(plan, blocks):
            try:
                self._advance(row, toks)
            except Exception as exc:  # a request's own failure (its callback, its stop check) is its alone
                self._retire(row, "error", error=f"{type(exc).__name__}: {exc}")
        if not self.rows:  # (launched ahead for rows that have all finished)
            self._drop_ahead()
        self.counters["iterations"] += 1
        seconds = time.perf_counter() - t0
        self.step_seconds.append(seconds)
        self.history.append((time.monotonic(), self.counters["tokens_out"]))
        for observe in self.observers:
            observe(seconds)
        return bool(self.rows or self.waiting)

    def _admit(self, now: float) -> None:
        with self._lock:
            free = [s for s in range(self.max_batch) if s not in self.rows]
            while self.waiting and free:
                req = self.waiting.popleft()
                if req.cancelled or (req.deadline is not None and now > req.deadline):
                    self._finish(req, "cancelled" if req.cancelled else "timeout")
                    continue
                slot = free.pop(0)
                spec = req.spec
                P, G, L = len(req.prompt), spec.max_new_tokens, spec.block_length
                causal = self.adapter.block_causal
                # block-causal: the last block runs to its attention block's end; what lies past the answer is
                # decoded and dropped, as ``generate`` does
                T = -(-(P + G) // L) * L if causal else P + G
                row = self.canvas[slot]
                row.fill_(spec.eos_id)  # past the canvas: end of text, never masked, never attended
                row[:P] = torch.tensor(req.prompt, dtype=torch.int64)
                row[P:T] = spec.mask_id
                given = None
                if spec.answer is not None:  # a partial answer: its tokens stay, its masks get decoded
                    row[P : P + G] = spec.answer[0].to(row.device)
                    given = spec.answer[0].tolist() + [spec.mask_id] * (T - P - G)
                self.guesses[0][slot].fill_(-1)
                self.guesses[1][slot].zero_()
                self.guesses[2][slot].zero_()
                first = P if req.first_block is None else req.first_block
                req.slot = slot
                self.rows[slot] = _Row(req, slot, P, T, first, causal=causal, given=given)
                self.counters["admitted"] += 1
                if given is not None and spec.mask_id not in given[: self.rows[slot].end - P]:
                    self._skip_given(self.rows[slot])

    def _barrier(self) -> None:
        """Lockstep: once no row at the batch's block has masks left there, every waiting row moves on, and
        the batch's block becomes the earliest block a row has to decode."""
        ls = self.lockstep
        if any(not r.waiting and ls.canvas_start(r) == ls.block for r in self.rows.values()):
            return
        for row in list(self.rows.values()):
            if row.waiting:
                row.waiting = False
                try:
                    self._deliver(row, *self._next_block(row, []))
                except Exception as exc:
                    self._retire(row, "error", error=f"{type(exc).__name__}: {exc}")
        ls.block = min((ls.canvas_start(r) for r in self.rows.values()), default=None)

    def _plan(self) -> list[_Row]:
        """Rows that run this iteration: every row inside a block, then refreshes within the token budget
        (lockstep: the rows at the batch's block that have masks left in it)."""
        if self.lockstep is not None:
            ls = self.lockstep
            return [r for r in self.rows.values() if not r.waiting and ls.canvas_start(r) == ls.block]
        plan, deferred = self._budgeted(list(self.rows.values()))
        self.counters["deferred_refreshes"] += deferred
        return plan

    def _budgeted(self, rows: list[_Row]) -> tuple[list[_Row], int]:
        """``_plan``'s choice among ``rows``: (the rows planned, how many refreshes it puts off)."""
        stepping = [r for r in rows if r.step > 0]
        refresh = sorted((r for r in rows if r.step == 0), key=lambda r: (r.previous is None, r.slot))
        budget = self.max_step_tokens - sum(hi - lo for lo, hi in map(self._fed, stepping))
        plan = list(stepping)
        for r in refresh:
            lo, hi = self._fed(r)
            if hi - lo <= budget or (not plan and r is refresh[0]):
                plan.append(r)
                budget -= hi - lo
        return plan, len(rows) - len(plan)

    def _fed(self, row: _Row) -> tuple[int, int]:
        """The positions this row's next forward feeds (``generate``'s ranges; Dream one more to the left)."""
        spec = row.request.spec
        if row.step == 0:
            lo, hi = refresh_range(spec.cache, spec.refresh, row.previous, row.end, row.T)
        else:
            lo, hi = feed_range(spec.cache, row.start, row.end, row.T)
        if self.adapter.shift and lo > 0:
            lo -= self.adapter.shift
        return lo, hi

    def _run(self, plan: list[_Row], ahead: _Launched | None) -> list[list[int]]:
        """The planned rows' iteration (``ahead``: already launched), the next one launched ahead where it can
        be, then this one's blocks read back."""
        launched = ahead if ahead is not None else self._launch(plan)
        self._ahead = self._launch_ahead(launched)
        return self._read(launched)

    def _launch(self, plan: list[_Row], ahead: bool = False) -> _Launched | None:
        """The packed forward, confidence and decisions of the planned rows, launched (on CUDA their blocks'
        copy to the host too). ``ahead``: only onto a graph already captured in this thread (else None)."""
        device = self.device
        # rows grouped by policy (one decide per group), so each group's logits are contiguous
        groups: dict[tuple, list[_Row]] = {}
        for row in plan:
            s = row.request.spec
            key = (s.block_length, s.strategy, s.threshold, s.eotp, s.mask_id, s.eos_id, id(s.filter), s.persist,
                   s.edit)
            groups.setdefault(key, []).append(row)
        order = [row for rows in groups.values() for row in rows]
        sampled = any(r.request.spec.temperature > 0 for r in order)
        graphable = len(groups) == 1 and not sampled and self.lockstep is None
        graph = self.graphs and graphable
        parts, meta, fed = self._pack(order, [len(g) for g in groups.values()],
                                      pad=graphable and (self.graphs or self.pad_buckets))
        meta = dict(meta, head_rows=self._head_rows(order, meta) if graphable else 0)
        thread = threading.get_ident()
        if graph:
            key = (tuple(len(x) for x in parts), meta["width"], meta["tile_m"], meta["head_rows"],
                   next(iter(groups)))
            g = self._graphed.get(key)
            if ahead and (g is None or g.graph is None):
                return None
        flat = np.concatenate(parts)
        host = torch.from_numpy(flat)
        cuda = device.type == "cuda"
        if cuda:  # through a pinned buffer (the other one may feed the iteration still running)
            self._parity ^= 1
            host = self._pinned(self._staging, flat.size, 1 << 16)
            host.numpy()[:] = flat
        replayed = False
        if not graph:
            dev = host.to(device, non_blocking=True)
            blocks = self._body(dev, meta, order, groups)
        elif g is None or (g.graph is None and thread not in g.warm):
            # first use in this thread: eager (compiles, creates the thread's cuBLAS handle, which a capture
            # must not: the engine may have run this shape in another thread, as generate() does when called
            # from several), keeping its input buffer
            if g is None:
                g = self._graphed[key] = _EngineGraph(host.to(device, non_blocking=True),
                                                      order[0].request.spec.filter)
            else:
                g.dev.copy_(host, non_blocking=True)
            g.warm.add(thread)
            blocks = self._body(g.dev, meta, order, groups)
        else:
            g.dev.copy_(host, non_blocking=True)
            if g.graph is None:
                g.graph = torch.cuda.CUDAGraph()
                # thread-local: engines on other GPUs (data parallel) keep working while this one captures
                if self._capture_stream is None:  # (torch's default capture stream is on the first GPU used)
                    self._capture_stream = torch.cuda.Stream(device=device)
                with torch.cuda.graph(g.graph, pool=self._pool, stream=self._capture_stream,
                                      capture_error_mode="thread_local"):
                    g.out = self._body(g.dev, meta, order, groups)
            if g.held is not None:  # the filter's weights as it holds them now (the graph reads their copy)
                g.held.weights(device)
            g.graph.replay()
            replayed = True
            blocks = g.out
        launched = _Launched(list(plan), order, blocks[: len(order)], fed, replayed, meta["head_rows"],
                             meta["head_rows"] or meta["sizes"][2])
        if cuda:  # the blocks to pinned memory now: a graph's output is overwritten by its next replay
            launched.host = self._pinned(self._readback, launched.blocks.numel(), 1 << 12).view(launched.blocks.shape)
            launched.host.copy_(launched.blocks, non_blocking=True)
            launched.event = torch.cuda.Event()
            launched.event.record()
        return launched

    @staticmethod
    def _head_rows(order: list[_Row], meta: dict) -> int:
        """The rows the LM head runs over (0: every block position, as without): the blocks' masks as the host
        last read them back (a bound: an iteration launched ahead finds no more), a new block's width, rounded
        up to an eighth of the block positions (each a graph of its own). Not with token editing, which reads
        every position's guess."""
        positions = meta["rows"] * meta["width"]
        if not HEAD_ROWS or positions < HEAD_ROWS_MIN or meta["sizes"][2] != positions \
                or any(r.request.spec.edit is not None for r in order):
            return 0  # (the logits' positions are the rows' blocks, each as wide as the group's blocks)
        bound = sum(r.left if r.step > 0 and r.left is not None else r.end - r.block for r in order)
        grain = max(16, positions // 8)
        rows = max(grain, -(-bound // grain) * grain)
        return rows if rows < positions else 0

    def _pinned(self, buffers: list, n: int, least: int) -> torch.Tensor:
        """The first ``n`` int64 of this launch's pinned buffer of ``buffers`` (one of two, by parity), grown as
        needed."""
        buf = buffers[self._parity]
        if buf is None or buf.numel() < n:
            buf = buffers[self._parity] = torch.empty(max(n, least), dtype=torch.int64, pin_memory=True)
        return buf[:n]

    def _read(self, launched: _Launched) -> list[list[int]]:
        """A launched iteration's blocks, read back (the iteration's one wait for the device), in plan order;
        the iteration counts from here."""
        if launched.event is not None:
            launched.event.synchronize()
            blocks = launched.host.tolist()
        else:
            blocks = launched.blocks.tolist()
        if launched.head_rows and blocks and blocks[0][-1] >= _OVER:
            raise RuntimeError(f"the iteration's masked positions outnumbered the head's {launched.head_rows} rows "
                               "(the host's bound was wrong); unset L2PD_HEAD_ROWS to compute every position's "
                               "logits")
        by_row = {id(r): (b, f) for r, b, f in zip(launched.order, blocks, launched.fed)}
        c = self.counters
        for r in launched.plan:
            n, stepping = by_row[id(r)][1]
            c["fed_tokens"] += n
            c["step_tokens" if stepping else "refresh_tokens"] += n
        c["forwards"] += len(launched.plan)
        c["logit_rows"] += launched.logit_rows
        c["graphed"] += launched.graphed
        return [by_row[id(r)][0] for r in launched.plan]

    # ---- run-ahead: the next iteration launched before this one is read back ---------------------------

    def _launch_ahead(self, launched: _Launched) -> _Launched | None:
        """Launch the next iteration now, supposing where each row of this one will stand (``_next_state``):
        it then runs while the host reads this one back, advances the rows and packs (the device would
        otherwise wait for that). It counts only for the rows found where it supposed
        (``_ahead_if_valid``); for the others it was a forward for nothing, harmless: a block without masks
        decides nothing and its K/V are rewritten by the next refresh; a finished row's slot is reset when
        it is next given. Only when no row waits for a refresh or a slot and the rows decode greedily without
        editing; with ``run_ahead='auto'`` only when each row's next state is sure; ``'always'`` (tests)
        supposes a row goes on in its block where it is not."""
        rows = launched.plan
        if self.run_ahead == "off" or self.lockstep is not None or len(rows) != len(self.rows):
            return None
        if self.waiting and len(self.rows) < self.max_batch:
            return None
        nexts = []
        for r in rows:
            spec = r.request.spec
            if spec.edit is not None or spec.temperature > 0:
                return None
            state = self._next_state(r)
            if state is None and self.run_ahead == "auto":
                return None
            nexts.append(state or (r.block, r.step + 1, r.previous))
        saved = [(r.block, r.step, r.previous, r.schedule) for r in rows]
        try:
            for r, (block, step, previous) in zip(rows, nexts):
                r.block, r.step, r.previous = block, step, previous
            plan, deferred = self._budgeted(rows)
            nxt = None if deferred else self._launch(plan, ahead=True)
            expect = [(r, r.block, r.step, r.previous) for r in plan]
        finally:
            for r, (block, step, previous, schedule) in zip(rows, saved):
                r.block, r.step, r.previous, r.schedule = block, step, previous, schedule
        if nxt is not None:
            nxt.expect = expect
            self.counters["ahead"] += len(rows)
        return nxt

    @staticmethod
    def _next_state(row: _Row) -> tuple[int, int, int | None] | None:
        """Where the row surely stands after the forward in flight, as (block, step, previous), or None where
        that is not sure. Sure only where the schedule's top-k alone decides (tau >= 1: no score passes it):
        that forward fills exactly min(k, masks left), so the block goes on, or ends and the next block's
        refresh follows. (Where a threshold decides, how many pass is not foreseeable: on the bundled models'
        decodes, guesses from the masks left and the most one forward had decided came true about as often
        as not, and a wrong one costs a whole forward.) EoTP, an end of text or a stop may still end a row
        early: once per answer."""
        spec = row.request.spec
        if spec.threshold < 1.0:
            return None
        width = row.end - row.block
        left = row.left if row.step > 0 and row.left is not None else width  # (a new block: at most its width)
        if row.step + 1 < width and left > _top_k(row, row.step):
            return row.block, row.step + 1, row.previous
        if left > _top_k(row, row.step) or row.end >= row.T or row.given is not None:
            return None  # (masks may be fewer than the width; the row's last block; blocks an answer fills)
        return row.end, 0, row.start

    def _ahead_if_valid(self) -> _Launched | None:
        """The iteration launched ahead, for its rows still active where it supposed (the others left their
        block or finished: their part of it decided nothing, and they wait for the next iteration); None,
        the iteration waited for and dropped, if no row is."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        keep = [r for r, b, s, p in ahead.expect
                if self.rows.get(r.slot) is r and (r.block, r.step, r.previous) == (b, s, p)]
        if not keep:
            self._ahead = ahead
            self._drop_ahead()
            return None
        self.counters["ahead_wasted"] += len(ahead.expect) - len(keep)
        ahead.plan = keep
        return ahead

    def _drop_ahead(self, failed: bool = False) -> None:
        """Wait for an iteration launched ahead that will not count (its rows all finished or left; a failure):
        its pinned buffers are free again once it is done."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self.counters["ahead_wasted"] += len(ahead.expect)
            try:
                if ahead.event is not None:
                    ahead.event.synchronize()
            except Exception:
                if not failed:
                    raise

    def _pack(self, order: list[_Row], group_sizes: list[int], pad: bool) -> tuple[list[np.ndarray], dict, tuple]:
        """The iteration's indices, built vectorised on the host: token rows and slots, logit rows, segments,
        decide words, canvas rows, read-back columns, attention tiles. With ``pad`` the token, row and tile
        counts are rounded up to buckets (a captured graph per bucket): padding rows decide on the pool's
        spare row and padding tokens write there, so nothing real is touched."""
        shift, spare = self.adapter.shift, self.max_batch
        ranges = [self._fed(r) for r in order]
        tokens = [hi - lo for lo, hi in ranges]
        n = sum(tokens)
        fed = [(t, r.step > 0) for t, r in zip(tokens, order)]  # (counted once read back)
        words = np.array([self._word(r) for r in order], dtype=np.int64).reshape(-1, 2)
        # the rows' steps inside their blocks change only the decide words: the rest is the last iteration's
        key = (pad, tuple(group_sizes), tuple(ranges),
               tuple((r.slot, r.T, r.block, r.end, r.request.spec.block_length) for r in order))
        if self._packed is not None and self._packed[0] == key:
            parts, meta = list(self._packed[1]), self._packed[2]
            padding = np.zeros((meta["rows"] - len(order), 2), dtype=np.int64)
            parts[4] = np.concatenate([words, padding]).reshape(-1)
            return parts, meta, fed
        # one row per deciding row (lo, tokens, pool row, keys, block start, end, block length), padding rows
        # (no tokens, block 0 of the spare row) included; then, with ``pad``, a segment of padding tokens
        table = [(lo_, hi - lo_, r.slot, r.T, r.block, r.end, r.request.spec.block_length)
                 for (lo_, hi), r in zip(ranges, order)]
        width = max(t[6] for t in table)
        extra = _bucket(len(order)) - len(order) if pad else 0
        table += [(0, 0, spare, 1, 0, 1, width)] * extra
        rows = np.array(table, dtype=np.int64)
        s, e, L = rows[:, 4], rows[:, 5], rows[:, 6]
        if pad:
            # (the padding tokens cycle through the spare row's slots: a pool narrower than the padding, as
            # ``generate``'s is, still holds them)
            n_pad = _bucket_tokens(n) - n
            rows = np.concatenate([rows[:, :4], [[0, n_pad, spare, max(1, min(n_pad, self.canvas.shape[1]))]]])
            words = np.concatenate([words, np.zeros((extra, 2), dtype=np.int64)])
        lo, lens, slot, T = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        start = np.cumsum(lens) - lens
        rows_n = len(s)  # rows that decide (padding rows included)
        tok_rows = np.repeat(slot, lens)
        tok_slots = np.arange(int(lens.sum())) - np.repeat(start - lo, lens)
        if pad:
            tok_slots[n:] %= self.canvas.shape[1]
        # the block's logits: position p from hidden state p - shift; past the answer (a short last block)
        # repeat the last, whose decision the canvas (end of text there) ignores
        offs = np.arange(int(L.sum())) - np.repeat(np.cumsum(L) - L, L)
        p = np.minimum(np.repeat(s, L) + offs, np.repeat(e - 1, L))
        lidx = np.repeat((start - lo)[:rows_n] - shift, L) + p
        np.minimum(np.maximum(lidx, 0, out=lidx), int(lens.sum()) - 1, out=lidx)
        seg = self._segments(order, lo, start, lens, slot, T)
        pad_seg = len(seg) - 1  # (with ``pad``: the segment of the padding tokens)
        cols = (s[:, None] + np.arange(width)[None, :]).reshape(-1)  # the blocks read back after the decision
        # the attention's query tile, from the bucketed counts alone (as the key split's plan below)
        tm = pool_tile_m(*self.heads, _bucket_tokens(n) // POOL_TILE_M + _bucket(len(order)), self.device)
        ntiles = -(-seg[:, 1] // tm)
        tiles = np.empty((int(ntiles.sum()), 2), dtype=np.int64)
        tiles[:, 0] = np.repeat(np.arange(len(seg)), ntiles)
        tiles[:, 1] = (np.arange(len(tiles)) - np.repeat(np.cumsum(ntiles) - ntiles, ntiles)) * tm
        if pad:
            # segments and tiles padded to bounds that follow from the token and row buckets alone, so the
            # graph's shape does too: a row's fed range spans at most its tokens / L + 2 attention blocks
            # (block-causal), and each segment at most tokens / tile_m + 1 tiles
            n_tok = int(lens.sum())
            L_min = int(L.min()) if self.adapter.block_causal else 0
            seg_cap = len(seg) if not L_min else 2 * rows_n + 1 + n_tok // L_min
            seg = np.concatenate([seg, _repeated([n_tok, 0, spare, 1], seg_cap - len(seg))])  # empty ones
            # idle programs on the padding segment (their queries are past its length: nothing stored)
            tiles = np.concatenate([tiles, _repeated([pad_seg, 1 << 30], seg_cap + n_tok // tm - len(tiles))])
        parts = [tok_rows, tok_slots, lidx, seg.reshape(-1), words.reshape(-1), slot[:rows_n], cols,
                 tiles.reshape(-1)]
        # the attention's key split is planned from bucketed counts, the same with and without ``pad``: a graphed
        # iteration then attends as its eager form does (the split changes the sums' order)
        plan_tiles = _bucket_tokens(n) // tm + _bucket(len(order))
        meta = {"sizes": [len(x) for x in parts], "width": width, "rows": rows_n, "groups": group_sizes,
                "plan_tiles": plan_tiles, "tile_m": tm}
        self._packed = (key, parts, meta)
        return parts, meta, fed

    @staticmethod
    def _word(row: _Row) -> tuple[int, int]:
        """A row's decide word (its block width, block start and this forward's k) and step index."""
        spec = row.request.spec
        width = row.end - row.block
        if row.step == 0:  # block-causal: a whole block's schedule, also for the first (generate's rule)
            row.schedule = block_schedule(spec.block_length if row.causal else width, spec.steps_per_block)
        return (width << 40) | (row.block << 20) | _top_k(row, row.step), row.step

    def _segments(self, order: list[_Row], lo: np.ndarray, start: np.ndarray, lens: np.ndarray, slot: np.ndarray,
                  T: np.ndarray) -> np.ndarray:
        """The attention segments [G, 4] (first token, tokens, pool row, keys): a row's fed tokens attend to keys
        [0, T) of its own pool row; a block-causal row's are cut at its attention blocks, each part attending
        to the keys up to the end of its block (what the model's block-causal mask allows)."""
        seg = np.empty((len(start), 4), dtype=np.int64)
        seg[:, 0], seg[:, 1], seg[:, 2], seg[:, 3] = start, lens, slot, T
        if not self.adapter.block_causal:
            return seg
        out = []
        for i, (q0, n, r, t) in enumerate(seg.tolist()):
            if i >= len(order):  # padding: one segment as it is
                out.append((q0, n, r, t))
                continue
            L = order[i].request.spec.block_length
            pos, end = int(lo[i]), int(lo[i]) + n
            while pos < end:
                cut = min((pos // L + 1) * L, end)
                out.append((q0 + pos - int(lo[i]), cut - pos, r, min((pos // L + 1) * L, t)))
                pos = cut
        return np.array(out, dtype=np.int64).reshape(-1, 4)

    def _body(self, dev: torch.Tensor, meta: dict, order: list[_Row], groups: dict) -> torch.Tensor:
        """Forward, confidence, decisions and the gather of the rows' blocks, all on the device (what a graph
        captures): the blocks [rows, width] after the decision."""
        device = self.device
        rows, slots, lidx, seg, params, slot_t, cols, tiles = torch.split(dev, meta["sizes"])
        pack = Pack(rows, slots, seg.view(-1, 4), tiles.view(-1, 2), plan_tiles=meta["plan_tiles"],
                    tile_m=meta["tile_m"])
        ids = self.canvas[rows, slots].view(1, -1)
        mask_id = order[0].request.spec.mask_id
        head = meta["head_rows"]
        if head:  # the head over the masked positions only (their compact list, ``sel``)
            masked, sel, count = self._masked_positions(slot_t, cols, params, meta, mask_id)
            lidx = lidx[sel]
        logits = self.adapter.forward(ids, None, cache=self.kv, position_ids=slots.view(1, -1),
                                      logits_index=lidx, pack=pack, fused=self.fused)
        ls = self.lockstep
        needs_stats = any((r.request.spec.filter is not None and r.request.spec.filter.needs_stats)
                          or r.request.spec.rule == "margin" for r in order) or (ls is not None and ls.stats)
        out = self.confidence(logits, 0.0, None, suppress=mask_id, stats=True) if needs_stats else \
            self.confidence(logits, 0.0, None, suppress=mask_id)
        out = [o[0] for o in out]
        if head:  # back to every block position (zeros at the others: a decision reads only masked ones)
            out = self._spread(out, masked, sel, count)
        token, prob = out[0], out[1]
        margin, entropy = (out[2], out[3]) if needs_stats else (None, None)
        self._sample(order, logits, token, prob)
        if ls is not None and ls.on_step is not None:  # lockstep: one group of the batch's rows, no padding
            L = order[0].request.spec.block_length
            ls.call(order, self.canvas, token.view(-1, L), prob.view(-1, L),
                    None if margin is None else margin.view(-1, L),
                    None if entropy is None else entropy.view(-1, L), mask_id)
        params = params.view(-1, 2)
        sizes = list(meta["groups"])
        sizes[-1] += meta["rows"] - len(order)  # padding rows join the (single) group
        off = r0 = 0
        for rows_g, g in zip(groups.values(), sizes):
            spec = rows_g[0].request.spec
            L = spec.block_length
            part = slice(off, off + g * L)
            kw = dict(threshold=spec.threshold, mask_id=spec.mask_id, eos_id=spec.eos_id, eotp=spec.eotp)
            stats = {}
            if spec.rule != "confidence":
                kw.update(rule=spec.rule, persist=spec.persist, history=self.guesses)
                if spec.rule == "margin":
                    stats = dict(margin=margin[part].view(g, L))
            if spec.filter is not None:
                f = spec.filter
                kw.update(filter_weights=f.weights(device), filter_block=L, filter_inputs=tuple(f.inputs),
                          filter_kind=f.kind)
                if f.needs_history:
                    kw["history"] = self.guesses
                if f.needs_stats:
                    stats = dict(margin=margin[part].view(g, L), entropy=entropy[part].view(g, L))
            if spec.strategy == "oracle":  # lockstep only: the target's decision instead of the rule's
                W = rows_g[0].end - rows_g[0].block
                ls.oracle(self.canvas, rows_g, slot_t[r0 : r0 + g], cols.view(-1, meta["width"])[r0 : r0 + g, :W],
                          token[part].view(g, L)[:, :W], spec.mask_id)
                off += g * L
                r0 += g
                continue
            if spec.edit is not None:  # LLaDA 2.1: rewrite decided positions first, then fill masks
                # (each row's block width: bits 40-59 of its word; padding rows have width 0)
                edit_tokens(self.canvas, token[part].view(g, L), prob[part].view(g, L),
                            cols.view(-1, meta["width"])[r0 : r0 + g, :L], spec.edit, spec.mask_id,
                            rows=slot_t[r0 : r0 + g], width=(params[r0 : r0 + g, 0] >> 40) & 0xFFFFF)
            self.decide(self.canvas, token[part].view(g, L), prob[part].view(g, L), block_start=0, k=0,
                        params=params[r0 : r0 + g], rows=slot_t[r0 : r0 + g], **stats, **kw)
            off += g * L
            r0 += g
        cols = cols.view(-1, meta["width"])
        blocks = self.canvas[slot_t[:, None], cols]
        # and per row the masks left past its block (a whole-canvas row is done when none are left)
        ends = cols[:, :1] + ((params[:, :1] >> 40) & 0xFFFFF)
        rest = ((self.canvas[slot_t] == mask_id) & (self._columns[None] >= ends)).sum(-1, keepdim=True)
        if head:  # (a bound the host got wrong: flagged in every row's count, raised when read back)
            rest = rest + (count > head).long() * _OVER
        return torch.cat([blocks, rest], 1)

    def _masked_positions(self, slot_t: torch.Tensor, cols: torch.Tensor, params: torch.Tensor, meta: dict,
                          mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block positions still masked (bool [rows x width], in the logits' order: one group, each row's
        block as wide as the group's block length; padding rows and positions past a row's width never), the
        first ``meta['head_rows']`` of them as indices into that order (past their count: position 0) and
        their count."""
        W, U = meta["width"], meta["head_rows"]
        width = (params.view(-1, 2)[:, 0] >> 40) & 0xFFFFF
        blocks = self.canvas[slot_t[:, None], cols.view(-1, W)]
        masked = ((blocks == mask_id) & (self._columns[None, :W] < width[:, None])).view(-1)
        n = masked.numel()
        # each masked position's place in the list (the others, and any past U, to a slot dropped after)
        place = torch.where(masked, masked.cumsum(0) - 1, U).clamp_(max=U)
        sel = torch.zeros(U + 1, dtype=torch.int64, device=masked.device)
        sel.scatter_(0, place, torch.arange(n, device=masked.device))
        return masked, sel[:U], masked.sum()

    def _spread(self, out: list[torch.Tensor], masked: torch.Tensor, sel: torch.Tensor, count: torch.Tensor
                ) -> list[torch.Tensor]:
        """``confidence``'s results over the head's rows put back at their block positions; the other positions
        get 0 (a decision reads them only where masked)."""
        U, n = sel.numel(), masked.numel()
        to = torch.where(torch.arange(U, device=sel.device) < count, sel, n)  # (past the count: dropped)
        spread = []
        for o in out:
            full = torch.zeros(n + 1, dtype=o.dtype, device=o.device)
            spread.append(full.scatter_(0, to, o)[:n])
        return spread

    def _sample(self, order: list[_Row], logits: torch.Tensor, token: torch.Tensor, prob: torch.Tensor) -> None:
        """Rows that sample redo their confidence alone, with ``generate``'s per-forward seed (batch 1)."""
        off = 0
        for row in order:
            spec = row.request.spec
            L = spec.block_length
            if spec.temperature > 0:
                valid = row.end - row.block
                seed = (spec.seed * 1000003 + row.request.forwards) & 0x7FFFFFFF
                t, p = self.confidence(logits[:, off : off + valid], spec.temperature, seed, suppress=spec.mask_id)
                token[off : off + valid], prob[off : off + valid] = t[0], p[0]
            off += L

    def _advance(self, row: _Row, block: list[int]) -> None:
        req, spec = row.request, row.request.spec
        req.forwards += 1
        width = row.end - row.block
        fixed, rest = block[:width], block[-1]
        row.step += 1
        row.left = fixed.count(spec.mask_id)
        # tokens final: the answer's prefix without a mask (every block before this one is complete)
        done_here = spec.mask_id not in fixed
        upto = width if done_here else fixed.index(spec.mask_id)
        if spec.edit is not None:  # decided tokens may still change until the block ends (generate's rule)
            done_here = self._edit_done(row, fixed, done_here)
            upto = width if done_here else row.final - (row.block - row.P)
        reason, emit = self._take(row, fixed[row.final - (row.block - row.P) : upto])  # (earlier blocks complete)
        if reason is None and done_here:
            if req.whole and rest == 0:  # nothing left to decode (EoTP filled the rest)
                reason = "stop" if row.ended else "length"
            elif self.lockstep is not None:  # the next block once the batch's block is done
                row.waiting = True
            else:
                reason, emit = self._next_block(row, emit)
        self._deliver(row, reason, emit)

    def _take(self, row: _Row, new: list[int]) -> tuple[str | None, list[int]]:
        """Final answer tokens ``new`` onto the request, up to its first end of text, extra end id or stop
        string, and within its token budget: (the finish reason or None, the tokens taken)."""
        req, spec = row.request, row.request.spec
        new = new[: spec.max_new_tokens - row.final]  # a block-causal last block runs past the answer
        if req.whole:
            return self._take_whole(row, new)
        reason = None
        emit: list[int] = []
        extra_ends = set(spec.stops.extra.tolist()) if spec.stops.extra.numel() else ()
        for tok in new:
            row.final += 1
            if tok == spec.eos_id:
                reason = "stop"
                break
            emit.append(tok)
            if tok in extra_ends:
                reason = "stop"
                break
        if emit and req.stop:  # the first stop string in the text ends the answer at the token completing it
            text = self.tokenizer.decode(req.tokens + emit)
            hits = [(text.find(s), s) for s in req.stop if s in text]
            if hits:
                req.stop_hit = min(hits)[1]
                reason = "stop"
                for k in range(1, len(emit) + 1):
                    if any(s in self.tokenizer.decode(req.tokens + emit[:k]) for s in req.stop):
                        emit = emit[:k]
                        break
        self._keep(req, emit)
        if reason is None and row.final >= spec.max_new_tokens:
            reason = "length"
        return reason, emit

    def _keep(self, req: Request, emit: list[int]) -> None:
        """Answer tokens ``emit`` onto the request (and the first token's time)."""
        if emit:
            req.tokens.extend(emit)
            self.counters["tokens_out"] += len(emit)
            if req.first_token is None:
                req.first_token = time.monotonic()

    def _take_whole(self, row: _Row, new: list[int]) -> tuple[str | None, list[int]]:
        """``_take`` for a whole-canvas row: every final token goes to ``answer``; the row is cut at the first
        stop of ``spec.stops`` in it (``generate``'s cut: the stop stays, end of text follows) and sends the
        tokens before its first end of text."""
        req, spec = row.request, row.request.spec
        row.final += len(new)
        req.answer.extend(new)
        reason = None
        if spec.stops.active:
            cut = spec.stops.cut_index(req.answer)
            if cut >= 0:
                req.cut, reason = cut + 1, "stop"
                del req.answer[cut + 1 :]
        emit: list[int] = []
        if not row.ended:
            for tok in req.answer[len(req.tokens) :]:
                if tok == spec.eos_id:
                    row.ended = True
                    break
                emit.append(tok)
        self._keep(req, emit)
        return reason, emit

    def _next_block(self, row: _Row, emit: list[int], decoded: bool = True) -> tuple[str | None, list[int]]:
        """Move a row whose block is done (``decoded``: by its forwards) to its next block (its first forward:
        a refresh). Blocks a partial answer (``answer=``) fills entirely are skipped, their tokens taken, as
        ``generate`` skips them (the last block decoded stays where the next refresh starts)."""
        if decoded:
            row.previous = row.start
        while True:
            if row.end >= row.T:
                return "length", emit
            row.block, row.step, row.post, row.seen, row.left = row.end, 0, 0, None, None
            given = row.given[row.block - row.P : row.end - row.P] if row.given is not None else None
            if given is None or row.request.spec.mask_id in given:
                return None, emit
            reason, more = self._take(row, given)
            emit = emit + more
            if reason is not None:
                return reason, emit

    def _skip_given(self, row: _Row) -> None:
        """A row whose first block the partial answer fills: take it and the filled blocks after it."""
        reason, emit = self._take(row, row.given[: row.end - row.P])
        if reason is None:
            reason, emit = self._next_block(row, emit, decoded=False)
        self._deliver(row, reason, emit)

    def _deliver(self, row: _Row, reason: str | None, emit: list[int]) -> None:
        """The tokens taken this iteration to the request's callback, once: as an event while it runs, or with
        its end."""
        req = row.request
        if reason is not None:
            self._retire(row, reason, last=emit)
        elif emit and req.on_event is not None:
            req.on_event(req, emit)

    @staticmethod
    def _edit_done(row: _Row, fixed: list[int], no_masks: bool) -> bool:
        """Whether an editing row's block ends after this forward: once it has no masks, when the forward
        rewrote no decided position or after ``edit_steps`` more forwards (``generate``'s ``_block_done``).
        Rewrites are read from the block itself: the decision only fills masks, editing only changes the
        rest."""
        spec = row.request.spec
        seen, row.seen = row.seen, fixed
        if not no_masks:
            return False
        changed = seen is not None and any(a != spec.mask_id and a != b for a, b in zip(seen, fixed))
        if not changed or row.post >= spec.edit_steps:
            return True
        row.post += 1
        return False

    def _retire(self, row: _Row, reason: str, error: str | None = None, last: list[int] | None = None) -> None:
        self.rows.pop(row.slot, None)
        self._finish(row.request, reason, error, last or [])

    def _finish(self, req: Request, reason: str, error: str | None = None, last: list[int] | None = None) -> None:
        req.finish_reason, req.error, req.finished = reason, error, time.monotonic()
        key = {"cancelled": "cancelled", "timeout": "timed_out", "error": "failed"}.get(reason, "finished")
        self.counters[key] += 1
        if req.on_event is not None:
            try:
                req.on_event(req, last or [])
            except Exception:  # the request is over either way
                pass
        req.done.set()

    def _fail_all(self, exc: Exception) -> None:
        for row in list(self.rows.values()):
            self._retire(row, "error", error=f"{type(exc).__name__}: {exc}")
