"""A step-time cost model for speed targets ("1.8x faster than dense at this shape"), from measured bench timings.

The models live in calibration/costs.yaml (one entry per model and shape, each copied from docs/benchmarks.md with
its card and date). Per self-attention layer and step, at block density d:

    sparse layer:  mask_ms + a + b * d      (a line fitted through the measured sparse timings)
    dense layer:   dense_attention_ms       (the fastest dense backend: no mask, no block lists)

plus the layer's work outside self-attention (projections, cross-attention, FFN), the same dense or sparse:
(dense_step_ms - layers * dense_attention_ms) / layers. Times scale per layer, so a model with another layer count
(a smaller model calibrated for a larger one's shape) keeps the speedup of the shape the entry was measured at.
A run of S steps whose first K run dense takes K dense steps plus S - K NABLA steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import yaml

from nabla_convert.calibrate.plan import CalibrationError
from nabla_convert.io import read_text
from nabla_convert.shipped import shipped_folder

COSTS_FILE = shipped_folder("calibration") / "costs.yaml"


@dataclass(frozen=True)
class CostModel:
    name: str
    source: str
    layers: int
    dense_step_ms: float
    dense_attention_ms: float
    mask_ms: float
    sparse_ms: tuple[tuple[float, float], ...]  # (density, ms) measured points of one sparse attention call

    @property
    def other_ms(self) -> float:
        """One layer's time outside self-attention."""
        return (self.dense_step_ms - self.layers * self.dense_attention_ms) / self.layers

    def attention_ms(self, density: np.ndarray | float) -> np.ndarray:
        """One sparse self-attention call at `density` (mask included): fixed + slope x density."""
        points = np.array(self.sparse_ms, dtype=np.float64)
        slope, fixed = np.polyfit(points[:, 0], points[:, 1], 1)
        return self.mask_ms + fixed + slope * np.asarray(density, dtype=np.float64)

    def layer_ms(self, density: np.ndarray | float, dense: np.ndarray | bool) -> np.ndarray:
        """Self-attention time of layers at `density`, `dense` ones on the dense backend."""
        return np.where(dense, self.dense_attention_ms, self.attention_ms(density))

    def speedup(self, density: Sequence[float], dense: Sequence[bool], dense_steps: int = 0, steps: int = 1) -> float:
        """Predicted speedup over dense of a run of `steps` whose first `dense_steps` run dense; one entry per layer."""
        layers = len(density)
        dense_step = layers * (self.other_ms + self.dense_attention_ms)
        nabla_step = layers * self.other_ms + float(self.layer_ms(np.array(density), np.array(dense)).sum())
        return steps * dense_step / (dense_steps * dense_step + (steps - dense_steps) * nabla_step)

    def attention_budget(self, speedup: float, layers: int, dense_steps: int = 0, steps: int = 1) -> float:
        """The self-attention time a NABLA step may take, summed over `layers`, for `speedup` over the whole run."""
        dense_step = layers * (self.other_ms + self.dense_attention_ms)
        nabla_step = (steps / speedup - dense_steps) * dense_step / (steps - dense_steps)
        return nabla_step - layers * self.other_ms


def cost_models() -> dict[str, CostModel]:
    """Every cost model of calibration/costs.yaml by name."""
    data = yaml.safe_load(read_text(COSTS_FILE, "cost model file"))
    return {
        name: CostModel(
            name=name,
            source=" ".join(entry["source"].split()),
            layers=int(entry["layers"]),
            dense_step_ms=float(entry["dense_step_ms"]),
            dense_attention_ms=float(entry["dense_attention_ms"]),
            mask_ms=float(entry["mask_ms"]),
            sparse_ms=tuple((float(d), float(ms)) for d, ms in entry["sparse_ms"]),
        )
        for name, entry in data.items()
    }


def load_cost_model(name: str) -> CostModel:
    models = cost_models()
    if name not in models:
        raise CalibrationError(f"unknown cost model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]
