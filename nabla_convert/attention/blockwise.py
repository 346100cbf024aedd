"""Exact attention over any set of key blocks from per-block softmax partials, as flash attention keeps them.

Partials are computed once per row; each candidate set of key blocks then costs one weighted sum instead of a new
attention pass (calibrate measures the output of every candidate setting on the same rows this way).
"""

from __future__ import annotations

import torch


def block_partials(
    scores: torch.Tensor, values: torch.Tensor, kv_block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, key block) softmax partials of scores (B, H, R, S) and values (B, H, S, D), as flash attention keeps them.

    Returns the block max M (B, H, R, nk), the normaliser Z = sum exp(s - M) and the weighted values
    U = sum exp(s - M) v (B, H, R, nk, D). Blocks made only of padding (-inf scores) get Z = U = 0.
    """
    blocked = scores.unflatten(-1, (-1, kv_block))
    block_max = blocked.amax(-1)
    block_max = block_max.masked_fill(block_max.isinf(), 0.0)
    weights = torch.exp(blocked - block_max[..., None])
    weighted = torch.einsum("bhrnk,bhnkd->bhrnd", weights, values.unflatten(-2, (-1, kv_block)))
    return block_max, weights.sum(-1), weighted.contiguous()  # einsum may return a permuted view


def combine_blocks(
    block_max: torch.Tensor, norm: torch.Tensor, weighted: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Exact attention output (B, H, R, D) over the kept key blocks (B, H, R, nk) from their softmax partials."""
    top = block_max.masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)
    scale = torch.where(keep, torch.exp(block_max - top), 0.0)
    # a batched (1, nk) @ (nk, D) product reads `weighted` in place (einsum would copy it for every candidate)
    return (scale.unsqueeze(-2) @ weighted).squeeze(-2) / (scale * norm).sum(-1, keepdim=True)
