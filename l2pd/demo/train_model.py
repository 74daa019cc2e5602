"""Train the bundled masked-diffusion model with LLaDA's SFT objective.

Each answer token (the worked solution, ``<|eot_id|>``, then end-of-text padding to the canvas length) is
masked with probability t ~ U(eps, 1) per example; the loss is the cross-entropy on masked answer tokens
weighted by 1/t, summed and divided by the canvas length, as in LLaDA's SFT. Canvas lengths are mixed
(mostly 256, some 1024) so that the model fills long canvases with end-of-text as well.

    python -m l2pd.demo.train_model --out runs/model --minutes 8      # one H100: about 8 minutes
    python -m l2pd.demo.train_model --out runs/tiny --minutes 1 --device cpu --d-model 64 --layers 2

With ``--checkpoint-minutes`` the folder holds a loadable bf16 checkpoint during training as well (a
long run in the background can be harvested at any time); ``--init`` continues from such a folder.

``--family llada2`` trains a LLaDA 2.x-format model (mixture of experts, block-causal attention) with block
diffusion: each problem is fed twice, clean and with the answer masked; a masked block attends to the clean
blocks before it and to itself, as decoding a block against an exact prefix cache does (``block_sft_loss``).

    python -m l2pd.demo.train_model --family llada2 --out runs/llada2 --minutes 8 --no-compile

``--hard-fraction F`` mixes in problems of the task's ``hard`` level (5 or 6 steps), which the bundled model
never saw: a model trained on the mix is less sure on the ``hard-test`` split, so decoding has headroom there.

    python -m l2pd.demo.train_model --init l2pd/demo/assets/model --hard-fraction 0.5 --minutes 4.5 \
        --lr 1e-3 --warmup 100 --first-problem 200000000 --out runs/model-hard
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import time
from multiprocessing import Pool
from typing import Any

import torch
import torch.nn.functional as F

from ..models.decoder import positions_from_mask
from ..models.dream import DreamConfig, DreamModel
from ..models.llada import LLaDAConfig, LLaDAModelLM
from ..models.llada2 import LLaDA2Config, LLaDA2MoeModelLM
from .task import TRAIN_SEEDS, problem
from .tokenizer import build_tokenizer, prompt_text

PROMPT_SLOTS = 112  # prompts are left-padded to this many tokens in training
HARD_PROMPT_SLOTS = 160  # the same with hard-level problems in the mix (their prompts run to about 120 tokens)
CANVAS_MIX = ((256, 0.9), (1024, 0.1))
ANSWER_SLOTS = 256  # answers are stored end-of-text padded to this length and extended on the fly


def _texts(job: tuple[int, int, str]) -> list[tuple[str, str]]:
    lo, hi, level = job
    return [(p.question, p.solution) for p in (problem(s, level) for s in range(lo, hi))]


def make_problems(n: int, workers: int, first: int = 0, hard_fraction: float = 0.0) -> list[tuple[str, str]]:
    """Training problems from seeds TRAIN_SEEDS[first : first + n]: the last ``hard_fraction`` of them at the
    hard level, the rest at the base level."""
    n_hard = round(n * hard_fraction)
    chunk = max(1, n // max(1, workers * 4))
    jobs = [(TRAIN_SEEDS[first + i], TRAIN_SEEDS[first + min(n, i + chunk) - 1] + 1) for i in range(0, n, chunk)]
    # split the chunk that straddles the base/hard boundary, so that every seed has exactly one level
    cut = TRAIN_SEEDS[first + n - n_hard] if n_hard else TRAIN_SEEDS[first + n - 1] + 1
    leveled = []
    for lo, hi in jobs:
        if lo < cut:
            leveled.append((lo, min(hi, cut), "base"))
        if hi > cut:
            leveled.append((max(lo, cut), hi, "hard"))
    if workers <= 1:
        return [t for job in leveled for t in _texts(job)]
    with Pool(workers) as pool:
        return [t for part in pool.map(_texts, leveled) for t in part]


def encode(tokenizer, pairs: list[tuple[str, str]],
           prompt_slots: int = PROMPT_SLOTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [N, prompt_slots] left-padded with end-of-text; answers + eot [N, ANSWER_SLOTS] right-padded."""
    common = dict(add_special_tokens=False, padding="max_length", return_attention_mask=False)
    prompts = tokenizer([prompt_text(tokenizer, q) for q, _ in pairs], max_length=prompt_slots,
                        padding_side="left", **common).input_ids
    answers = tokenizer([a + "<|eot_id|>" for _, a in pairs], max_length=ANSWER_SLOTS, padding_side="right",
                        **common).input_ids
    P, A = torch.tensor(prompts, dtype=torch.int32), torch.tensor(answers, dtype=torch.int32)
    if P.shape[1] != prompt_slots or A.shape[1] != ANSWER_SLOTS:
        raise ValueError(f"a problem is longer than {prompt_slots} prompt / {ANSWER_SLOTS} answer tokens")
    return P, A


