"""Model families as adapters: one file per family, looked up by transformer class.

Everything family-specific (which modules are self-attention, where tokens go into tile order, how
a pipeline is built and prompts encoded, what one denoising call looks like, card tags, the block
class to shard) lives in a `ModelFamily` subclass in its own module here; the rest of nabla-convert
asks the registry, as torchao's handler table and diffusers' TransformerBlockRegistry do. A family
registers its dense diffusers transformer classes; subclasses (the NABLA classes, user subclasses)
are found through the class's MRO.

Adding a family = one module in FAMILY_MODULES with a registered ModelFamily, plus its tests.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nabla_convert.config import ConfigError

if TYPE_CHECKING:
    from nabla_convert.models.family import ModelFamily

TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")  # pipeline components a family's transformers may be
FAMILY_MODULES = ("nabla_convert.models.wan", "nabla_convert.models.kandinsky5", "nabla_convert.models.hunyuan_video")
_REGISTRY: dict[type, ModelFamily] = {}
_loaded = False


def register(family: ModelFamily) -> ModelFamily:
    """Register `family` for each of its dense transformer classes (and so for their subclasses)."""
    for cls in family.transformer_classes:
        _REGISTRY[cls] = family
    return family


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _loaded = True


def families() -> list[ModelFamily]:
    _load()
    return list(dict.fromkeys(_REGISTRY.values()))


def family_of(model: Any) -> ModelFamily:
    """The family of a transformer (instance or class); the first registered class in its MRO decides."""
    _load()
    cls = model if isinstance(model, type) else type(model)
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
    raise ConfigError(f"no NABLA adapter for {cls.__name__}; supported transformers: {known}")


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a pipeline: by its class (one the family tags for the Hub), else by its transformer."""
    for cls in type(pipe).__mro__:
        for family in families():
            if cls.__name__ in family.pipeline_tags:
                return family
    return family_of(getattr(pipe, "transformer", None))


def family_for_class_name(name: Any) -> ModelFamily | None:
    """The family whose dense or NABLA transformer class is called `name` (a config.json _class_name)."""
    for family in families():
        if name in family.class_names():
            return family
    return None


def family_for_arch(arch: str) -> ModelFamily:
    """The family that ships the architecture preset `arch` (bench --arch)."""
    for family in families():
        if arch in family.archs:
            return family
    known = ", ".join(name for family in families() for name in family.archs)
    raise ConfigError(f"unknown preset {arch!r} (--arch); choose one of {known}")


def nabla_classes() -> dict[str, type]:
    """Name -> NABLA transformer class of every family (the package exports them for stock diffusers loading)."""
    return {family.nabla_class.__name__: family.nabla_class for family in families()}


def all_pipeline_tags() -> dict[str, str]:
    """Pipeline class name -> Hub pipeline tag, over all families."""
    return {name: tag for family in families() for name, tag in family.pipeline_tags.items()}


__all__ = [
    "FAMILY_MODULES",
    "TRANSFORMER_COMPONENTS",
    "all_pipeline_tags",
    "families",
    "family_for_arch",
    "family_for_class_name",
    "family_of",
    "family_of_pipeline",
    "nabla_classes",
    "register",
]
