"""NABLA block selection: which key blocks each query block attends to.

Composable pieces (each checked against a brute-force reference in tests/):
`pool_blocks` -> `block_scores` -> `select_by_mass`, optionally OR `sta_block_mask`. The public
entry point `nabla_block_mask` chains them exactly as the NABLA paper (arXiv 2507.13546) and its public code do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from nabla_convert.attention.tiling import TileLayout
from nabla_convert.config import check_threshold

Window = tuple[int, int, int]
Threshold = float | Sequence[float] | torch.Tensor  # one for every head, or one per head (H,)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def as_layout(grid: TileLayout | tuple[int, int, int], q_block: int, kv_block: int) -> TileLayout:
    """A tile grid (T, H_tiles, W_tiles) means 8x8 tiles and no padding; a TileLayout is used as is."""
    if isinstance(grid, TileLayout):
        need = math.lcm(q_block, kv_block)
        if grid.block % need:
            raise ValueError(f"layout block {grid.block} is not a multiple of the q/kv blocks ({q_block}, {kv_block})")
        return grid
    T, Ht, Wt = grid
    return TileLayout.for_blocks((T, Ht * 8, Wt * 8), (8, 8), q_block, kv_block)


def head_thresholds(threshold: Threshold, scores: torch.Tensor) -> torch.Tensor:
    """The threshold as float32 that broadcasts over scores (B, H, rows, cols): 0-dim, or (H, 1, 1) per head."""
    values = torch.as_tensor(threshold, dtype=torch.float32, device=scores.device)
    if values.dim() == 0:
        return values
    if scores.dim() < 3 or values.shape != scores.shape[-3:-2]:
        raise ValueError(
            f"{values.numel()} per-head thresholds for scores of shape {tuple(scores.shape)} (B, H, rows, cols)"
        )
    return values.view(-1, 1, 1)


def checked_layout(
    q: torch.Tensor, k: torch.Tensor, grid: TileLayout | tuple[int, int, int], q_block: int, kv_block: int
) -> TileLayout:
    """The layout of q, k (B, H, S, D) in tile order, checked against their length."""
    layout = as_layout(grid, q_block, kv_block)
    if q.shape[-2] != layout.padded_len or k.shape[-2] != layout.padded_len:
        raise ValueError(
            f"q/k have {q.shape[-2]}/{k.shape[-2]} tokens, the layout {layout.token_grid} needs {layout.padded_len}"
        )
    return layout


def pool_blocks(
    x: torch.Tensor, block: int, valid: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of x (B, H, S, D) over consecutive blocks of `block` tokens, in `dtype`.

    With a token validity vector (S,), padding tokens are left out of the mean. Returns the pooled
    (B, H, S/block, D) tensor and the number of real tokens per block (S/block,).
    """
    B, H, S, D = x.shape
    if S % block:
        raise ValueError(f"sequence length {S} is not a multiple of the block size {block}")
    xb = x.to(dtype).reshape(B, H, S // block, block, D)
    if valid is None:
        return xb.mean(-2), torch.full((S // block,), block, device=x.device)
    w = valid.to(dtype).view(1, 1, S // block, block, 1)
    counts = valid.view(S // block, block).sum(-1)
    return (xb * w).sum(-2) / counts.clamp(min=1).to(dtype).view(1, 1, -1, 1), counts


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_block: int,
    kv_block: int,
    valid: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over key blocks of the pooled map Qa Ka^T / sqrt(D), (B, H, nq, nk), computed in `dtype`.

    Key blocks made only of padding get probability 0. Also returns which key blocks hold real tokens.
    """
    qa, _ = pool_blocks(q, q_block, valid, dtype)
    ka, kv_counts = pool_blocks(k, kv_block, valid, dtype)
    logits = qa @ ka.transpose(-1, -2) / math.sqrt(q.shape[-1])
    kv_real = kv_counts > 0
    logits = logits.masked_fill(~kv_real, float("-inf"))
    return torch.softmax(logits, dim=-1), kv_real


def select_by_mass(probs: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Per row, keep the smallest set of largest entries whose total mass reaches `threshold`.

    Same selection as the reference (sort ascending, cumsum, keep cumsum >= 1 - threshold) with one
    descending sort: an entry is kept when the mass of the entries above it is at most `threshold`.
    Entries tied with the last kept value are kept too; a threshold of 1 keeps every entry, 0 none (STA alone).
    A per-head threshold (H,) applies to every row of head h of probs (B, H, rows, cols).
    """
    if not isinstance(threshold, torch.Tensor):
        check_threshold(threshold)
    limit = head_thresholds(threshold, probs)
    desc, _ = probs.sort(dim=-1, descending=True)
    above = desc.cumsum(-1) - desc
    count = (above <= limit).sum(-1, keepdim=True)
    cut = desc.gather(-1, count - 1)
    return ((probs >= cut) & (limit > 0.0)) | (limit >= 1.0)


def select_by_sorted_cumsum(probs: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """The public references' cut, op for op in the dtype of `probs`: sort ascending, cumulative sum,
    keep cumsum >= 1 - threshold, scatter back (ties at the cut resolved by the sort's order).

    Serves selection_precision "bfloat16", where it reproduces their selection exactly.
    """
    if not isinstance(threshold, torch.Tensor):
        check_threshold(threshold)
    limit = head_thresholds(threshold, probs)  # 0-dim, or (H, 1, 1) per head
    values, order = probs.sort(-1)
    kept = (values.cumsum(-1) >= (1 - limit).to(probs.dtype)) & (limit > 0.0) | (limit >= 1.0)
    return kept.gather(-1, order.argsort(-1))


def sta_tile_mask(grid: tuple[int, int, int], window: Window, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sliding-tile window over the tile grid: (n_tiles, n_tiles) bool, |dt|<=wT//2, |dh|<=wH//2, |dw|<=wW//2."""
    return _sta_tile_mask(tuple(grid), tuple(window), torch.device(device))


@functools.lru_cache(maxsize=32)
def _sta_tile_mask(grid: tuple[int, int, int], window: Window, device: torch.device) -> torch.Tensor:
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"STA window must be three positive sizes (wT, wH, wW), got {window}")
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    half = torch.tensor([w // 2 for w in window], device=device)
    return ((coords[:, None, :] - coords[None, :, :]).abs() <= half).all(-1)


def sta_block_mask(
    layout: TileLayout, window: Window, q_block: int, kv_block: int, device: torch.device | str
) -> torch.Tensor:
    """STA window at block level (nq, nk): a block pair is in when any of their tile pairs is."""
    tiles = sta_tile_mask(layout.grid, window, device)
    per_q, per_kv = q_block // layout.tile_size, kv_block // layout.tile_size
    n_tiles = layout.padded_len // layout.tile_size
    pad = n_tiles - tiles.shape[0]
    tiles = torch.nn.functional.pad(tiles, (0, pad, 0, pad))
    nq, nk = n_tiles // per_q, n_tiles // per_kv
    return tiles.view(nq, per_q, nk, per_kv).any(dim=3).any(dim=1)


def nabla_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    threshold: Threshold,
    grid: TileLayout | tuple[int, int, int],
    sta: Window | None = None,
    q_block: int = 64,
    kv_block: int = 64,
    precision: str = "float32",
) -> torch.Tensor:
    """NABLA's adaptive block mask: (B, H, n_q_blocks, n_kv_blocks) bool.

    q, k: (B, H, S, D) post-RoPE, in tile order. `grid` is the tile grid (T, H_tiles, W_tiles) of
    8x8 tiles, or a TileLayout (which also describes padding). With q_block=128 and kv_block=64 a
    query block is two consecutive tiles in tile order (neighbours along the tile row, or the row
    wrap): Q is pooled over its 128 tokens and the selection is made once for the pair; the STA
    window of the pair is the union of the windows of its two tiles. `threshold` is one number, or
    one per head (H,).
    precision "bfloat16" computes the scores and the cut as the public references do (`select_by_sorted_cumsum`).
    """
    layout = checked_layout(q, k, grid, q_block, kv_block)
    valid = layout.indices(q.device).valid if layout.is_padded else None
    probs, kv_real = block_scores(q, k, q_block, kv_block, valid, PRECISIONS[precision])
    keep = (select_by_sorted_cumsum if precision == "bfloat16" else select_by_mass)(probs, threshold)
    sta_blocks = sta_block_mask(layout, sta, q_block, kv_block, q.device) if sta is not None else None
    return compose_mask(keep, sta_blocks, kv_real)


def compose_mask(selected: torch.Tensor, sta_blocks: torch.Tensor | None, kv_real: torch.Tensor) -> torch.Tensor:
    """The blocks attention computes: the selection by mass OR the STA window (when there is one), restricted to the
    key blocks that hold real tokens (kv_real, (nk,))."""
    keep = selected if sta_blocks is None else selected | sta_blocks
    return keep & kv_real


def real_blocks(layout: TileLayout, block: int, device: torch.device | str) -> torch.Tensor:
    """(S / block,) bool: which blocks of `block` tokens in tile order hold at least one real (not padding) token."""
    return layout.indices(device).valid.view(-1, block).any(-1)


def block_density(
    keep: torch.Tensor, layout: TileLayout | None = None, q_block: int = 64, kv_block: int = 64
) -> torch.Tensor:
    """Fraction of (query block, key block) pairs computed, over blocks that hold real tokens (0-dim, no sync)."""
    if layout is None or not layout.is_padded:
        return keep.float().mean()
    pairs = real_blocks(layout, q_block, keep.device)[:, None] & real_blocks(layout, kv_block, keep.device)[None, :]
    return (keep & pairs).sum(dim=(-1, -2)).float().mean() / pairs.sum()
