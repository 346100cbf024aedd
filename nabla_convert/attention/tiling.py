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

    def real_blocks(self, block: int) -> int:
        """How many leading blocks of `block` tokens hold real tokens (every tile does; only trailing blocks are all padding)."""
        return -(-self.num_tiles * self.tile_size // block)

    @property
    def is_padded(self) -> bool:
        return self.padded_len != self.num_tokens

    def indices(self, device: torch.device | str = "cpu") -> TileIndices:
        return _tile_indices(self, torch.device(device))

    def to_tiles(self, x: torch.Tensor, dim: int = 1, padded: bool = True) -> torch.Tensor:
        """Raster order -> tile order along `dim`: padded (padding tokens are zeros) or compact (left out)."""
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens along dim {dim}, got {x.shape[dim]}")
        idx = self.indices(x.device)
        if not padded:
            return x.index_select(dim, idx.compact_to_raster)
        return _with_zero_token(x, dim, self.is_padded).index_select(dim, idx.tile_to_raster)

    def to_raster(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Padded or compact tile order -> raster order along `dim`, dropping padding tokens."""
        idx = self.indices(x.device)
        if x.shape[dim] == self.padded_len:
            return x.index_select(dim, idx.raster_to_tile)
        if x.shape[dim] == self.num_tokens:
            return x.index_select(dim, idx.raster_to_compact)
        raise ValueError(
            f"expected {self.padded_len} (padded) or {self.num_tokens} (compact) tile-order tokens along dim {dim}, "
            f"got {x.shape[dim]}"
        )

    def pad(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Compact tile order -> padded tile order along `dim` (zeros at padding); under torch.compile the
        gather fuses into the kernel that produced x."""
        if not self.is_padded:
            return x
        return _with_zero_token(x, dim, True).index_select(dim, self.indices(x.device).padded_from_compact)

    def unpad(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Padded tile order -> compact tile order along `dim`."""
        if not self.is_padded:
            return x
        return x.index_select(dim, self.indices(x.device).compact_to_padded)


def _with_zero_token(x: torch.Tensor, dim: int, add: bool) -> torch.Tensor:
    """x with one zero token appended along `dim` (the gather source of padding tokens)."""
    if not add:
        return x
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


@dataclass(frozen=True)
class TileIndices:
    """Index maps between raster order, padded tile order and compact tile order (tile order without padding).

    A padded position's source is num_tokens (one appended zero token) where it holds padding.
    """

    tile_to_raster: torch.Tensor  # (padded_len,) raster index, num_tokens for padding
    raster_to_tile: torch.Tensor  # (num_tokens,) padded tile-order position of each raster token
    valid: torch.Tensor  # (padded_len,) bool, False for padding tokens
    compact_to_raster: torch.Tensor  # (num_tokens,) raster index of each compact tile-order token
    raster_to_compact: torch.Tensor  # (num_tokens,) compact position of each raster token
    padded_from_compact: torch.Tensor  # (padded_len,) compact index, num_tokens for padding
    compact_to_padded: torch.Tensor  # (num_tokens,) padded position of each compact token


@functools.lru_cache(maxsize=64)
def _tile_indices(layout: TileLayout, device: torch.device) -> TileIndices:
    """Built on `device` from static-shape ops only (no boolean indexing), so torch.compile traces it whole."""
    T, Ht, Wt = layout.grid
    th, tw = layout.tile_h, layout.tile_w

    def arange(n: int) -> torch.Tensor:
        return torch.arange(n, device=device)

    t = arange(T).view(T, 1, 1, 1, 1)
    row = (arange(Ht).view(1, Ht, 1, 1, 1) * th + arange(th).view(1, 1, 1, th, 1)).expand(T, Ht, Wt, th, tw)
    col = (arange(Wt).view(1, 1, Wt, 1, 1) * tw + arange(tw).view(1, 1, 1, 1, tw)).expand(T, Ht, Wt, th, tw)
    inside = (row < layout.height) & (col < layout.width)
    raster = (t * layout.height + row) * layout.width + col
    raster = torch.where(inside, raster, layout.num_tokens).flatten()
    valid = inside.flatten()
    extra = layout.padded_len - raster.numel()
    if extra:
        raster = torch.cat([raster, raster.new_full((extra,), layout.num_tokens)])
        valid = torch.cat([valid, valid.new_zeros(extra)])
    positions = arange(layout.padded_len)
    # padding tokens all scatter into the extra slot num_tokens, which is dropped
    raster_to_tile = raster.new_zeros(layout.num_tokens + 1).scatter_(0, raster, positions)[: layout.num_tokens]
    padded_from_compact = torch.where(valid, valid.cumsum(0) - 1, layout.num_tokens)
    compact_to_padded = raster.new_zeros(layout.num_tokens + 1).scatter_(0, padded_from_compact, positions)
    compact_to_padded = compact_to_padded[: layout.num_tokens]
    return TileIndices(
        tile_to_raster=raster,
        raster_to_tile=raster_to_tile,
        valid=valid,
        compact_to_raster=raster.index_select(0, compact_to_padded),
        raster_to_compact=padded_from_compact.index_select(0, raster_to_tile),
        padded_from_compact=padded_from_compact,
        compact_to_padded=compact_to_padded,
    )
