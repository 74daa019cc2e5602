"""A sequence-level objective for the learned decoder: policy gradient over the filter's own decodes.

Labels say whether one position's guess is right; what a decoder is judged on is whether the whole answer comes
out right and how many forwards it took. Here the filter's decision becomes a policy and that is the reward:

- A still-masked position is accepted with probability sigmoid((z - logit(tau)) / temperature), z the filter's
  logit: logistic noise on the decision ``decide`` makes (sigmoid(z) > tau), which it becomes as the
  temperature goes to 0. The fallback (the most confident masked position) and a block's last forward (every
  mask) are forced, as in ``generate``, and are not choices of the policy.
- Each prompt is decoded ``samples`` times. A decode's reward is [answer correct] - ``cost`` * forwards; its
  advantage is the reward minus the mean over the same prompt's decodes (a baseline without a critic).
- The loss is -advantage * sum of the log-probabilities of the decode's choices, averaged over decodes.

Decoding mirrors ``generate`` with a filter (strategy ``learn2pd``, no cache, EoTP ``accepted``, one token of
fallback per forward): with ``greedy=True`` the tokens and forwards are ``generate``'s (tests/test_reinforce.py).
So the trained filter is an ordinary history filter: every decode path, kernel and graph runs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from l2pd_kernels.reference import (
    HISTORY_FEATURES,
    confidence,
    end_fill,
    position_inputs,
    topk_lowest_index,
    update_history,
)

from .filter import Filter, model_fingerprint


@dataclass
class Rollout:
    """One batch of decodes: the sequences, forwards per row, and per forward the policy's inputs and choices."""

    sequences: torch.Tensor  # [N, P + G]
    forwards: torch.Tensor  # [N] int64
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # (rows [n], inputs [n, L, F], free [n, L]: masked and not forced, accepted [n, L])