def sft_loss(model, prompts, answers, mask_id: int, pad_id: int, eps: float = 1e-3) -> torch.Tensor:
    B, G = answers.shape
    t = eps + (1 - eps) * torch.rand(B, 1, device=answers.device)
    masked = torch.rand(B, G, device=answers.device) < t
    x = torch.cat([prompts, torch.where(masked, mask_id, answers)], 1)
    attn = torch.cat([prompts != pad_id, torch.ones_like(answers, dtype=torch.bool)], 1)
    # a prompt of only padding never happens; the first real token keeps every row's mask non-empty
    P = prompts.shape[1]
    logits = model(x, attention_mask=attn, logits_slice=(P, P + G)).logits
    ce = F.cross_entropy(logits.float().reshape(B * G, -1), answers.reshape(-1), reduction="none").view(B, G)
    return ((ce * masked) / t).sum() / (B * G)


def block_diffusion_mask(prompt_real: torch.Tensor, G: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids [B, 2(P + G)], SDPA mask [B, 1, S, S]) for ``[prompt, clean answer, prompt, masked answer]``
    with left-padded prompts (``prompt_real`` [B, P], True at real tokens). Blocks are ``position // block``,
    positions counted from each row's first real token (as decoding counts them). A clean token sees the
    clean tokens of its block and the blocks before (block-causal); a token of the second, masked copy sees
    the clean blocks before its own and the masked copy of its own block (the prompt's tail included): what
    decoding that block against an exact prefix cache computes."""
    B, P = prompt_real.shape
    dev = prompt_real.device
    real = torch.cat([prompt_real, torch.ones(B, G, dtype=torch.bool, device=dev)], 1)
    pos = positions_from_mask(real)
    pos = torch.cat([pos, pos], 1)
    blk = pos // block
    noisy = torch.zeros(pos.shape[1], dtype=torch.bool, device=dev)
    noisy[P + G :] = True
    bq, bk = blk[:, :, None], blk[:, None, :]
    nq, nk = noisy[None, :, None], noisy[None, None, :]
    allowed = torch.where(nq, (~nk & (bk < bq)) | (nk & (bk == bq)), ~nk & (bk <= bq))
    return pos, (allowed & torch.cat([real, real], 1)[:, None, :])[:, None]


def block_sft_loss(model, prompts, answers, mask_id: int, pad_id: int, block: int = 32,
                   eps: float = 1e-3) -> torch.Tensor:
    """``sft_loss`` for a block-causal model, every block at once: the input is the prompt and clean answer,
    then the prompt and masked answer (``block_diffusion_mask``); logits and loss come from the masked answer."""
    B, G = answers.shape
    P = prompts.shape[1]
    t = eps + (1 - eps) * torch.rand(B, 1, device=answers.device)
    masked = torch.rand(B, G, device=answers.device) < t
    x = torch.cat([prompts, answers, prompts, torch.where(masked, mask_id, answers)], 1)
    pos, attn = block_diffusion_mask(prompts != pad_id, G, block)
    S = 2 * (P + G)
    logits = model(x, position_ids=pos, attn_mask=attn, logits_slice=(S - G, S), block_length=block).logits
    ce = F.cross_entropy(logits.float().reshape(B * G, -1), answers.reshape(-1), reduction="none").view(B, G)
    return ((ce * masked) / t).sum() / (B * G)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (checkpoint + tokenizer + training.json)")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time budget; the LR schedule follows it")
    ap.add_argument("--problems", type=int, default=160_000, help="distinct training problems")
    ap.add_argument("--tokens-per-batch", type=int, default=64_000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--family", choices=["llada", "dream", "llada2"], default="llada",
                    help="the checkpoint format: LLaDA, Dream (biased q/k/v, grouped-query attention with half "
                         "as many key/value heads, shifted logits) or LLaDA 2.x (fused q/k/v with q/k norms, "
                         "partial RoPE, half as many key/value heads, a dense first layer, then --experts routed "
                         "experts and one shared expert; block-causal, trained by block diffusion)")
    ap.add_argument("--experts", type=int, default=8, help="llada2: routed experts per layer")
    ap.add_argument("--experts-per-token", type=int, default=2, help="llada2: experts each token is routed to")
    ap.add_argument("--moe-mlp", type=int, default=96, help="llada2: the width of each expert (and the shared one)")
    ap.add_argument("--block-length", type=int, default=32, help="llada2: the attention block of training")
    ap.add_argument("--from-dense", metavar="DIR",
                    help="llada2: start from a LLaDA-format checkpoint (upcycling): embeddings, attention, norms and "
                         "head copied; the first layer's MLP kept dense; each later MLP split into a shared expert "
                         "(the first half of its units) and --experts routed experts (the rest, in equal slices)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--first-problem", type=int, default=0,
                    help="index of the first training seed (fresh problems for a continued run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hard-fraction", type=float, default=0.0,
                    help="share of the training problems drawn at the task's hard level (5 or 6 steps; default 0)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it needs a GPU toolchain)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tokenizer", help="reuse the tokenizer of this folder instead of training one")
    ap.add_argument("--init", help="start from the weights, config and tokenizer of this checkpoint folder")
    ap.add_argument("--checkpoint-minutes", type=float, default=0.0,
                    help="also write the checkpoint every this many minutes (0: only at the end)")
    return ap


def _model(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any]:
    """(model, config): a fresh model of the chosen format, or the --init checkpoint."""
    vocab = len(tokenizer)
    ids = dict(mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    if args.family == "llada2":
        config = LLaDA2Config(
            hidden_size=args.d_model, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
            head_dim=args.d_model // args.heads, num_hidden_layers=args.layers, intermediate_size=args.mlp,
            vocab_size=-(-vocab // 64) * 64, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
            num_experts=args.experts, num_experts_per_tok=args.experts_per_token, **_router_groups(args.experts),
            moe_intermediate_size=args.moe_mlp, num_shared_experts=1, first_k_dense_replace=1, **ids)
        model_cls = LLaDA2MoeModelLM
    elif args.family == "dream":
        config = DreamConfig(hidden_size=args.d_model, num_attention_heads=args.heads,
                             num_key_value_heads=max(1, args.heads // 2), num_hidden_layers=args.layers,
                             intermediate_size=args.mlp, vocab_size=-(-vocab // 64) * 64,
                             max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, **ids)
        model_cls = DreamModel
    else:
        config = LLaDAConfig(
            d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
            mlp_hidden_size=args.mlp, vocab_size=vocab, embedding_size=-(-vocab // 64) * 64,
            max_sequence_length=2048, rope_theta=10000.0, **ids,
        )
        model_cls = LLaDAModelLM
    dev = torch.device(args.device)
    if args.from_dense:
        model = upcycle(args.from_dense, args.experts, args.experts_per_token).to(dev)
        return model, model.config
    if args.init:
        model = model_cls.from_pretrained(args.init, torch_dtype=torch.float32, device=dev)
        config = model.config
    else:
        model = model_cls(config).to(dev)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    out_proj = any(k in name for k in ("ff_out", "attn_out", "o_proj", "down_proj", "attention.dense"))
                    torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * args.layers) if out_proj else 0.02)
                elif name.endswith(".bias"):
                    torch.nn.init.zeros_(p)
    return model, config


def _router_groups(experts: int) -> dict[str, int]:
    """The group-limited router's settings for a small model: up to 4 groups, half of them kept."""
    groups = min(4, experts)
    return {"n_group": groups, "topk_group": max(1, groups // 2)}


def upcycle(dense_dir: str, experts: int = 8, top_k: int = 2, dense_layers: int = 1) -> LLaDA2MoeModelLM:
    """A LLaDA 2.x-format model (fp32) from a LLaDA-format checkpoint: full RoPE, no q/k norms and as many
    key/value heads as the source (so attention is copied exactly); the first ``dense_layers`` MLPs dense, each
    later one split by its hidden units into a shared expert (the first half) and ``experts`` routed experts
    of equal width (the rest), routed ``top_k`` at a time. Same parameter count as the source plus the routers."""
    src = LLaDAModelLM.from_pretrained(dense_dir, torch_dtype=torch.float32)
    c = src.config
    F_ = c.mlp_hidden_size
    if F_ % 2 or (F_ // 2) % experts or c.n_kv_heads != c.n_heads or c.weight_tying:
        raise ValueError(f"{dense_dir}: upcycling needs an untied head, as many K/V heads as heads and an MLP "
                         f"width ({F_}) whose half splits into {experts} experts")
    width = F_ // 2 // experts
    cfg = LLaDA2Config(
        hidden_size=c.d_model, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.d_model // c.n_heads, num_hidden_layers=c.n_layers, intermediate_size=F_,
        vocab_size=c.embedding_size or c.vocab_size, max_position_embeddings=c.max_sequence_length,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, partial_rotary_factor=1.0, use_qk_norm=False,
        num_experts=experts if dense_layers < c.n_layers else 0, num_experts_per_tok=top_k,
        **_router_groups(experts), moe_intermediate_size=width,
        num_shared_experts=experts, first_k_dense_replace=dense_layers, mask_token_id=c.mask_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, bos_token_id=getattr(c, "bos_token_id", None))
    model = LLaDA2MoeModelLM(cfg)
    t, m = src.model.transformer, model.model
    with torch.no_grad():
        m.word_embeddings.weight.copy_(t.wte.weight)
        model.lm_head.weight.copy_(t.ff_out.weight)
        m.norm.weight.copy_(t.ln_f.weight)
        for b, layer in zip(t.blocks, m.layers):
            layer.input_layernorm.weight.copy_(b.attn_norm.weight)
            layer.post_attention_layernorm.weight.copy_(b.ff_norm.weight)
            layer.attention.query_key_value.weight.copy_(torch.cat([b.q_proj.weight, b.k_proj.weight,
                                                                     b.v_proj.weight]))
            layer.attention.dense.weight.copy_(b.attn_out.weight)
            mlp = layer.mlp
            parts = [(mlp, 0, F_)] if not hasattr(mlp, "experts") else [(mlp.shared_experts, 0, F_ // 2)] + [
                (e, F_ // 2 + i * width, F_ // 2 + (i + 1) * width) for i, e in enumerate(mlp.experts)]
            for dst, lo, hi in parts:
                dst.gate_proj.weight.copy_(b.ff_proj.weight[lo:hi])
                dst.up_proj.weight.copy_(b.up_proj.weight[lo:hi])
                dst.down_proj.weight.copy_(b.ff_out.weight[:, lo:hi])
            if hasattr(mlp, "experts"):
                torch.nn.init.normal_(mlp.gate.weight, std=0.02)
    return model


def _data(args: argparse.Namespace) -> tuple[Any, list, torch.Tensor, torch.Tensor]:
    """(tokenizer, problems, prompt ids, answer ids): the problems drawn, the tokenizer trained or reused."""
    pairs = make_problems(args.problems, args.workers, args.first_problem, args.hard_fraction)
    if args.init or args.tokenizer or args.from_dense:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.init or args.tokenizer or args.from_dense)
    else:
        tokenizer = build_tokenizer(f"{q}\n{a}" for q, a in pairs[:50_000])
    prompts, answers = encode(tokenizer, pairs, HARD_PROMPT_SLOTS if args.hard_fraction > 0 else PROMPT_SLOTS)
    return tokenizer, pairs, prompts, answers


def _loss(args: argparse.Namespace) -> tuple[Any, int]:
    """(the loss function, how many times each problem is fed): block diffusion for the block-causal family."""
    if args.family == "llada2":  # routing reads expert ids on the host: no torch.compile
        args.no_compile = True
        return functools.partial(block_sft_loss, block=args.block_length), 2
    return sft_loss, 1


def _swap_in(tmp: str, out: str) -> None:
    """Folder ``tmp`` becomes ``out`` (the previous ``out`` removed after the swap)."""
    import shutil

    old = out.rstrip("/") + ".old"
    if os.path.isdir(out):
        os.replace(out, old)
    os.replace(tmp, out)
    if os.path.isdir(old):
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.problems <= 0 or args.tokens_per_batch <= 0 or args.lr <= 0:
        ap.error("--minutes, --problems, --tokens-per-batch and --lr must be positive")
    if args.first_problem < 0 or not 0 <= args.hard_fraction <= 1:
        ap.error("--first-problem must be >= 0 and --hard-fraction in [0, 1]")
    if args.from_dense and (args.family != "llada2" or args.init):
        ap.error("--from-dense starts a --family llada2 model from a LLaDA-format checkpoint (not with --init)")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.time()
    tokenizer, pairs, prompts_all, answers_all = _data(args)
    print(f"data: {len(pairs)} problems in {time.time() - t_start:.1f} s, vocab {len(tokenizer)}", flush=True)

    dev = torch.device(args.device)
    model, config = _model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    prompts_all, answers_all = prompts_all.to(dev).long(), answers_all.to(dev).long()
    gens, weights = zip(*CANVAS_MIX)
    gen_choice = torch.multinomial(torch.tensor(weights), 1_000_000, replacement=True)
    budget = args.minutes * 60
    plain, fed = _loss(args)
    loss_fn = torch.compile(plain) if dev.type == "cuda" and not args.no_compile else plain
    eos_fill = torch.full((1, 1), config.eos_token_id, device=dev, dtype=torch.long)
    curve, step, t0 = [], 0, time.time()
    t_data = t0 - t_start

    def save(final: bool) -> None:
        snapshot = copy.deepcopy(model).to(torch.bfloat16).eval()
        tmp = args.out.rstrip("/") + ".tmp"  # written aside, then swapped in: a reader never sees half a folder
        snapshot.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "version": 1, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t0, 1),
            "steps": step, "finished": final, "parameters": n_params,
            "final_loss": curve[-1]["loss"] if curve else None, "problems": len(pairs),
            "first_problem": args.first_problem, "init": args.init, "from_dense": args.from_dense,
            "hard_fraction": args.hard_fraction, "family": args.family,
            "canvas_mix": CANVAS_MIX, "tokens_per_batch": args.tokens_per_batch, "lr": args.lr,
            "loss_curve": curve,
        }
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump(info, f, indent=1)
        _swap_in(tmp, args.out)

    loss_sum = torch.zeros((), device=dev)
    next_save = args.checkpoint_minutes * 60 if args.checkpoint_minutes > 0 else float("inf")
    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        G = gens[int(gen_choice[step % len(gen_choice)])]
        B = max(1, args.tokens_per_batch // (fed * (prompts_all.shape[1] + G)))
        idx = torch.randint(0, len(pairs), (B,), device=dev)
        answers = answers_all[idx]
        if G > ANSWER_SLOTS:
            answers = torch.cat([answers, eos_fill.expand(B, G - ANSWER_SLOTS)], 1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            try:
                loss = loss_fn(model, prompts_all[idx], answers[:, :G], config.mask_token_id, config.pad_token_id)
            except Exception as exc:  # a broken compile toolchain: train eagerly rather than not at all
                if loss_fn is plain:
                    raise
                print(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
                loss_fn = plain
                loss = loss_fn(model, prompts_all[idx], answers[:, :G], config.mask_token_id, config.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_sum += loss.detach()
        if step % 100 == 0:  # the curve holds the mean loss of the last 100 steps (one read per 100 steps)
            mean = loss_sum.item() / 100
            loss_sum.zero_()
            curve.append({"step": step, "seconds": round(time.time() - t0, 1), "loss": round(mean, 5), "lr": lr})
            if step % 500 == 0:
                print(f"step {step} {time.time() - t0:.0f}s loss {mean:.4f} lr {lr:.2e}", flush=True)
        if time.time() - t0 >= next_save:
            save(final=False)
            next_save += args.checkpoint_minutes * 60
            print(f"checkpoint at step {step}", flush=True)

    save(final=True)
    size = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    final_loss = curve[-1]["loss"] if curve else None
    print(f"done: {step} steps, {time.time() - t0:.1f} s, loss {final_loss}, {n_params} params, "
          f"{size / 1e6:.1f} MB on disk", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
