"""The per-step decision as the public Learn2PD / Fast-dLLM loops do it: float64 softmax over the whole
vocabulary, gather, then per row a host read of the candidate count and a top-k. A speed baseline only."""

import torch
import torch.nn.functional as F


def public_style_decide(logits: torch.Tensor, canvas: torch.Tensor, block_start: int, mask_id: int,
                        threshold: float = 0.9) -> torch.Tensor:
    B, L, _ = logits.shape
    block = canvas[:, block_start : block_start + L]
    mask_index = block == mask_id
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0 = torch.argmax(logits, dim=-1)
    x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
    confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -float("inf")))
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(B):
        num = int((confidence[j] > threshold).sum().item())  # a host sync per row
        _, idx = torch.topk(confidence[j], k=max(num, 1))
        transfer[j, idx] = True
    block[transfer] = x0[transfer]
    return canvas
