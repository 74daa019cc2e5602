"""Held-out accuracy, forwards per answer and throughput of a decoding configuration on the bundled task."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .decode import generate
from .demo.task import Problem, is_correct
from .demo.tokenizer import prompt_text
from .distributed import env_world, gather_objects, mine
from .models import adapter_for


def encode_prompts(tokenizer, questions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts, left-padded with the pad token, and their attention mask."""
    texts = [prompt_text(tokenizer, q) for q in questions]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def answer_texts(tokenizer, sequences: torch.Tensor, prompt_len: int) -> list[str]:
    return tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "eval",
    checker: Any = None,
    **decode_kwargs: Any,
) -> dict[str, Any]:
    """Decode every problem; returns accuracy, mean forwards per answer, answer tokens/s, wall time.

    Answer tokens are those before the first end-of-text: what a reader receives. Wall time includes
    everything from prompts to decoded text, at the given ``batch_size``. Under ``torchrun`` the batches are
    shared round-robin among the processes and every process returns the merged figures (wall time: the
    slowest process).
    """
    rank, world, _ = env_world()
    check = checker or is_correct  # (answer text, reference) -> bool; default: the bundled task's "#### N"
    decode_kwargs.setdefault("filter", getattr(model, "l2pd_filter", None))  # the filter l2pd.patch attached
    device = adapter_for(model).device
    eos = tokenizer.eos_token_id
    records: list[tuple[int, bool, int, int, str]] = []  # (problem index, correct, nfe, answer tokens, text)
    forwards = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    bar = tqdm(total=len(problems), disable=not progress or rank != 0, desc=desc, unit="problem")
    for bi, i in enumerate(range(0, len(problems), batch_size)):
        if not mine(bi, rank, world):
            continue
        batch = problems[i : i + batch_size]
        ids, mask = encode_prompts(tokenizer, [p.question for p in batch], device)
        out = generate(model, ids, mask, return_dict_in_generate=True, **decode_kwargs)
        answers = out.sequences[:, ids.shape[1] :]
        is_eos = answers == eos
        lengths = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), answers.shape[1]).tolist()
        texts = answer_texts(tokenizer, out.sequences, ids.shape[1])
        for j, (p, text) in enumerate(zip(batch, texts)):
            records.append((i + j, bool(check(text, p.answer)), int(out.nfe[j]), int(lengths[j]), text))
        forwards += out.forwards
        bar.update(len(batch) * world)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    parts = gather_objects((records, forwards, seconds), world)
    per_process = [len(part[0]) for part in parts]
    records = sorted(r for part in parts for r in part[0])
    forwards = sum(part[1] for part in parts)
    seconds = max(part[2] for part in parts)
    n = max(1, len(records))
    answer_tokens = sum(r[3] for r in records)
    return {
        "problems": len(records),
        "accuracy": sum(r[1] for r in records) / n,
        "mean_nfe": sum(r[2] for r in records) / n,
        "batch_forwards": forwards,
        "answer_tokens": answer_tokens,
        "seconds": seconds,
        "tokens_per_s": answer_tokens / seconds if seconds > 0 else float("nan"),
        "processes": world,
        "problems_per_process": per_process,
        "texts": [r[4] for r in records],
        "nfe": [r[2] for r in records],
    }


