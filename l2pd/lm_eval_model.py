"""An lm-evaluation-harness model (``pip install 'l2pd[eval]'``): ``--model l2pd`` decodes with l2pd.

    l2pd lm-eval --model l2pd --model_args pretrained=FOLDER,strategy=learn2pd,cache=dual \\
        --tasks l2pd_word_problems --apply_chat_template --limit 3

Importing this module registers the model under the name ``l2pd``; ``l2pd lm-eval`` is lm-eval's own command
line with the model registered and this package's tasks on the include path (lm-eval's ``lm_eval`` command
cannot import a model class from another package). From Python::

    import lm_eval, l2pd.lm_eval_model as m
    lm_eval.simple_evaluate(model="l2pd", model_args="strategy=learn2pd", tasks=["l2pd_word_problems"],
                            task_manager=lm_eval.tasks.TaskManager(include_path=m.TASKS_DIR),
                            apply_chat_template=True, limit=3)

- ``generate_until``: batches of prompts with the same generation arguments, left-padded, decoded by
  ``model.generate`` with the ``until`` strings as stop strings, then cut before the first of them.
- ``loglikelihood``: LLaDA's Monte-Carlo estimate of log p(continuation | context): ``mc_num`` draws, each
  masking m of the L continuation tokens (m stratified over 1..L) and scoring them in one forward,
  ``-mean(sum of their cross-entropies * L / m)``; exact for a one-token continuation. ``is_greedy``: one
  forward with the whole continuation masked picks every continuation token.
- ``stats``: forwards per answer and answer tokens/s of the generation requests (printed by ``l2pd lm-eval``).

``model_args``: ``pretrained`` (a checkpoint folder; default the bundled model), ``filter`` (a filter
folder; default the one beside the checkpoint), ``allow_other_model``, ``strategy``, ``threshold``, ``eotp``,
``cache``, ``refresh``, ``block_length``, ``max_new_tokens`` (default 256; a task's ``max_gen_toks`` wins),
``mc_num`` (128), ``mc_batch`` (32), ``seed`` (0), ``dtype`` and lm-eval's ``batch_size`` and ``device``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
LAST: list[Any] = []  # the instances created, for ``l2pd lm-eval`` to print their figures


def _number(name: str, value: Any, cast: Any, lo: float) -> Any:
    """A model_arg as int or float >= ``lo``, or a ValueError naming it."""
    try:
        out = cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}={value!r}: expected {'an integer' if cast is int else 'a number'}") \
            from None
    if not out >= lo or out == float("inf"):
        raise ValueError(f"model_args {name}={value!r}: must be a finite number >= {lo}")
    return out


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("l2pd")
class L2PDLM(LM):
    def __init__(self, pretrained: str | None = None, filter: str | None = None, allow_other_model: Any = False,
                 strategy: str | None = None, threshold: float | None = None, eotp: str | None = None,
                 cache: str = "none", refresh: str = "full", block_length: int | None = None,
                 max_new_tokens: int = 256, mc_num: int = 128, mc_batch: int = 32, seed: int = 0,
                 batch_size: Any = 1, device: str | None = None, dtype: str | None = None, **unused: Any) -> None:
        super().__init__()
        from .loading import default_device, load_model

        unused.pop("max_batch_size", None)
        if unused:
            raise ValueError(f"model_args {sorted(unused)} are not l2pd arguments (see help(l2pd.lm_eval_model))")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes --device (default cuda:0) whether or not the user chose it
            print(f"l2pd: no CUDA GPU is visible; running on the CPU instead of {device}", file=sys.stderr)
            device = "cpu"
        self._device = torch.device(default_device(device))
        from .models.checkpoint import resolve_dtype

        # every model_arg is checked before the model loads
        try:
            torch_dtype = None if dtype in (None, "auto") else resolve_dtype(str(dtype), None)
        except ValueError as exc:
            raise ValueError(f"model_args {exc}") from None
        self.decode = {k: v for k, v in dict(strategy=strategy, eotp=eotp, cache=cache, refresh=refresh).items()
                       if v is not None}
        if threshold is not None:
            self.decode["threshold"] = _number("threshold", threshold, float, 0)
        if block_length is not None:
            self.decode["block_length"] = _number("block_length", block_length, int, 1)
        self.max_new_tokens = _number("max_new_tokens", max_new_tokens, int, 1)
        self.mc_num, self.mc_batch = _number("mc_num", mc_num, int, 1), _number("mc_batch", mc_batch, int, 1)
        self.seed = _number("seed", seed, int, 0)
        bs = str(batch_size)
        self.batch_size = 1 if bs.startswith("auto") else _number("batch_size", bs, int, 1)
        self.model, self.tokenizer = load_model(pretrained, str(self.device), filter, _bool(allow_other_model))
        if torch_dtype is not None:
            self.model.to(torch_dtype)
        from .models import adapter_for

        self.adapter = adapter_for(self.model)
        self.name = pretrained or "l2pd-bundled"
        self.stats = {"answers": 0, "forwards": 0, "answer_tokens": 0, "seconds": 0.0}
        LAST.append(self)

    # -- lm-eval's chat-template hooks (``--apply_chat_template``) --
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", "") or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    # -- requests --
    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="l2pd generate_until")
        eos = self.tokenizer.eos_token_id
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", self.max_new_tokens))
            sample = dict(do_sample=kwargs.pop("do_sample", None), temperature=kwargs.pop("temperature", None))
            for i in range(0, len(idx), self.batch_size):
                batch = idx[i : i + self.batch_size]
                ids, mask = self._encode([requests[j].args[0] for j in batch])
                res = self.model.generate(ids, mask, max_new_tokens=new, stop_strings=until or None,
                                          tokenizer=self.tokenizer, seed=self.seed, return_dict_in_generate=True,
                                          **sample, **self.decode)
                answers = res.sequences[:, ids.shape[1] :]
                is_eos = answers == eos
                lengths = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), answers.shape[1])
                self.stats["answers"] += len(batch)
                self.stats["forwards"] += int(res.nfe.sum())
                self.stats["answer_tokens"] += int(lengths.sum())
                self.stats["seconds"] += res.seconds
                for j, text in zip(batch, self.tokenizer.batch_decode(answers, skip_special_tokens=True)):
                    for u in until:  # lm-eval's convention: the text before the first stop sequence
                        if u:
                            text = text.split(u)[0]
                    out[j] = text
                    self.cache_hook.add_partial("generate_until", requests[j].args, text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(ids).float()  # token i predicted at position i (Dream: shifted)

    @torch.no_grad()
    def _loglikelihood_one(self, context: str, continuation: str, gen: torch.Generator) -> tuple[float, bool]:
        ctx = self.tokenizer(context, add_special_tokens=False).input_ids
        cont = self.tokenizer(continuation, add_special_tokens=False).input_ids
        if not cont:
            return 0.0, True
        mask_id = self.adapter.mask_id
        seq = torch.tensor(ctx + cont, device=self.device)
        P, L = len(ctx), len(cont)
        target = seq[P:]
        # is_greedy: every continuation token is the argmax with the whole continuation masked
        full = seq.clone()
        full[P:] = mask_id
        logits = self._forward_logits(full[None])[0, P:]
        logits[:, mask_id] = float("-inf")
        greedy = bool((logits.argmax(-1) == target).all())
        # stratified mask counts m in 1..L over the mc_num draws (LLaDA's estimator)
        total = []
        for start in range(0, self.mc_num, self.mc_batch):
            n = min(self.mc_batch, self.mc_num - start)
            u = torch.rand(n, generator=gen, dtype=torch.float64)
            draws = torch.arange(start, start + n, dtype=torch.float64) + u
            m = (draws * L / self.mc_num).floor().long().clamp(0, L - 1) + 1  # [n] in 1..L
            order = torch.rand(n, L, generator=gen).argsort(-1)
            masked = order < m[:, None]  # m random continuation positions per draw
            batch = seq.repeat(n, 1)
            batch[:, P:][masked.to(self.device)] = mask_id
            logp = torch.log_softmax(self._forward_logits(batch)[:, P:], -1)
            tok_lp = logp.gather(-1, target.expand(n, L)[..., None]).squeeze(-1).cpu().double()
            total.append((tok_lp * masked).sum(-1) * L / m)
        return float(torch.cat(total).mean()), greedy

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        gen = torch.Generator().manual_seed(self.seed)
        res = []
        for req in tqdm(requests, disable=disable_tqdm, desc="l2pd loglikelihood"):
            context, continuation = req.args
            r = self._loglikelihood_one(context, continuation, gen)
            res.append(r)
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return res

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("loglikelihood_rolling (perplexity tasks) is not defined for a masked-diffusion "
                                  "model; l2pd offers generate_until and loglikelihood")

    def summary(self) -> str:
        s = self.stats
        if not s["answers"]:
            return "l2pd: no generation requests"
        return (f"l2pd: {s['answers']} answers, {s['forwards'] / s['answers']:.2f} forwards per answer, "
                f"{s['answer_tokens'] / max(s['seconds'], 1e-9):.1f} answer tokens/s ({s['seconds']:.1f} s decoding)")


def cli(argv: list[str]) -> int:
    """lm-eval's command line with the ``l2pd`` model registered and the bundled tasks included."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    if "--include_path" not in argv:
        argv += ["--include_path", TASKS_DIR]
    saved = sys.argv
    sys.argv = ["lm-eval"] + argv
    try:
        t0 = time.perf_counter()
        cli_evaluate()
    finally:
        sys.argv = saved
    for lm in LAST:
        print(lm.summary() + f" (wall {time.perf_counter() - t0:.1f} s)")
    return 0
