"""One step's decision (``confidence`` then ``decide``) replayed from a captured CUDA graph.

At small batch the decision is a few microseconds of GPU work behind several Python kernel launches, so its
cost is the launches. ``DecisionGraph`` captures both kernels once per canvas; a step then costs a copy of
the logits into the graph's input buffer, one fill of the packed (block start, k) word the kernel reads at
run time, and one replay. Greedy decoding only (the sampling seed is a launch argument).
"""

from __future__ import annotations

import torch

from .confidence import confidence
from .decide import decide


class DecisionGraph:
    """``confidence`` + ``decide`` on a fixed canvas and fixed logits shape [B, L, V], as one CUDA graph.

    ``decide_kwargs`` are ``decide``'s keyword arguments other than ``block_start`` and ``k`` (those vary per
    call). The canvas is written in place, as ``decide`` does. Call with the step's logits; returns
    (token, prob, accepted, left, eot), the graph's output buffers (valid until the next call).
    """

    def __init__(self, canvas: torch.Tensor, logits_shape: tuple[int, int, int], logits_dtype: torch.dtype,
                 suppress: int | None = None, **decide_kwargs):
        if canvas.device.type != "cuda":
            raise ValueError("DecisionGraph needs CUDA tensors")
        B, L, V = logits_shape
        if canvas.shape[0] != B:
            raise ValueError(f"canvas batch {canvas.shape[0]} != logits batch {B}")
        self.canvas, self.L, self.suppress, self.kwargs = canvas, L, suppress, decide_kwargs
        self.logits = torch.zeros(B, L, V, dtype=logits_dtype, device=canvas.device)
        self.params = torch.zeros(1, dtype=torch.int64, device=canvas.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, ...] = ()

    def _run(self):
        token, prob = confidence(self.logits, suppress=self.suppress)
        # block_start=0, k=1 size the wrapper's checks only: the kernel reads the packed word in params
        acc, left, eot = decide(self.canvas, token, prob, block_start=0, k=1, params=self.params, **self.kwargs)
        return token, prob, acc, left, eot

    def _capture(self) -> None:
        saved = self.canvas.clone()  # the warm-up launch (Triton compiles there) must not change the canvas
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.canvas.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()

    def __call__(self, logits: torch.Tensor, block_start: int, k: int):
        if logits.shape != self.logits.shape:
            raise ValueError(f"logits {tuple(logits.shape)} != the captured shape {tuple(self.logits.shape)}")
        if block_start < 0 or block_start + self.L > self.canvas.shape[1] or not 0 <= k < 2**20:
            raise ValueError(f"block_start={block_start}, k={k} outside the canvas or the packed range")
        if self.graph is None:
            self.params.fill_(0)
            self._capture()
        self.logits.copy_(logits)
        self.params.fill_((block_start << 20) | k)
        self.graph.replay()
        return self.out