@torch.no_grad()
def convergence_profile(model: Any, tokenizer: Any, problems: list[Problem], gen_length: int = 256,
                        block_length: int = 32, batch_size: int = 64) -> dict[str, Any]:
    """How a one-token-per-step decode converges: for masked answer positions of the current block, the share
    whose argmax already equals the final token at the block's first step and at its later steps; and, at
    the very first forward (all masks), the share of final end-of-text positions already predicted as
    end-of-text with probability > 0.9, by distance from the end of the answer."""
    adapter = adapter_for(model)
    device, mask_id = adapter.device, adapter.mask_id
    eos = tokenizer.eos_token_id
    first = [0, 0]
    later = [0, 0]
    eot_hits: dict[str, list[int]] = {"1-7": [0, 0], "8+": [0, 0]}
    for i in range(0, len(problems), batch_size):
        batch = problems[i : i + batch_size]
        ids, mask = encode_prompts(tokenizer, [p.question for p in batch], device)
        P = ids.shape[1]
        records: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

        def on_step(s, step, token, prob, canvas, records=records):
            masked = canvas[:, s : s + token.shape[1]] == mask_id
            records.append((s, step, token.clone(), masked.clone()))

        # one decode: the guesses are recorded as it goes and compared with its final answer afterwards
        final = generate(model, ids, mask, max_new_tokens=gen_length, block_length=block_length,
                         strategy="steps", on_step=on_step)[:, P:]
        for s, step, token, masked in records:
            hit = (token == final[:, s - P : s - P + token.shape[1]]) & masked
            bucket = first if step == 0 else later
            bucket[0] += int(hit.sum())
            bucket[1] += int(masked.sum())
        # the first forward over an all-mask canvas
        canvas = torch.cat([ids, torch.full_like(final, mask_id)], 1)
        full = torch.cat([mask, torch.ones_like(final)], 1)
        logits = model(canvas, attention_mask=full, logits_slice=(P, P + gen_length)).logits.float()
        prob, tok = logits.softmax(-1).max(-1)
        is_eos = final == eos
        end = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), gen_length)
        dist = torch.arange(gen_length, device=device)[None] - end[:, None]
        sure = (tok == eos) & (prob > 0.9)
        for name, sel in (("1-7", (dist >= 1) & (dist < 8)), ("8+", dist >= 8)):
            sel = sel & is_eos
            eot_hits[name][0] += int((sure & sel).sum())
            eot_hits[name][1] += int(sel.sum())
    return {
        "final_at_first_step": first[0] / max(1, first[1]),
        "final_at_later_steps": later[0] / max(1, later[1]),
        "eot_confident_at_first_forward": {k: v[0] / max(1, v[1]) for k, v in eot_hits.items()},
    }


DEMO_STRATEGIES = (
    ("steps", {"strategy": "steps"}),
    ("threshold 0.9", {"strategy": "threshold", "threshold": 0.9}),
    ("threshold 0.9 + EoTP", {"strategy": "threshold", "threshold": 0.9, "eotp": "accepted"}),
    ("learn2pd", {"strategy": "learn2pd", "eotp": "off"}),
    ("learn2pd + EoTP", {"strategy": "learn2pd", "eotp": "accepted"}),
)


def demo_strategies(flt: Any) -> tuple:
    """The demo's rows: ``DEMO_STRATEGIES``, and the model's default decoding when its filter stores a
    training-free one (``l2pd tune --rules``), so that the demo shows what decoding without a strategy does."""
    from .spec import rule_name, stored_default

    default = stored_default(flt)
    if default is None or default["strategy"] == "learn2pd":
        return DEMO_STRATEGIES
    kw = {k: default[k] for k in ("strategy", "threshold", "eotp", "persist") if default.get(k) is not None}
    eotp = " + EoTP" if default.get("eotp", "off") != "off" else ""
    return (*DEMO_STRATEGIES, (f"default: {rule_name(default)} {default['threshold']:g}{eotp}", kw))


def compare_configs(model: Any, tokenizer: Any, problems: list[Problem], gen_length: int = 256,
                    block_length: int = 32, batch_size: int = 1, caches=("none", "prefix", "dual"),
                    strategies=DEMO_STRATEGIES, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (strategy, cache): accuracy, mean forwards, tokens/s, and speedups over the first row
    (the first strategy without a cache) in forwards and in wall time."""
    rows: list[dict[str, Any]] = []
    flt = getattr(model, "l2pd_filter", None)
    for name, kw in strategies:
        if kw.get("strategy") == "learn2pd" and (flt is None or flt.block_length != block_length):
            continue  # no filter, or one trained for another block length (the caller says so)
        for cache in caches:
            r = evaluate(model, tokenizer, problems, batch_size=batch_size, progress=progress,
                         desc=f"{name}, {cache}", max_new_tokens=gen_length, block_length=block_length, cache=cache,
                         filter=getattr(model, "l2pd_filter", None), **kw)
            for key in ("texts", "nfe", "problems_per_process"):
                r.pop(key)
            rows.append({"config": name, "cache": cache, "gen_length": gen_length, "batch_size": batch_size, **r})
    base = rows[0]
    for r in rows:
        r["nfe_speedup"] = base["mean_nfe"] / r["mean_nfe"]
        r["wall_speedup"] = base["seconds"] / r["seconds"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    w = max([22] + [len(r["config"]) + 2 for r in rows])
    head = f"{'config':<{w}}{'cache':<8}{'accuracy':>9}{'NFE':>9}{'tok/s':>10}{'NFE x':>8}{'wall x':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<{w}}{r['cache']:<8}{100 * r['accuracy']:>8.1f}%{r['mean_nfe']:>9.1f}"
            f"{r['tokens_per_s']:>10.1f}{r['nfe_speedup']:>8.2f}{r['wall_speedup']:>8.2f}"
        )
    return "\n".join(lines)
