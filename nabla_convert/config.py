"""NablaConfig: what a converted model does in each self-attention layer, as data.

A config has model-level settings (tile, block sizes, dense steps, backend, selection precision) and
per-layer settings (threshold, STA window, or dense); a layer's threshold is one number or a list of one
per attention head. Threshold 0 with an STA window is STA alone (the official `sta-wT-wH-wW` mode). It is
stored inside the checkpoint (the transformer's config.json, key `_nabla`), so a converted folder describes
itself.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from nabla_convert.errors import NablaError
from nabla_convert.io import atomic_write_text, read_json

SCHEMA_VERSION = 1
BACKENDS = ("auto", "flex", "flex_eager", "reference")
CONFIG_KEY = "_nabla"
SELECTION_PRECISIONS = ("float32", "bfloat16")


class ConfigError(NablaError, ValueError):
    """A NABLA config or recipe that cannot be used, with a message that says why."""


# Schema checks for values read from JSON and YAML: they refuse what is not already the right type instead of
# coercing it (the string "12" is not the layer list [1, 2], true is not the threshold 1.0).


def check_int(value: Any, where: str, minimum: int | None = None) -> int:
    """An integer (Python's or numpy's; not a bool, a float or a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} must be at least {minimum}, got {value}")
    return int(value)


def check_number(value: Any, where: str) -> float:
    """A finite int or float (Python's or numpy's; not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def check_int_list(value: Any, where: str, minimum: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of integers, got {value!r}")
    return tuple(check_int(item, f"{where} item", minimum) for item in value)


def check_number_list(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
    return tuple(check_number(item, f"{where} item") for item in value)


def check_mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {value!r}")
    return value


def check_video_size(height: int, width: int, where: str = "") -> None:
    """The video VAEs (8x) and patch (2x) of the supported families need frame sides that are multiples of 16."""
    for name, side in (("height", height), ("width", width)):
        if side % 16:
            raise ConfigError(f"{where}{name} must be a multiple of 16 (the VAE's and patch's size), got {side}")


def parse_window(value: Any) -> tuple[int, int, int] | None:
    """STA window from None, "11,3,3", "11-3-3" (command-line text) or a 3-sequence of positive ints."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            window = tuple(int(p) for p in value.replace("-", ",").replace("x", ",").split(","))
        except ValueError:
            raise ConfigError(f"STA window must be three integers like 11,3,3, got {value!r}") from None
    else:
        window = check_int_list(value, "STA window")
    if len(window) != 3 or min(window) < 1:
        raise ConfigError(f"STA window must be three positive integers (wT, wH, wW), got {value!r}")
    return window  # type: ignore[return-value]


def check_sta_only(threshold: float | tuple[float, ...], sta: Any, where: str) -> None:
    if threshold == 0.0 and sta is None:
        raise ConfigError(f"{where}: threshold 0 keeps no block by mass; it needs an STA window (STA only)")


Threshold = float | tuple[float, ...]


def check_threshold(value: Any, where: str = "threshold", per_head: bool = True) -> Threshold:
    """One threshold in [0, 1] (0 keeps no block by mass: the STA window alone), or (`per_head`) a non-empty list of
    one per attention head, each in [0, 1]. The one range check of thresholds: configs, recipes, attention calls."""
    if per_head and isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{where} must be a number or a non-empty list of per-head numbers, got {value!r}")
        return tuple(check_threshold(item, f"{where} of head {head}") for head, item in enumerate(value))
    threshold = check_number(value, where)
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"{where} must be in [0, 1] (0 = STA window only), got {threshold}")
    return threshold


def check_layer_threshold(value: Any, where: str = "threshold") -> Threshold:
    """A layer's threshold: one for every head (0 = STA window only), or a list of one per attention head, each in
    (0, 1] (STA only is a layer setting)."""
    threshold = check_threshold(value, where)
    if isinstance(threshold, tuple) and min(threshold) == 0.0:
        raise ConfigError(f"{where}: per-head thresholds must be in (0, 1] (STA only is a layer setting)")
    return threshold


def threshold_text(threshold: Threshold | list[float]) -> str:
    """A threshold for tables: "0.7", or the per-head values separated by spaces."""
    values = threshold if isinstance(threshold, (list, tuple)) else (threshold,)
    return " ".join(f"{value:g}" for value in values)