def threshold_filter(block_length: int, hidden: int = 32, confidence_at: float = 0.98, slope: float = 200.0,
                     tau: float = 0.5, seed: int = 0) -> Filter:
    """A history filter that starts as a confidence threshold: its logit is slope * (confidence -
    ``confidence_at``) + logit(tau), so at ``tau`` it accepts exactly the positions more confident than
    ``confidence_at``. Its other hidden units start small and silent (zero output weights): the policy gradient
    grows them."""
    torch.manual_seed(seed)
    flt = Filter(block_length, hidden, 1, tau, kind="history")
    first, last = flt.layers
    with torch.no_grad():
        first.weight.normal_(0, 0.1)
        first.bias.zero_()
        first.weight[0].zero_()
        first.weight[0, HISTORY_FEATURES.index("confidence")] = 1.0
        last.weight.zero_()
        last.weight[0, 0] = slope
        last.bias.fill_(logit(tau) - slope * confidence_at)
    return flt


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def rollout(adapter: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, flt: Filter, *, tau: float,
            gen_length: int, temperature: float = 0.25, greedy: bool = False,
            generator: torch.Generator | None = None) -> Rollout:
    """Decode left-padded prompts [N, P] with ``flt`` as a policy (see the module docstring)."""
    bias = logit(tau)

    def choose(x: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = flt(x)[..., 0]
        if greedy:
            return torch.sigmoid(z) > tau
        p = torch.sigmoid((z - bias) / temperature)
        return torch.rand(p.shape, device=p.device, generator=generator) < p

    return decode_states(adapter, input_ids, attention_mask, choose, flt.block_length, gen_length)


def decode_states(adapter: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], block_length: int, gen_length: int,
                  observe: Callable[..., None] | None = None) -> Rollout:
    """``generate``'s no-cache decode with EoTP ``accepted`` and a decision of the caller's: ``choose(x,
    prob)`` gets each forward's history-filter inputs [n, L, F] and confidences [n, L] and says which
    positions it accepts (the top-1 fallback and a block's last forward are forced on top). Every row
    independently, in lockstep over the blocks. ``observe(rows, block_start, token, x, masked)`` sees each
    forward before its decision."""
    L = block_length
    if gen_length % L:
        raise ValueError(f"gen_length={gen_length} must be a multiple of the block length {L}")
    _check_bidirectional(adapter)
    N, P = input_ids.shape
    device, mask_id, eos_id = input_ids.device, adapter.mask_id, adapter.eos_id
    canvas = torch.cat([input_ids, torch.full((N, gen_length), mask_id, device=device)], 1)
    attn = torch.cat([attention_mask.bool(), torch.ones(N, gen_length, dtype=torch.bool, device=device)], 1)
    history = (torch.full_like(canvas, -1), torch.zeros_like(canvas, dtype=torch.int32),
               torch.zeros_like(canvas, dtype=torch.float32))
    out = Rollout(canvas, torch.zeros(N, dtype=torch.int64, device=device))
    for b0 in range(P, P + gen_length, L):
        for step in range(L):
            rows = (canvas[:, b0 : b0 + L] == mask_id).any(-1).nonzero()[:, 0]
            if not len(rows):
                break
            ids = canvas[rows]
            masked = ids[:, b0 : b0 + L] == mask_id
            logits = adapter.logits(ids, attn[rows])[:, b0 : b0 + L]
            token, prob, margin, entropy = confidence(logits, suppress=mask_id, stats=True)
            kept = tuple(h[rows] for h in history)
            run, previous = update_history(kept, token, prob, b0)
            for h, k in zip(history, kept):
                h[rows] = k
            x = position_inputs(prob, masked, L, "history", margin, entropy, step, run, previous)
            if observe is not None:
                observe(rows, b0, token, x, masked)
            chosen = choose(x, prob)
            forced = topk_lowest_index(prob, masked, L if step == L - 1 else 1)
            block = torch.where(masked & (chosen | forced), token, ids[:, b0 : b0 + L])
            ids[:, b0 : b0 + L] = block
            first = torch.where(block == eos_id, torch.arange(L, device=device), L).amin(-1)
            end_fill(ids, b0 + first, first < L, mask_id, eos_id)
            canvas[rows] = ids
            out.forwards[rows] += 1
            out.steps.append((rows, x, masked & ~forced, chosen))
    return out


def policy_loss(flt: Filter, ro: Rollout, advantage: torch.Tensor, tau: float, temperature: float) -> torch.Tensor:
    """-mean over decodes of advantage * the log-probability of the decode's own choices."""
    total = torch.zeros((), device=advantage.device)
    bias = logit(tau)
    for rows, x, free, chosen in ro.steps:
        u = (flt(x)[..., 0] - bias) / temperature
        logp = torch.where(chosen, F.logsigmoid(u), F.logsigmoid(-u))
        total = total + (advantage[rows] * (logp * free).sum(-1)).sum()
    return -total / len(advantage)


