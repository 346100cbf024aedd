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
# do not pay for them or the training stack. diffusers' pipeline loader finds a component's class and load method
# by name in the component's library (model_index.json: ["nabla_convert", "<NABLA class>"]), so the package also
# exports ModelMixin and every family's NABLA transformer class (looked up in the registry) for stock
# Pipeline.from_pretrained.
_LAZY = {
    "ModelMixin": "diffusers",
    "TileLayout": "nabla_convert.attention",
    "block_sparse_attention": "nabla_convert.attention",
    "nabla_attention": "nabla_convert.attention",
    "nabla_block_mask": "nabla_convert.attention",
    "apply_nabla": "nabla_convert.models.nabla",
    "family_of": "nabla_convert.models",
    "layer_densities": "nabla_convert.models.nabla",
    "nabla_disabled": "nabla_convert.models.nabla",
    "remove_nabla": "nabla_convert.models.nabla",
    "reset_densities": "nabla_convert.models.nabla",
}

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
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name.startswith("Nabla") and name in (
        classes := importlib.import_module("nabla_convert.models").nabla_classes()
    ):
        value = classes[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
