"""Time per decoding step of an 8B-shaped LLaDA (random bf16 weights built on the GPU).

    python benchmarks/studies/step_8b.py

Reports, at batch 1 (prompt 512 + 256 new tokens, block 32): the weight-read floor (weight bytes over the
copy bandwidth measured in the same run), a full forward over the canvas, a prefix-cache step (block and
suffix), a dual-cache step (block only), and the decision (confidence + decide kernels) per step.
"""

import json

import torch

from l2pd import BlockKVCache, LLaDAConfig, LLaDAModelLM
from l2pd_kernels import confidence, decide


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src)) / 1e6


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    cfg = LLaDAConfig()  # LLaDA-8B-Instruct shapes
    with torch.device("cuda"):
        model = LLaDAModelLM(cfg).to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    read_bw = copy_bandwidth(weight_bytes)  # GB/s counting read + write
    floor_ms = weight_bytes / (read_bw * 1e6)
    P, G, L = 512, 256, 32
    T = P + G
    ids = torch.randint(0, 126000, (1, T), device="cuda")
    tf = model.model.transformer
    from l2pd.models.llada import llada_forward

    full_ms = bench(lambda: llada_forward(tf, cfg, ids, logits_slice=(P, P + L)))
    rows = {"weights_GB": weight_bytes / 1e9, "copy_GBps": read_bw, "floor_ms": floor_ms, "full_forward_ms": full_ms}
    for mode in ("prefix", "dual"):
        kv = BlockKVCache.for_model(cfg, 1, T, mode, torch.bfloat16, "cuda")
        llada_forward(tf, cfg, ids, cache=kv)
        lo, hi = kv.feed_range(P, P + L)
        rows[f"{mode}_step_ms"] = bench(
            lambda lo=lo, hi=hi, kv=kv: llada_forward(tf, cfg, ids[:, lo:hi], cache=kv, start=lo,
                                                      logits_slice=(P - lo, P - lo + L)))
    logits = llada_forward(tf, cfg, ids, logits_slice=(P, P + L))
    canvas = ids.clone()

    def step_decision():
        tok, prob = confidence(logits, suppress=cfg.mask_token_id)
        decide(canvas, tok, prob, block_start=P, k=1, threshold=0.9, mask_id=cfg.mask_token_id,
               eos_id=cfg.eos_token_id, eotp="accepted")

    rows["decision_ms"] = bench(step_decision)
    rows["dual_step_over_floor"] = rows["dual_step_ms"] / floor_ms
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
