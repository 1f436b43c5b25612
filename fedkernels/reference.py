"""Pure-torch reference math: the oracle every kernel and fast path is tested against.

Readable over fast, dtype-generic (run it in float64 for ground truth). Shapes follow peft:
``lora_A`` is ``[R, in]``, ``lora_B`` is ``[out, R]`` and the adapter adds ``scale * B @ A`` to the
frozen weight ``[out, in]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "lora_linear_ref",
    "multi_lora_linear_ref",
    "rank_prefix_mask",
]


def rank_prefix_mask(active_rank: int, max_rank: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """0/1 vector of length ``max_rank`` with ones on the first ``active_rank`` entries."""
    mask = torch.zeros(max_rank, dtype=dtype, device=device)
    mask[:active_rank] = 1
    return mask


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    rank_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + scale * ((x A^T) * m) B^T``.

    Args:
        x: ``[..., in]`` input.
        weight: ``[out, in]`` frozen base weight.
        bias: ``[out]`` or None.
        lora_A: ``[R, in]``.
        lora_B: ``[out, R]``.
        scale: LoRA scaling (alpha / r, or alpha / sqrt(r) for rsLoRA).
        rank_mask: ``[R]`` 0/1 mask of the ranks in use; None means all ranks.
    """
    h = x @ lora_A.T
    if rank_mask is not None:
        h = h * rank_mask.to(h.dtype)
    return F.linear(x, weight, bias) + scale * (h @ lora_B.T)


def multi_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    client_ids: torch.Tensor,
) -> torch.Tensor:
    """Base layer plus, for each token, its own client's adapter truncated to that client's rank.

    Args:
        x: ``[T, in]`` tokens of all clients.
        weight, bias: the shared frozen base layer.
        lora_A: ``[K, R, in]`` one adapter per client; ``lora_B``: ``[K, out, R]``.
        scales: ``[K]`` per-client scaling; ``ranks``: ``[K]`` per-client active rank (prefix).
        client_ids: ``[T]`` client of each token; ``-1`` means base layer only (no LoRA).
    """
    y = F.linear(x, weight, bias)
    num_clients, max_rank = lora_A.shape[0], lora_A.shape[1]
    out = y.clone()
    for c in range(num_clients):
        rows = (client_ids == c).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        r = int(ranks[c])
        mask = rank_prefix_mask(r, max_rank, dtype=x.dtype, device=x.device)
        h = (x[rows] @ lora_A[c].T) * mask
        out = out.index_add(0, rows, scales[c].to(x.dtype) * (h @ lora_B[c].T))
    return out
