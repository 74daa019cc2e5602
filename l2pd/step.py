"""One decoding step, eager or replayed from a CUDA graph: forward, confidence, decision, loop-control count.

``Stepper`` owns the static buffers of a decode (canvas, attention mask, positions, KV cache: a
``DecodeState``) and runs one step: the forward over the fed positions [fed_start, fed_start + fed_len)
with the LM head over the block [block_start, block_start + block_len), ``confidence`` over the block's
logits, the strategy's decision written into the canvas, and the masks left per row. Where the fed window
starts, where the block starts and the step's top-k are one int64 word in device memory, so one captured
graph per (fed_len, block_len) serves every block of a decode, and every later decode with the same shapes
and policy (the model keeps its steppers; see ``stepper_for``).

Graphs apply to greedy decoding with the Triton kernels on CUDA, without a per-step callback, up to
``GRAPH_MAX_TOKENS`` fed tokens (past that the step is compute-bound and launches are cheap by comparison).
A step's first call runs eagerly (Triton compiles, cuBLAS picks its kernels), the second captures and
replays; graphed and eager steps run the same kernels on the same buffers, so greedy tokens are identical.
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .cache import BlockKVCache
from .models.decoder import positions_from_mask

GRAPH_MAX_TOKENS = int(os.environ.get("L2PD_GRAPH_MAX_TOKENS", "8192"))  # batch * fed positions
MAX_STEPPERS = 1  # per model: the graphs of the last shapes used stay captured (a KV cache can be GBs)


@dataclass
class Policy:
    """What a step decides with; everything here is baked into a captured graph."""

    strategy: str  # steps | threshold | margin | persistence | learn2pd | oracle
    mask_id: int
    decide_kwargs: dict[str, Any]  # threshold, mask_id, eos_id, eotp, filter_weights, filter_block
    temperature: float = 0.0
    target: torch.Tensor | None = None  # the reference answer in canvas columns [B, T] (oracle; collect's labels)
    on_step: Callable | None = None  # (block_start, step, token, prob, canvas), before the decision
    on_step_target: bool = False  # on_step also gets target= (it takes it, and a target is given)
    filter: Any = None  # held so that a stepper keyed by id(filter) never outlives it
    stats: bool = False  # compute margins and entropies (a richer filter reads them; on_step gets them)
    step_input: bool = False  # the filter reads the step index in the block (params' second word)
    edit: float | None = None  # token editing's tau (LLaDA 2.1), None = off

    def graphable(self) -> bool:
        return self.strategy != "oracle" and self.temperature == 0 and self.on_step is None


@dataclass
class DecodeState:
    """The static buffers of one decode: canvas [B, T] (int64), key mask [B, T] or None, positions [B, T],
    and for the persistence rule and a history filter each position's previous guess (int64), run length
    (int32) and previous confidence (float32) [B, T]."""

    canvas: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor
    kv: BlockKVCache | None
    prompt_length: int
    history: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def allocate(cls, adapter: Any, batch: int, prompt_length: int, total: int, padded: bool, cache: str,
                 refresh: str, dtype: torch.dtype, device: torch.device, history: bool = False) -> "DecodeState":
        canvas = torch.zeros(batch, total, dtype=torch.int64, device=device)
        mask = torch.ones(batch, total, dtype=torch.int64, device=device) if padded else None
        positions = torch.arange(total, device=device).repeat(batch, 1)
        dec = adapter.decoder
        kv = None if cache == "none" else BlockKVCache(len(dec.layers), batch, dec.n_kv, total, dec.head_dim, cache,
                                                       dtype, device, refresh)
        hist = None
        if history:
            hist = (torch.full((batch, total), -1, dtype=torch.int64, device=device),
                    torch.zeros(batch, total, dtype=torch.int32, device=device),
                    torch.zeros(batch, total, dtype=torch.float32, device=device))
        return cls(canvas, mask, positions, kv, prompt_length, hist)

    def narrow(self, n: int) -> "DecodeState":
        """The first ``n`` rows, as views of these buffers."""
        return DecodeState(self.canvas[:n], None if self.mask is None else self.mask[:n], self.positions[:n],
                           None if self.kv is None else self.kv.narrow(n), self.prompt_length,
                           None if self.history is None else tuple(h[:n] for h in self.history))

    def reorder(self, perm: torch.Tensor, keep: int) -> None:
        """Rows ``[:len(perm)]`` become rows ``perm`` (canvas, mask, positions); K/V only for the first
        ``keep`` of them (the rows that go on decoding)."""
        n = perm.shape[0]
        for t in (self.canvas, self.mask, self.positions, *(self.history or ())):
            if t is not None:
                t[:n] = t[:n].index_select(0, perm)
        if self.kv is not None:
            self.kv.reorder(perm[:keep])

    def load(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask_id: int) -> None:
        """A new decode: the prompt, then masks; positions that skip the left padding."""
        P = self.prompt_length
        self.canvas[:, :P].copy_(input_ids)
        self.canvas[:, P:].fill_(mask_id)
        if self.history is not None:  # no guess seen yet
            self.history[0].fill_(-1)
            self.history[1].zero_()
            self.history[2].zero_()
        if self.mask is not None:
            self.mask[:, :P].copy_(attention_mask)
            self.positions.copy_(positions_from_mask(self.mask))


class Stepper:
    """Runs steps on one ``DecodeState`` under one ``Policy``; ``graphs`` enables CUDA-graph replay."""

    def __init__(self, adapter: Any, state: DecodeState, policy: Policy, confidence: Any,
                 decide: Any, kernels: bool, graphs: bool, fused: bool | None = None) -> None:
        self.adapter, self.state, self.policy = adapter, state, policy
        self.shift = adapter.shift  # Dream: the block's logits come from the hidden states one to the left
        self.confidence, self.decide, self.kernels, self.fused = confidence, decide, kernels, fused
        self._graphs_flag = graphs
        self.children: dict[int, Stepper] = {}
        device = state.canvas.device
        self.graphs_enabled = graphs and kernels and device.type == "cuda" and policy.graphable()
        # fed_start << 40 | block_start << 20 | k: the decide kernel reads the low 40 bits; the second word is
        # the step index in the block, written only for a filter that reads it
        self.params = torch.zeros(2, dtype=torch.int64, device=device)
        self.edits = torch.zeros(state.canvas.shape[0], dtype=torch.int64, device=device)  # rewritten per row
        self.arange = torch.arange(state.canvas.shape[1], device=device)
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def narrow(self, n: int) -> "Stepper":
        """A stepper over the first ``n`` rows of this one's buffers (kept, with its own graphs): what the
        decode loop runs once finished rows are compacted out."""
        if n == self.state.canvas.shape[0]:
            return self
        child = self.children.get(n)
        if child is None:
            child = self.children[n] = Stepper(self.adapter, self.state.narrow(n), self.policy,
                                               self.confidence, self.decide, self.kernels, self._graphs_flag,
                                               self.fused)
        return child

    def graphable(self, fed_len: int) -> bool:
        return self.graphs_enabled and self.state.canvas.shape[0] * fed_len <= GRAPH_MAX_TOKENS

    def __call__(self, fed_start: int, fed_len: int, block_start: int, block_len: int, k: int,
                 step: int = 0, seed: int | None = None) -> tuple[torch.Tensor, bool]:
        """One step; returns (masks left in the block per row [B] on the device, whether it was replayed)."""
        T = self.state.canvas.shape[1]
        if not (0 <= fed_start <= block_start and block_start + block_len <= fed_start + fed_len <= T):
            raise ValueError(f"block {block_start}+{block_len} outside the fed window {fed_start}+{fed_len} "
                             f"of a canvas of {T}")
        if not 0 <= k < 2**20 or T >= 2**20:
            raise ValueError(f"k={k} or canvas length {T} outside the packed range (2**20)")
        if self.shift and fed_start > 0:  # feed the position before the window too: its hidden state is needed
            fed_start, fed_len = fed_start - self.shift, fed_len + self.shift
        if self.policy.step_input:
            self.params[0].fill_((fed_start << 40) | (block_start << 20) | k)
            self.params[1].fill_(step)
        else:
            self.params.fill_((fed_start << 40) | (block_start << 20) | k)
        if not self.graphable(fed_len):
            return self.body(fed_start, fed_len, block_start, block_len, k, step, seed), False
        g = self.graphs.get((fed_len, block_len))
        if g is None:  # first call: eager, which compiles and warms everything the capture will record
            self.graphs[(fed_len, block_len)] = _Graph()
            return self.body(fed_start, fed_len, block_start, block_len, k, step, seed), False
        if g.graph is None:
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph):
                g.left = self.body(fed_start, fed_len, block_start, block_len, k, step, seed)
        g.graph.replay()
        return g.left, True

    def body(self, fed_start: int, fed_len: int, block_start: int, block_len: int, k: int, step: int,
             seed: int | None) -> torch.Tensor:
        """The step itself. Positions come from ``params`` on the device (the ints serve checks, the
        reference ops and the oracle, none of which is graphed)."""
        st, pol = self.state, self.policy
        word = self.params[0]
        fed0 = word >> 40
        idx = fed0 + self.arange[:fed_len]
        first = ((word >> 20) & 0xFFFFF) - fed0  # the block's first logit row among the fed positions
        if self.shift:  # (no extra kernel for families without a shift)
            first = first - self.shift
        lidx = first + self.arange[:block_len]
        logits = self.adapter.forward(
            st.canvas.index_select(1, idx), st.mask, cache=st.kv,
            position_ids=st.positions.index_select(1, idx), slots=idx, logits_index=lidx, fused=self.fused,
        )
        margin = entropy = None
        if pol.stats:
            token, prob, margin, entropy = self.confidence(logits, pol.temperature, seed, suppress=pol.mask_id,
                                                           stats=True)
        else:
            token, prob = self.confidence(logits, pol.temperature, seed, suppress=pol.mask_id)
        # the reference answer in canvas columns (-1 outside the answer): see ``l2pd.decode.canvas_target``
        target = None if pol.target is None else pol.target[:, block_start : block_start + block_len]
        if pol.on_step is not None:
            extra = {"target": target} if pol.on_step_target else {}
            if pol.stats:
                extra.update(margin=margin, entropy=entropy)
            pol.on_step(block_start, step, token, prob, st.canvas, **extra)
        if pol.strategy == "oracle":
            return _oracle_step(st.canvas, token, target, block_start, pol.mask_id)
        if pol.edit is not None:  # before the decision: it rewrites decided positions, the decision fills masks
            from l2pd_kernels.reference import edit_tokens

            cols = ((word >> 20) & 0xFFFFF) + self.arange[:block_len]
            self.edits.copy_(edit_tokens(st.canvas, token, prob, cols, pol.edit, pol.mask_id))
        stats = dict(margin=margin, entropy=entropy, step=step) if pol.stats or pol.step_input else {}
        if st.history is not None:
            stats["history"] = st.history
        if self.kernels:
            _, left, _ = self.decide(st.canvas, token, prob, block_start=block_start, k=k, params=self.params,
                                     **stats, **pol.decide_kwargs)
        else:
            _, left, _ = self.decide(st.canvas, token, prob, block_start=block_start, k=k, **stats,
                                     **pol.decide_kwargs)
        return left


def takes_target(fn: Any) -> bool:
    """Whether a step callback takes ``target=`` (by name or ``**kwargs``): callbacks written before it existed
    keep working."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "target" or p.kind is p.VAR_KEYWORD for p in params)


