"""The stats file of a calibration: per component, layer, head and candidate, the measured density and error sums of
every (sample, step), with the settings that made them (safetensors + JSON metadata; rewritten atomically).
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nabla_convert.attention import (
    TileLayout,
)
from nabla_convert.calibrate.distributed import RECORD_NUMBERS, RECORD_TENSORS
from nabla_convert.calibrate.plan import CalibrationError, Candidate
from nabla_convert.config import (
    NablaConfig,
    parse_window,
)
from nabla_convert.io import atomic_write, open_safetensors

STATS_FORMAT = "nabla-convert calibration stats v1"


@dataclass
class ComponentStats:
    """Measurements of one transformer: one record per (sample, measured step)."""

    num_layers: int
    num_heads: int
    sample: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    local_step: list[int] = field(default_factory=list)
    density: list[torch.Tensor] = field(default_factory=list)  # (layers, candidates, heads): mean over calls
    err_num: list[torch.Tensor] = field(default_factory=list)  # (layers, candidates, heads): sum |O_c - O_dense|^2
    err_den: list[torch.Tensor] = field(default_factory=list)  # (layers, heads): sum |O_dense|^2
    map_heads: list[int] = field(default_factory=list)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> pooled block map (map heads, nq, nk)

    def keep_samples(self, kept: set[int]) -> None:
        """Drop the records of samples not in `kept` (measured only part way)."""
        rows = [i for i, sample in enumerate(self.sample) if sample in kept]
        for key in RECORD_NUMBERS + RECORD_TENSORS:
            values = getattr(self, key)
            setattr(self, key, [values[i] for i in rows])

    def record_shapes(self, candidates: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of one (sample, step) record."""
        per_candidate = (self.num_layers, candidates, self.num_heads)
        return {"density": per_candidate, "err_num": per_candidate, "err_den": (self.num_layers, self.num_heads)}

    def insert(self, record: dict[str, Any]) -> None:
        """Add one (sample, step) record after every record of its sample and the samples before it: records stay
        in sample order (as one process measures them) whichever process measured them, in whatever order."""
        row = bisect.bisect_right(self.sample, record["sample"])
        for key in RECORD_NUMBERS + RECORD_TENSORS:
            getattr(self, key).insert(row, record[key])


@dataclass
class Stats:
    """Everything the search and the report need, without the model."""

    meta: dict[str, Any]
    components: dict[str, ComponentStats]

    @property
    def candidates(self) -> list[Candidate]:
        return [Candidate(t, parse_window(w)) for t, w in self.meta["candidates"]]

    @property
    def layout(self) -> TileLayout:
        return TileLayout(**self.meta["layout"])

    @property
    def base_config(self) -> NablaConfig:
        return NablaConfig.from_dict(self.meta["base_config"])

    def save(self, path: str | os.PathLike) -> None:
        """Rewrite the stats file atomically (safetensors: tensors plus the JSON meta in its header)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        components = {}
        for name, comp in self.components.items():
            components[name] = {"num_layers": comp.num_layers, "num_heads": comp.num_heads, "map_heads": comp.map_heads}
            if comp.sample:
                tensors[f"{name}.sample"] = torch.tensor(comp.sample)
                tensors[f"{name}.step"] = torch.tensor(comp.step)
                tensors[f"{name}.local_step"] = torch.tensor(comp.local_step)
                tensors[f"{name}.density"] = torch.stack(comp.density)
                tensors[f"{name}.err_num"] = torch.stack(comp.err_num)
                tensors[f"{name}.err_den"] = torch.stack(comp.err_den)
            for layer, block_map in comp.maps.items():
                tensors[f"{name}.map.{layer}"] = block_map.contiguous()
        meta = json.dumps({**self.meta, "components": components})
        atomic_write(
            Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"format": STATS_FORMAT, "meta": meta})
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        path = Path(path)
        with open_safetensors(path, "stats file") as handle:
            header = handle.metadata() or {}
            if header.get("format") != STATS_FORMAT:
                raise CalibrationError(f"{path} is not a calibration stats file ({STATS_FORMAT})")
            meta = json.loads(header["meta"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        components = {}
        for name, info in meta.pop("components").items():
            comp = ComponentStats(info["num_layers"], info["num_heads"], map_heads=list(info["map_heads"]))
            if f"{name}.sample" in tensors:
                comp.sample = tensors[f"{name}.sample"].tolist()
                comp.step = tensors[f"{name}.step"].tolist()
                comp.local_step = tensors[f"{name}.local_step"].tolist()
                comp.density = list(tensors[f"{name}.density"].unbind(0))
                comp.err_num = list(tensors[f"{name}.err_num"].unbind(0))
                comp.err_den = list(tensors[f"{name}.err_den"].unbind(0))
            prefix = f"{name}.map."
            comp.maps = {int(k[len(prefix) :]): v for k, v in tensors.items() if k.startswith(prefix)}
            components[name] = comp
        return cls(meta, components)
