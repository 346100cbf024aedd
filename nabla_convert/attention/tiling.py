"""Tile order: the token permutation that makes one attention block one spatial tile of one frame.

Video DiTs flatten latent tokens in raster order (frame, row, column). NABLA pools Q and K over
blocks of consecutive tokens, so blocks must be compact in space: tokens are regrouped frame-major,
tiles row-major inside a frame, pixels row-major inside a tile. A grid whose height or width is not
a multiple of the tile is padded with padding tokens; they are never attended to as keys and their
query rows are dropped when tokens go back to raster order, so results for real tokens are exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileLayout:
    """How a (frames, height, width) token grid maps onto padded tile order.

    `block` is the granularity the tile-order sequence is padded to (the least common multiple of
    the query and key block sizes, and of the context-parallel degree when the sequence is split
    across ranks), so that every attention block is complete and every rank gets an equal share.
    """

    frames: int
    height: int
    width: int
    tile_h: int = 8
    tile_w: int = 8
    block: int = 64

    def __post_init__(self) -> None:
        if min(self.frames, self.height, self.width) < 1:
            raise ValueError(f"token grid must be positive, got {self.token_grid}")
        if self.tile_h < 1 or self.tile_w < 1:
            raise ValueError(f"tile must be positive, got {self.tile_h}x{self.tile_w}")
        if self.block % self.tile_size:
            raise ValueError(f"block {self.block} is not a multiple of the tile size {self.tile_size}")

    @classmethod
    def for_blocks(
        cls,
        token_grid: tuple[int, int, int],
        tile: tuple[int, int] = (8, 8),
        q_block: int = 64,
        kv_block: int = 64,
        ranks: int = 1,
    ) -> TileLayout:
        """Layout for attention blocks of q_block x kv_block tokens; the padded length also divides by `ranks`."""
        return cls(*token_grid, tile_h=tile[0], tile_w=tile[1], block=math.lcm(q_block, kv_block, ranks))

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tile_size(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def grid(self) -> tuple[int, int, int]:
        """The tile grid (frames, tile rows, tile columns)."""
        return (self.frames, -(-self.height // self.tile_h), -(-self.width // self.tile_w))

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def num_tiles(self) -> int:
        return math.prod(self.grid)

    @property
    def padded_len(self) -> int:
        return -(-self.num_tiles * self.tile_size // self.block) * self.block

    @property
    def is_padded(self) -> bool:
        return self.padded_len != self.num_tokens

    def indices(self, device: torch.device | str = "cpu") -> TileIndices:
        return _tile_indices(self, torch.device(device))

    def to_tiles(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Raster order -> padded tile order along `dim` (padding tokens are zeros)."""
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens along dim {dim}, got {x.shape[dim]}")
        idx = self.indices(x.device)
        if self.is_padded:
            pad_shape = list(x.shape)
            pad_shape[dim] = 1
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        return x.index_select(dim, idx.tile_to_raster)

    def to_raster(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Padded tile order -> raster order along `dim`, dropping padding tokens."""
        if x.shape[dim] != self.padded_len:
            raise ValueError(f"expected {self.padded_len} tile-order tokens along dim {dim}, got {x.shape[dim]}")
        return x.index_select(dim, self.indices(x.device).raster_to_tile)


@dataclass(frozen=True)
class TileIndices:
    tile_to_raster: torch.Tensor  # (padded_len,) raster index, num_tokens for padding
    raster_to_tile: torch.Tensor  # (num_tokens,) tile-order position of each raster token
    valid: torch.Tensor  # (padded_len,) bool, False for padding tokens


@functools.lru_cache(maxsize=64)
def _tile_indices(layout: TileLayout, device: torch.device) -> TileIndices:
    T, Ht, Wt = layout.grid
    th, tw = layout.tile_h, layout.tile_w
    t = torch.arange(T).view(T, 1, 1, 1, 1)
    row = (torch.arange(Ht).view(1, Ht, 1, 1, 1) * th + torch.arange(th).view(1, 1, 1, th, 1)).expand(T, Ht, Wt, th, tw)
    col = (torch.arange(Wt).view(1, 1, Wt, 1, 1) * tw + torch.arange(tw).view(1, 1, 1, 1, tw)).expand(T, Ht, Wt, th, tw)
    inside = (row < layout.height) & (col < layout.width)
    raster = (t * layout.height + row) * layout.width + col
    raster = torch.where(inside, raster, layout.num_tokens).flatten()
    valid = inside.flatten()
    extra = layout.padded_len - raster.numel()
    if extra:
        raster = torch.cat([raster, torch.full((extra,), layout.num_tokens)])
        valid = torch.cat([valid, torch.zeros(extra, dtype=torch.bool)])
    raster_to_tile = torch.empty(layout.num_tokens, dtype=torch.long)
    raster_to_tile[raster[valid]] = torch.arange(layout.padded_len)[valid]
    return TileIndices(raster.to(device), raster_to_tile.to(device), valid.to(device))