@dataclass
class _Graph:
    graph: Any = None
    left: torch.Tensor | None = field(default=None, repr=False)


def _oracle_step(canvas: torch.Tensor, token: torch.Tensor, target: torch.Tensor, s: int, mask_id: int):
    """Learn2PD's replay: accept every masked position whose guess equals the answer; if none, fill the block.
    Positions past the answer (target -1: a block-causal model's last block) take their guess."""
    block = canvas[:, s : s + token.shape[1]]
    masked = block == mask_id
    want = torch.where(target < 0, token, target)
    accept = masked & (token == want)
    stuck = masked.any(-1) & ~accept.any(-1)
    accept |= masked & stuck[:, None]
    block.copy_(torch.where(accept, want, block))
    return (block == mask_id).sum(-1)


def stepper_for(model: Any, key: tuple, build: Callable[[], Stepper], keep: bool) -> Stepper:
    """The model's stepper for ``key`` (shapes and policy), built on first use; with ``keep`` the last
    ``MAX_STEPPERS`` stay on the model with their captured graphs (``release(model)`` drops them)."""
    if not keep:
        return build()
    steppers = vars(model).get("_l2pd_steppers")
    if steppers is None:
        steppers = OrderedDict()
        model._l2pd_steppers = steppers
    stepper = steppers.get(key)
    if stepper is None:
        while len(steppers) >= MAX_STEPPERS:
            steppers.popitem(last=False)
        stepper = steppers[key] = build()
    steppers.move_to_end(key)
    return stepper


def release(model: Any) -> None:
    """Drop the engine and steppers (buffers and captured CUDA graphs) that ``generate`` keeps on ``model``."""
    vars(model).pop("_l2pd_steppers", None)
    vars(model).pop("_l2pd_engine", None)