@dataclass(frozen=True)
class LayerSettings:
    """One self-attention layer: dense, or NABLA at `threshold` (1.0 keeps every block, 0 none) OR `sta`.

    `threshold` is one number for every head or a tuple of one per head (`NablaConfig.check_num_heads`).
    """

    threshold: Threshold = 0.7
    sta: tuple[int, int, int] | None = None
    dense: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_layer_threshold(self.threshold))
        object.__setattr__(self, "sta", parse_window(self.sta))
        if not isinstance(self.dense, bool):
            raise ConfigError(f"dense must be true or false, got {self.dense!r}")
        if not self.dense:
            check_sta_only(self.threshold, self.sta, "layer settings")

    @property
    def sta_only(self) -> bool:
        """Threshold 0 with an STA window: the window alone, no scores (a static choice, not a value test)."""
        return not self.dense and self.threshold == 0.0 and self.sta is not None

    @property
    def per_head(self) -> bool:
        return isinstance(self.threshold, tuple)

    @property
    def keeps_all(self) -> bool:
        """Dense in effect: no STA window and every head's threshold keeps every block."""
        values = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,)
        return self.dense or (self.sta is None and min(values) >= 1.0)

    def thresholds(self, num_heads: int) -> tuple[float, ...]:
        """One threshold per head (a single threshold repeated)."""
        if isinstance(self.threshold, tuple):
            if len(self.threshold) != num_heads:
                raise ConfigError(f"{len(self.threshold)} per-head thresholds for {num_heads} attention heads")
            return self.threshold
        return (self.threshold,) * num_heads

    def to_dict(self) -> dict[str, Any]:
        threshold = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        return {"threshold": threshold, "sta": list(self.sta) if self.sta else None, "dense": self.dense}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "layer") -> LayerSettings:
        unknown = set(check_mapping(data, where)) - {"threshold", "sta", "dense"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


@dataclass(frozen=True)
class NablaConfig:
    """Model-level NABLA settings and per-layer overrides (layer index -> LayerSettings).

    selection_precision: "float32" (pooling, pooled map, softmax and cut in float32: matches a
    float64 selection) or "bfloat16" (the public references' arithmetic: q and k cast to bf16, pooled,
    multiplied and soft-maxed in bf16, cut by sort and cumulative sum; for checkpoints fine-tuned so).
    """

    threshold: float = 0.7
    sta: tuple[int, int, int] | None = None
    tile: tuple[int, int] = (8, 8)
    q_block: int = 64
    kv_block: int = 64
    dense_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    layers: dict[int, LayerSettings] = field(default_factory=dict)
    backend: str = "auto"
    selection_precision: str = "float32"
    schema_version: int = SCHEMA_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold, per_head=False))
        object.__setattr__(self, "sta", parse_window(self.sta))
        check_sta_only(self.threshold, self.sta, "config")
        if self.selection_precision not in SELECTION_PRECISIONS:
            raise ConfigError(
                f"selection_precision must be one of {SELECTION_PRECISIONS}, got {self.selection_precision!r}"
            )
        tile = check_int_list(self.tile, "tile", minimum=1)
        if len(tile) != 2:
            raise ConfigError(f"tile must be two positive integers, got {self.tile!r}")
        object.__setattr__(self, "tile", tile)
        tile_size = tile[0] * tile[1]
        for name in ("q_block", "kv_block"):
            size = check_int(getattr(self, name), name)
            if size < tile_size or size % tile_size:
                raise ConfigError(f"{name} must be a positive multiple of the tile size {tile_size}, got {size!r}")
        check_int(self.dense_steps, "dense_steps", minimum=0)
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if check_int(self.schema_version, "schema_version") > SCHEMA_VERSION:
            raise ConfigError(
                f"config schema {self.schema_version} is newer than this nabla-convert ({SCHEMA_VERSION}); upgrade it"
            )
        check_mapping(self.provenance, "provenance")
        dense_layers = check_int_list(self.dense_layers, "dense_layers", minimum=0)
        object.__setattr__(self, "dense_layers", tuple(sorted(set(dense_layers))))
        layers = {}
        for index, settings in check_mapping(self.layers, "layers").items():
            if isinstance(index, str) and index.isdigit() and index.isascii():  # JSON object keys are strings
                index = int(index)
            check_int(index, "a layers key (a layer index)", minimum=0)
            if not isinstance(settings, LayerSettings):
                settings = LayerSettings.from_dict(settings, where=f"layer {index}")
            layers[index] = settings
        object.__setattr__(self, "layers", dict(sorted(layers.items())))

    def layer(self, index: int) -> LayerSettings:
        """Settings of self-attention layer `index` (overrides, then dense_layers, then the default)."""
        if index in self.layers:
            return self.layers[index]
        return LayerSettings(self.threshold, self.sta, dense=index in self.dense_layers)

    def check_num_layers(self, num_layers: int) -> None:
        bad = [i for i in (*self.dense_layers, *self.layers) if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(
                f"config names layers {sorted(set(bad))}, the model has {num_layers} (0..{num_layers - 1})"
            )

    def check_num_heads(self, num_heads: int) -> None:
        """Per-head thresholds must give one value per attention head of the model."""
        for index, settings in self.layers.items():
            if settings.per_head and len(settings.threshold) != num_heads:
                raise ConfigError(
                    f"layer {index} has {len(settings.threshold)} per-head thresholds, the model has {num_heads} heads"
                )

    def with_provenance(self, **entries: Any) -> NablaConfig:
        return replace(self, provenance={**self.provenance, **entries})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sta"] = list(self.sta) if self.sta else None
        data["tile"] = list(self.tile)
        data["dense_layers"] = list(self.dense_layers)
        data["layers"] = {str(i): s.to_dict() for i, s in self.layers.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NablaConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a NABLA config must be a mapping of settings, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown NABLA config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def load_config_file(path: str | os.PathLike) -> dict[str, NablaConfig]:
    """Read a NABLA config file: one config for every transformer, or {"transformer": ..., "transformer_2": ...}.

    Returns a mapping from pipeline component name to config; the key "*" means "every transformer".
    """
    data = read_json(path, "config file")
    try:
        if isinstance(data, dict) and data and all(k.startswith("transformer") for k in data):
            return {name: NablaConfig.from_dict(sub) for name, sub in data.items()}
        return {"*": NablaConfig.from_dict(data)}
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
