"""What calibrate measures: the candidates (threshold, STA window), the plan (steps, seeds, size, targets) and the
samples (a prompt or its embeddings, and a seed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from nabla_convert.attention import (
    Window,
)
from nabla_convert.config import (
    ConfigError,
    LayerSettings,
    NablaConfig,
    Threshold,
    check_int,
    check_int_list,
    check_number,
    check_threshold,
    check_video_size,
    parse_window,
)
from nabla_convert.errors import NablaError

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


# The public STA windows (wT, wH, wW) and the tile grid they were tuned for: the published 14B presets at 720p, 81 frames, as the
# official code crops it (1280x640: 21 latent frames x 5 x 10 tiles). `sta: [scaled]` measures them scaled to the
# calibration's own tile grid.
PUBLIC_WINDOWS = ((11, 3, 3), (11, 5, 5))


PUBLIC_TILE_GRID = (21, 5, 10)


SCALED = "scaled"


class CalibrationError(NablaError, ValueError):
    """Bad calibration input or stats, with a one-line message."""


def scaled_window(window: Window, tile_grid: tuple[int, int, int], reference: tuple[int, int, int]) -> Window:
    """`window`, tuned for the tile grid `reference`, scaled to `tile_grid`: each side the nearest odd size >= 1."""
    sides = (w * grid / ref for w, grid, ref in zip(window, tile_grid, reference, strict=True))
    return tuple(max(1, 2 * math.floor(side / 2) + 1) for side in sides)  # type: ignore[return-value]


def scaled_windows(tile_grid: tuple[int, int, int]) -> tuple[Window, ...]:
    """The public STA windows scaled to `tile_grid`, without repeats."""
    return tuple(dict.fromkeys(scaled_window(w, tile_grid, PUBLIC_TILE_GRID) for w in PUBLIC_WINDOWS))


@dataclass(frozen=True)
class Candidate:
    """One setting a layer may get: NABLA at `threshold`, OR-ed with an STA window when given.

    Measured candidates have one threshold; a per-head search's choice has one per head.
    """

    threshold: Threshold
    sta: Window | None = None

    def settings(self) -> LayerSettings:
        return LayerSettings(threshold=self.threshold, sta=self.sta)

    @property
    def label(self) -> str:
        if isinstance(self.threshold, tuple):
            threshold = f"per-head {min(self.threshold):g}-{max(self.threshold):g}"
        else:
            threshold = f"{self.threshold:g}"
        return threshold + (f"+sta{'-'.join(map(str, self.sta))}" if self.sta else "")


@dataclass(frozen=True)
class CalibrationPlan:
    """What calibrate measures and what the search aims at; built from a recipe's `calibrate` section.

    Recipe keys (all optional): thresholds, sta (list of windows, null = none), steps,
    sample_steps (a count spread evenly over the NABLA steps, or a list of step indices), seeds,
    height, width, frames, guidance, query_blocks, target_density | error_budget | target_speedup (with
    cost_model, a name in calibration/costs.yaml), error_quantile, dense_layers, dense_steps,
    dense_step_options (dense step counts the search chooses from), per_head (one threshold per attention head).
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    sta: tuple[Window | str | None, ...] = (None,)  # "scaled": the public windows scaled to the tile grid
    steps: int = 50
    sample_steps: int | tuple[int, ...] = 5
    seeds: tuple[int, ...] = (0,)
    height: int = 480
    width: int = 832
    frames: int = 81
    guidance: float = 5.0
    query_blocks: int = 16
    target_density: float | None = None
    error_budget: float | None = None
    target_speedup: float | None = None
    cost_model: str | None = None
    error_quantile: float = 0.9
    dense_layers: tuple[int, ...] = ()
    dense_steps: int = 0
    dense_step_options: tuple[int, ...] = ()
    per_head: bool = False

    def __post_init__(self) -> None:
        thresholds = tuple(
            sorted({check_threshold(t, "calibrate.thresholds", per_head=False) for t in self.thresholds})
        )
        if not thresholds:
            raise ConfigError("calibrate.thresholds needs at least one threshold")
        object.__setattr__(self, "thresholds", thresholds)
        windows = tuple(dict.fromkeys(w if w == SCALED else parse_window(w) for w in self.sta))
        object.__setattr__(self, "sta", windows or (None,))
        for name in ("steps", "height", "width", "frames", "query_blocks"):
            check_int(getattr(self, name), f"calibrate.{name}", minimum=1)
        check_video_size(self.height, self.width, "calibrate.")
        if not 0 <= check_int(self.dense_steps, "dense_steps") < self.steps:
            raise ConfigError(f"dense_steps must be in [0, steps={self.steps}), got {self.dense_steps!r}")
        if isinstance(self.sample_steps, (list, tuple)):
            steps = tuple(sorted(set(check_int_list(self.sample_steps, "calibrate.sample_steps"))))
            if not steps or steps[0] < 0 or steps[-1] >= self.steps:
                raise ConfigError(f"calibrate.sample_steps must be step indices in [0, {self.steps}), got {steps}")
            object.__setattr__(self, "sample_steps", steps)
        elif isinstance(self.sample_steps, bool) or not isinstance(self.sample_steps, int) or self.sample_steps < 1:
            raise ConfigError(
                f"calibrate.sample_steps must be a count >= 1 or a list of steps, got {self.sample_steps!r}"
            )
        object.__setattr__(self, "seeds", check_int_list(self.seeds, "calibrate.seeds"))
        if not self.seeds:
            raise ConfigError("give at least one seed")
        dense_layers = check_int_list(self.dense_layers, "dense_layers", minimum=0)
        object.__setattr__(self, "dense_layers", tuple(sorted(set(dense_layers))))
        check_number(self.guidance, "calibrate.guidance")
        for name in ("target_density", "error_budget", "target_speedup"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), f"calibrate.{name}")
        check_number(self.error_quantile, "calibrate.error_quantile")
        targets = [self.target_density, self.error_budget, self.target_speedup]
        if sum(value is not None for value in targets) > 1:
            raise ConfigError("give one target: a target density, an error budget or a target speedup, not two")
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise ConfigError(f"target speedup must be above 1, got {self.target_speedup}")
        if self.cost_model is not None and not isinstance(self.cost_model, str):
            raise ConfigError(f"calibrate.cost_model must be a name, got {self.cost_model!r}")
        options = check_int_list(self.dense_step_options, "calibrate.dense_step_options", minimum=0)
        if any(k >= self.steps for k in options):
            raise ConfigError(f"calibrate.dense_step_options must be in [0, steps={self.steps}), got {list(options)}")
        if options and min(options) < self.dense_steps:
            raise ConfigError(
                f"calibrate.dense_step_options {list(options)} go below dense_steps {self.dense_steps}: "
                "the steps before it are not measured"
            )
        object.__setattr__(self, "dense_step_options", tuple(sorted(set(options))))
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise ConfigError(f"target density must be in (0, 1], got {self.target_density}")
        if self.error_budget is not None and not self.error_budget >= 0.0:
            raise ConfigError(f"error budget must be >= 0, got {self.error_budget}")
        if not 0.0 <= self.error_quantile <= 1.0:
            raise ConfigError(f"error_quantile must be in [0, 1], got {self.error_quantile}")
        if not isinstance(self.per_head, bool):
            raise ConfigError(f"calibrate.per_head must be true or false, got {self.per_head!r}")

    @classmethod
    def from_recipe(cls, section: dict[str, Any], nabla: NablaConfig, where: str = "recipe") -> CalibrationPlan:
        """A recipe's `calibrate` mapping; STA candidates and dense steps/layers default to its `nabla` section."""
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"{where}: unknown calibrate keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        defaults = {"sta": (nabla.sta,), "dense_steps": nabla.dense_steps, "dense_layers": nabla.dense_layers}
        values = {**defaults, **section}
        for key in ("thresholds", "sta", "seeds", "dense_layers", "dense_step_options"):
            if not isinstance(values.get(key, ()), (list, tuple)):
                raise ConfigError(f"{where}: calibrate.{key} must be a list")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except (TypeError, ConfigError) as err:
            raise ConfigError(f"{where}: {err}") from None

    def with_tile_grid(self, tile_grid: tuple[int, int, int]) -> CalibrationPlan:
        """The plan with `sta: scaled` replaced by the public windows scaled to `tile_grid`."""
        if SCALED not in self.sta:
            return self
        windows = [w for entry in self.sta for w in (scaled_windows(tile_grid) if entry == SCALED else (entry,))]
        return replace(self, sta=tuple(windows))

    def candidates(self) -> list[Candidate]:
        if SCALED in self.sta:
            raise CalibrationError("STA windows 'scaled' need the tile grid first (CalibrationPlan.with_tile_grid)")
        return [Candidate(t, w) for w in self.sta for t in self.thresholds]

    def measured_steps(self) -> tuple[int, ...]:
        """Denoising steps that are measured: a count spreads evenly over the NABLA steps [dense_steps, steps)."""
        if isinstance(self.sample_steps, tuple):
            return self.sample_steps
        return tuple(self.dense_steps + i for i in spread(self.sample_steps, self.steps - self.dense_steps))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sta"] = [list(w) if isinstance(w, tuple) else w for w in self.sta]
        return data


@dataclass(frozen=True)
class Sample:
    """One pipeline run: a prompt (or precomputed embeddings) and a seed."""

    label: str
    seed: int
    inputs: dict[str, Any] = field(compare=False, repr=False)


def spread(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included."""
    return sorted({round(float(i)) for i in np.linspace(0, total - 1, min(count, total))})
