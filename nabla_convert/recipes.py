"""Recipes: NABLA settings and the calibrate/adapt plans that go with them, as YAML data.

A recipe file has these top-level keys (all but `nabla` optional):
  name, description: what the recipe is and where its numbers come from;
  nabla:      NablaConfig fields (threshold, sta, tile, q_block, kv_block, dense_steps, dense_layers, layers, backend);
  calibrate:  candidate thresholds / STA windows and the target the per-layer search aims at;
  adapt:      fine-tune settings (loss, steps, lr, lora_rank, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nabla_convert.config import ConfigError, NablaConfig, check_mapping
from nabla_convert.io import read_text
from nabla_convert.shipped import shipped_folder

RECIPES_DIR = shipped_folder("recipes")
RECIPE_KEYS = {"name", "description", "nabla", "calibrate", "adapt"}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    nabla: NablaConfig
    calibrate: dict[str, Any] = field(default_factory=dict)
    adapt: dict[str, Any] = field(default_factory=dict)


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe path, or the name of one shipped in recipes/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = path.name == str(name_or_path) and path.name not in ("", ".", "..")  # a name, not a path elsewhere
    for candidate in (RECIPES_DIR / f"{path.name}.yaml", RECIPES_DIR / path.name) if named else ():
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise ConfigError(f"recipe not found: {name_or_path} (shipped recipes: {', '.join(shipped) or 'none'})")


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        data = yaml.safe_load(read_text(path, "recipe"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping with a 'nabla' section")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown recipe keys {sorted(unknown)}; known: {sorted(RECIPE_KEYS)}")
    if "nabla" not in data:
        raise ConfigError(f"{path}: a recipe needs a 'nabla' section")
    name, description = data.get("name", path.stem), data.get("description", "")
    try:
        for key, value in (("name", name), ("description", description)):
            if not isinstance(value, str):
                raise ConfigError(f"{key} must be text, got {value!r}")
        sections = {key: check_mapping(data.get(key) or {}, key) for key in ("nabla", "calibrate", "adapt")}
        nabla = NablaConfig.from_dict(sections["nabla"])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return Recipe(
        name=name,
        description=description.strip(),
        nabla=nabla.with_provenance(recipe=name),
        calibrate=sections["calibrate"],
        adapt=sections["adapt"],
    )
