"""nabla-convert: turn dense video diffusion transformers into NABLA sparse-attention models.

The pipeline is calibrate -> convert -> adapt -> push; the attention core is in
`nabla_convert.attention`, one adapter per model family in `nabla_convert.models`.
"""

from __future__ import annotations

import importlib
from typing import Any

from nabla_convert.config import ConfigError, LayerSettings, NablaConfig
from nabla_convert.convert import ConvertError, convert, load
from nabla_convert.recipes import Recipe, load_recipe

# What needs torch or diffusers loads on first use (PEP 562), so that `nabla-convert --help` and the light commands
# do not pay for them or the training stack. diffusers' pipeline loader finds a component's load method by looking
# up base classes by name in the component's library (model_index.json: ["nabla_convert",
# "NablaWanTransformer3DModel"]), so the package also exports ModelMixin for stock WanPipeline.from_pretrained.
_LAZY = {
    "ModelMixin": "diffusers",
    "TileLayout": "nabla_convert.attention",
    "block_sparse_attention": "nabla_convert.attention",
    "nabla_attention": "nabla_convert.attention",
    "nabla_block_mask": "nabla_convert.attention",
    "NablaWanTransformer3DModel": "nabla_convert.models.wan",
    "apply_nabla": "nabla_convert.models.wan",
    "layer_densities": "nabla_convert.models.wan",
    "nabla_disabled": "nabla_convert.models.wan",
    "remove_nabla": "nabla_convert.models.wan",
    "reset_densities": "nabla_convert.models.wan",
}

__all__ = [
    "ConfigError",
    "ConvertError",
    "LayerSettings",
    "ModelMixin",
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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
