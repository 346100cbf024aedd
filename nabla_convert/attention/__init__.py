"""NABLA attention core: tile order, block selection, block-sparse attention."""

from __future__ import annotations

import torch

from nabla_convert.attention.fast import nabla_selection, sta_selection
from nabla_convert.attention.flex import (
    BACKENDS,
    Backend,
    BlockSelection,
    RecompileLimitError,
    block_sparse_attention,
    dense_token_mask,
    padded_dense_attention,
    to_block_mask,
)
from nabla_convert.attention.mask import (
    Threshold,
    Window,
    block_density,
    nabla_block_mask,
    select_by_mass,
    sta_block_mask,
    sta_tile_mask,
)
from nabla_convert.attention.tiling import TileLayout


def nabla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: TileLayout | tuple[int, int, int],
    threshold: Threshold,
    sta: Window | None = None,
    q_block: int = 64,
    kv_block: int = 64,
    backend: Backend = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """NABLA attention of q, k, v (B, H, S, D), post-RoPE and in tile order.

    Selects key blocks per query block (`nabla_selection`: the selection of `nabla_block_mask`
    without a sort, fused Triton kernels on CUDA) and attends only to them (`block_sparse_attention`). Padding tokens of a padded TileLayout are never attended to.
    """
    selection = nabla_selection(q, k, threshold=threshold, grid=grid, sta=sta, q_block=q_block, kv_block=kv_block)
    return block_sparse_attention(q, k, v, selection, backend=backend, scale=scale)


__all__ = [
    "BACKENDS",
    "Backend",
    "BlockSelection",
    "RecompileLimitError",
    "Threshold",
    "TileLayout",
    "Window",
    "block_density",
    "block_sparse_attention",
    "dense_token_mask",
    "nabla_attention",
    "nabla_block_mask",
    "nabla_selection",
    "padded_dense_attention",
    "select_by_mass",
    "sta_block_mask",
    "sta_selection",
    "sta_tile_mask",
    "to_block_mask",
]
