"""nabla-convert: turn dense video diffusion transformers into NABLA sparse-attention models.

The pipeline is calibrate -> convert -> adapt -> push; the attention core is in
`nabla_convert.attention`, one adapter per model family in `nabla_convert.models`.
"""

from nabla_convert.attention import TileLayout, block_sparse_attention, nabla_attention, nabla_block_mask
from nabla_convert.config import ConfigError, LayerSettings, NablaConfig
from nabla_convert.convert import ConvertError, convert, load
from nabla_convert.models.wan import (
    NablaWanTransformer3DModel,
    apply_nabla,
    layer_densities,
    nabla_disabled,
    remove_nabla,
    reset_densities,
)
from nabla_convert.recipes import Recipe, load_recipe

__all__ = [
    "ConfigError",
    "ConvertError",
    "LayerSettings",
    "NablaConfig",
    "NablaWanTransformer3DModel",
    "Recipe",
    "TileLayout",
    "apply_nabla",
    "block_sparse_attention",
    "convert",
    "layer_densities",
    "load",
    "load_recipe",
    "nabla_attention",
    "nabla_block_mask",
    "nabla_disabled",
    "remove_nabla",
    "reset_densities",
]