def train_policy(
    model: Any, tokenizer: Any, problems: list[Any], filter: Filter | None = None, *, block_length: int = 128,
    gen_length: int = 256, tau: float = 0.5, cost: float = 0.01, samples: int = 8, prompts_per_step: int = 32,
    iterations: int = 100, lr: float = 1e-3, temperature: float = 0.25, hidden: int = 32, seed: int = 0,
    start_confidence: float = 0.98, checker: Callable[[str, Any], bool] | None = None, log: Any = print,
    progress: bool = True,
) -> Filter:
    """Train a history filter by policy gradient on ``problems`` (objects with ``.question`` and ``.answer``):
    each iteration decodes ``prompts_per_step`` prompts ``samples`` times each. Starts from ``filter`` (a
    history filter; its weights are copied) or from ``threshold_filter`` at ``start_confidence``. The result
    has ``tau`` as its operating point; its meta records the training curve."""
    from .demo.task import is_correct
    from .evaluate import answer_texts, encode_prompts
    from .models import adapter_for

    _check(block_length, gen_length, tau, cost, samples, prompts_per_step, iterations, lr, temperature, problems)
    adapter = adapter_for(model)
    _check_bidirectional(adapter)
    device = adapter.device
    check = checker or is_correct
    if filter is None:
        flt = threshold_filter(block_length, hidden, confidence_at=start_confidence, tau=tau, seed=seed)
    else:
        if filter.kind != "history" or filter.block_length != block_length:
            raise ValueError(f"the starting filter must be a history filter of block {block_length}, got a "
                             f"{filter.kind} filter of block {filter.block_length}")
        flt = Filter(block_length, filter.hidden, filter.depth, tau, kind="history")
        flt.load_state_dict(filter.state_dict())
    flt = flt.to(device).train()
    opt = torch.optim.Adam(flt.parameters(), lr=lr)
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
    curve, t0 = [], time.time()
    bar = tqdm(range(iterations), disable=not progress, desc="policy gradient", unit="iteration")
    for it in bar:
        pick = [problems[order[(it * prompts_per_step + j) % len(problems)]] for j in range(prompts_per_step)]
        ids, mask = encode_prompts(tokenizer, [p.question for p in pick for _ in range(samples)], device)
        with torch.no_grad():
            ro = rollout(adapter, ids, mask, flt, tau=tau, gen_length=gen_length, temperature=temperature,
                         generator=gen)
        answers = answer_texts(tokenizer, ro.sequences, ids.shape[1])
        right = torch.tensor([check(a, pick[i // samples].answer) for i, a in enumerate(answers)],
                             dtype=torch.float32, device=device)
        reward = right - cost * ro.forwards.float()
        advantage = reward - reward.view(-1, samples).mean(1).repeat_interleave(samples)
        loss = policy_loss(flt, ro, advantage, tau, temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append({"iteration": it, "accuracy": round(float(right.mean()), 4),
                      "forwards": round(float(ro.forwards.float().mean()), 3),
                      "reward": round(float(reward.mean()), 4)})
        bar.set_postfix(accuracy=curve[-1]["accuracy"], forwards=curve[-1]["forwards"])
        if it % 10 == 0 or it == iterations - 1:
            log(f"iteration {it}: accuracy {curve[-1]['accuracy']:.3f} forwards {curve[-1]['forwards']:.2f} "
                f"reward {curve[-1]['reward']:.4f} ({time.time() - t0:.0f} s)")
    flt = flt.eval().cpu()
    flt.meta.update(model_fingerprint=model_fingerprint(model), gen_length=gen_length, eotp="accepted",
                    objective="policy gradient", cost=cost, samples=samples, prompts_per_step=prompts_per_step,
                    iterations=iterations, temperature=temperature, lr=lr, train_seconds=round(time.time() - t0, 1),
                    curve=curve)
    return flt


def _check_bidirectional(adapter: Any) -> None:
    if adapter.block_causal:
        raise ValueError("policy-gradient training decodes bidirectional models (LLaDA, Dream); block-causal "
                         "LLaDA 2.x is not supported")


def _check(block_length: int, gen_length: int, tau: float, cost: float, samples: int, prompts_per_step: int,
           iterations: int, lr: float, temperature: float, problems: list) -> None:
    for name, v in (("block_length", block_length), ("gen_length", gen_length), ("samples", samples),
                    ("prompts_per_step", prompts_per_step), ("iterations", iterations)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if samples < 2:
        raise ValueError(f"samples={samples}: the baseline is the mean over a prompt's decodes, so at least 2")
    if not 0 < tau < 1:
        raise ValueError(f"tau={tau} must be in (0, 1): the policy's decision is sigmoid(z) > tau")
    for name, v in (("cost", cost), ("lr", lr), ("temperature", temperature)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or (name != "cost" and v == 0):
            raise ValueError(f"{name}={v!r} must be a finite number " + (">= 0" if name == "cost" else "> 0"))
    if not problems:
        raise ValueError("no training problems")
