"""nabla-convert: turn dense video diffusion transformers into NABLA sparse-attention models.

The pipeline is calibrate -> convert -> adapt -> push; the attention core is in
`nabla_convert.attention`, one adapter per model family in `nabla_convert.models`.
"""

# diffusers' pipeline loader finds a component's class and load method by name in the component's library
# (model_index.json: ["nabla_convert", "<NABLA class>"]), so the package exports every family's NABLA
# transformer class and ModelMixin for stock Pipeline.from_pretrained to load converted checkpoints.
from diffusers import ModelMixin

from nabla_convert.attention import TileLayout, block_sparse_attention, nabla_attention, nabla_block_mask
from nabla_convert.config import ConfigError, LayerSettings, NablaConfig
from nabla_convert.convert import ConvertError, convert, load
from nabla_convert.models import family_of, nabla_classes
from nabla_convert.models.nabla import apply_nabla, layer_densities, nabla_disabled, remove_nabla, reset_densities
from nabla_convert.recipes import Recipe, load_recipe

globals().update(nabla_classes())

__all__ = [
    "ConfigError",
    "ConvertError",
    "LayerSettings",
    "ModelMixin",
    "NablaConfig",
    "Recipe",
    "TileLayout",
    "apply_nabla",
    "block_sparse_attention",
    "convert",
    "family_of",
    "layer_densities",
    "load",
    "load_recipe",
    "nabla_attention",
    "nabla_block_mask",
    "nabla_disabled",
    "remove_nabla",
    "reset_densities",
    *nabla_classes(),
]
