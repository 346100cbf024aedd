"""Measure NABLA candidates on the dense trajectory of a video pipeline.

Every self-attention layer gets a `MeasuringProcessor` (installed over `apply_nabla`, so tokens
are in the same padded tile order as in a converted model). It returns the *dense* output, so the
pipeline follows its dense trajectory, and at the sampled denoising steps it measures, from the
same post-RoPE q and k, every candidate (threshold, STA window):

- block density: the share of (query block, key block) pairs the candidate's mask keeps, over
  blocks holding real tokens, per head (`attention.block_density`);
- output error: ||O_candidate - O_dense|| / ||O_dense|| per head, over the real tokens of
  `query_blocks` query blocks drawn uniformly without replacement among blocks holding real tokens,
  from a generator seeded by (sample, step, layer, call), so the same rows serve every candidate
  and a run is reproducible. Both outputs are computed in float32 from one score matrix of those
  rows, so the error measures the sparsity alone, not kernel rounding.

Measurements of each (sample, step) are summed over the step's calls (CFG runs the transformer
twice) and written to the stats file when the step ends (atomic rewrite), so an interrupted run
keeps what it measured, and a rerun with the same settings resumes: samples measured at every step
are kept, a partly measured one is measured again (each sample's trajectory is a function of its
seed, so the result is what an uninterrupted run gives). A stats file of other settings is never
overwritten unless asked to (`overwrite`).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nabla_convert.attention import (
    TileLayout,
    Window,
    block_density,
    padded_dense_attention,
    select_by_mass,
    sta_block_mask,
)
from nabla_convert.attention.flex import dense_suffix_keep, joint_validity, key_mask
from nabla_convert.attention.mask import block_scores
from nabla_convert.calibrate.distributed import ONE_PROCESS, RECORD_NUMBERS, RECORD_TENSORS, Processes
from nabla_convert.config import (
    ConfigError,
    LayerSettings,
    NablaConfig,
    NablaError,
    Threshold,
    check_int,
    check_int_list,
    check_number,
    check_threshold,
    check_video_size,
    parse_window,
)
from nabla_convert.io import atomic_write, open_safetensors
from nabla_convert.models import family_of, family_of_pipeline
from nabla_convert.models.nabla import NablaAttnProcessor, apply_nabla, nabla_state, remove_nabla, set_processors

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# The public STA windows (wT, wH, wW) and the tile grid they were tuned for: Wan2.1 at 720p, 81 frames, as the
# official code crops it (1280x640: 21 latent frames x 5 x 10 tiles). `sta: [scaled]` measures them scaled to the
# calibration's own tile grid.
PUBLIC_WINDOWS = ((11, 3, 3), (11, 5, 5))
PUBLIC_TILE_GRID = (21, 5, 10)
SCALED = "scaled"
STATS_FORMAT = "nabla-convert calibration stats v1"
SCORE_BUDGET = 1 << 27  # float32 score elements per head chunk (512 MiB), bounds the error computation's memory


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
        thresholds = tuple(sorted({check_threshold(t, "calibrate.thresholds") for t in self.thresholds}))
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


def spread(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included."""
    return sorted({round(float(i)) for i in np.linspace(0, total - 1, min(count, total))})


def block_partials(
    scores: torch.Tensor, values: torch.Tensor, kv_block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (row, key block) softmax partials of scores (B, H, R, S) and values (B, H, S, D), as flash attention keeps them.

    Returns the block max M (B, H, R, nk), the normaliser Z = sum exp(s - M) and the weighted values
    U = sum exp(s - M) v (B, H, R, nk, D). Blocks made only of padding (-inf scores) get Z = U = 0.
    """
    blocked = scores.unflatten(-1, (-1, kv_block))
    block_max = blocked.amax(-1)
    block_max = block_max.masked_fill(block_max.isinf(), 0.0)
    weights = torch.exp(blocked - block_max[..., None])
    weighted = torch.einsum("bhrnk,bhnkd->bhrnd", weights, values.unflatten(-2, (-1, kv_block)))
    return block_max, weights.sum(-1), weighted.contiguous()  # einsum may return a permuted view


def combine_blocks(
    block_max: torch.Tensor, norm: torch.Tensor, weighted: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Exact attention output (B, H, R, D) over the kept key blocks (B, H, R, nk) from their softmax partials."""
    top = block_max.masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)
    scale = torch.where(keep, torch.exp(block_max - top), 0.0)
    # a batched (1, nk) @ (nk, D) product reads `weighted` in place (einsum would copy it for every candidate)
    return (scale.unsqueeze(-2) @ weighted).squeeze(-2) / (scale * norm).sum(-1, keepdim=True)


class Probe:
    """Accumulates one transformer's measurements for the current (sample, step)."""

    def __init__(
        self, config: NablaConfig, candidates: Sequence[Candidate], num_layers: int, num_heads: int, query_blocks: int
    ) -> None:
        self.config = config
        self.candidates = list(candidates)
        self.thresholds = sorted({c.threshold for c in self.candidates})
        self.query_blocks = query_blocks
        self.num_layers, self.num_heads = num_layers, num_heads
        self.map_layers = set(spread(4, num_layers))
        self.map_heads = spread(2, num_heads)
        self.maps: dict[int, torch.Tensor] = {}
        self.active = False
        self.capture_maps = False
        self.sample = self.step = 0
        self._reset()

    def _reset(self) -> None:
        self.calls = [0] * self.num_layers
        self.local_step: int | None = None
        self.density: list[torch.Tensor | float] = [0.0] * self.num_layers
        self.err_num: list[torch.Tensor | float] = [0.0] * self.num_layers
        self.err_den: list[torch.Tensor | float] = [0.0] * self.num_layers

    def start(self, sample: int, step: int, active: bool, capture_maps: bool = False) -> None:
        self._reset()
        self.sample, self.step, self.active, self.capture_maps = sample, step, active, capture_maps

    def _query_blocks(self, layer: int, layout: TileLayout, device: torch.device) -> torch.Tensor:
        """Sampled query block indices: uniform without replacement among blocks holding real tokens."""
        q_block = self.config.q_block
        real = layout.indices("cpu").valid.view(-1, q_block).any(-1).nonzero().flatten()
        key = f"{self.sample}:{self.step}:{layer}:{self.calls[layer]}".encode()
        generator = torch.Generator().manual_seed(zlib.crc32(key))
        chosen = real[torch.randperm(real.numel(), generator=generator)[: self.query_blocks]]
        return chosen.sort().values.to(device)

    def _keep(self, candidate: Candidate, selected: dict[float, torch.Tensor], windows: dict, kv_real: torch.Tensor):
        keep = selected[candidate.threshold]
        if candidate.sta:
            keep = keep | windows[candidate.sta]
        return keep & kv_real

    @torch.no_grad()
    def measure(
        self,
        layer: int,
        local_step: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TileLayout,
        text_valid: torch.Tensor | None = None,
    ) -> None:
        """Density and sampled-row output error of every candidate for one attention call.

        With `text_valid` (B, L) the last L tokens are text (joint attention, as NablaAttnProcessor.attend): the
        candidates select among the video blocks, text keys always count, and the error is over video rows.
        """
        q_block, kv_block = self.config.q_block, self.config.kv_block
        B, H, S, D = q.shape
        n = layout.padded_len
        valid = layout.indices(q.device).valid if layout.is_padded else None
        probs, kv_real = block_scores(q[:, :, :n], k[:, :, :n], q_block, kv_block, valid)
        if self.capture_maps and layer in self.map_layers and layer not in self.maps:
            self.maps[layer] = probs[0, self.map_heads].float().cpu()
        selected = {t: select_by_mass(probs, t) for t in self.thresholds}
        windows = {c.sta: sta_block_mask(layout, c.sta, q_block, kv_block, q.device) for c in self.candidates if c.sta}
        keeps = [self._keep(c, selected, windows, kv_real) for c in self.candidates]
        density = torch.stack(
            [torch.stack([block_density(keep[:, h], layout, q_block, kv_block) for h in range(H)]) for keep in keeps]
        )

        key_valid = joint_validity(valid, n, text_valid)
        if text_valid is not None:
            keeps = [dense_suffix_keep(keep, key_valid, q_block, kv_block) for keep in keeps]
            kv_real = key_valid.view(B, -1, kv_block).any(-1)[:, None, None, :]
        blocks = self._query_blocks(layer, layout, q.device)
        rows = (blocks[:, None] * q_block + torch.arange(q_block, device=q.device)).flatten()
        row_valid = (valid[rows] if valid is not None else torch.ones_like(rows, dtype=torch.bool)).float()
        err_num = q.new_zeros((len(keeps), H), dtype=torch.float32)
        err_den = q.new_zeros((H,), dtype=torch.float32)
        chunk = max(1, SCORE_BUDGET // (B * rows.numel() * S))
        for h0 in range(0, H, chunk):
            heads = slice(h0, h0 + chunk)
            scores = (q[:, heads, rows].float() @ k[:, heads].float().transpose(-1, -2)) / math.sqrt(D)
            if key_valid is not None:
                scores = scores.masked_fill(~key_mask(key_valid), float("-inf"))
            partials = block_partials(scores, v[:, heads].float(), kv_block)
            del scores
            dense = combine_blocks(*partials, kv_real.expand(B, partials[0].shape[1], rows.numel(), -1))
            err_den[heads] = (dense.square().sum(-1) * row_valid).sum((0, 2))
            for index, keep in enumerate(keeps):
                out = combine_blocks(*partials, keep[:, heads][:, :, blocks].repeat_interleave(q_block, dim=2))
                err_num[index, heads] = ((out - dense).square().sum(-1) * row_valid).sum((0, 2))
        self.density[layer] = self.density[layer] + density
        self.err_num[layer] = self.err_num[layer] + err_num
        self.err_den[layer] = self.err_den[layer] + err_den
        self.calls[layer] += 1
        if self.local_step is None:
            self.local_step = local_step

    def take(self) -> dict[str, Any] | None:
        """This step's record (CPU, float64), or None when nothing was measured."""
        if not any(self.calls):
            return None
        missing = [i for i, calls in enumerate(self.calls) if calls == 0]
        if missing:
            raise CalibrationError(f"layers {missing} were not called during step {self.step}")
        record = {
            "sample": self.sample,
            "step": self.step,
            "local_step": self.local_step,
            "density": torch.stack([d / c for d, c in zip(self.density, self.calls, strict=True)]).double().cpu(),
            "err_num": torch.stack(self.err_num).double().cpu(),
            "err_den": torch.stack(self.err_den).double().cpu(),
        }
        self._reset()
        return record


class MeasuringProcessor(NablaAttnProcessor):
    """Dense self-attention (so the dense trajectory is followed) that measures every candidate on the same q, k."""

    def __init__(self, layer: int, settings: LayerSettings, state: Any, probe: Probe) -> None:
        super().__init__(layer, settings, state)
        self.probe = probe

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        layout = self.state.layout
        if layout is None:
            raise RuntimeError("measuring processor called outside a NABLA transformer forward (no token layout)")
        if self.probe.active:
            self.probe.measure(self.layer, self.state.step, q, k, v, layout, text_valid)
        valid = layout.indices(q.device).valid if layout.is_padded else None
        return padded_dense_attention(q, k, v, joint_validity(valid, layout.padded_len, text_valid))


def map_step(measured: Sequence[int]) -> int:
    """The measured step whose pooled block maps (first sample, first call) are kept for the heatmaps."""
    return measured[len(measured) // 2]


def pipeline_transformers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's transformers by component name (two-expert models have two)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise CalibrationError(f"{type(pipe).__name__} has no transformer")
    return family_of_pipeline(pipe).transformers(pipe)


def new_stats(pipe: Any, samples: Sequence[Sample], plan: CalibrationPlan, base: NablaConfig, model: str) -> Stats:
    transformers = pipeline_transformers(pipe)
    meta = {
        "model": model,
        "plan": plan.to_dict(),
        "measured_steps": list(plan.measured_steps()),
        "map_step": map_step(plan.measured_steps()),
        "candidates": [[c.threshold, list(c.sta) if c.sta else None] for c in plan.candidates()],
        "samples": [{"label": s.label, "seed": s.seed} for s in samples],
        "layout": None,  # the token layout of the first measured call
        "base_config": base.to_dict(),
    }
    components = {}
    for name, transformer in transformers.items():
        family = family_of(transformer)
        components[name] = ComponentStats(len(family.self_attention(transformer)), family.num_heads(transformer))
    return Stats(meta, components)


def resumed_stats(fresh: Stats, path: Path, overwrite: bool) -> tuple[Stats, set[int]]:
    """The stats to continue from and the samples already measured at every step: those of an earlier run with the
    same settings at `path`; none when there is no such file or `overwrite`; an error for other settings."""
    if overwrite or not path.is_file():
        return fresh, set()
    earlier = Stats.load(path)
    keys = ("model", "plan", "measured_steps", "candidates", "samples", "base_config")
    same = json.loads(json.dumps({k: fresh.meta[k] for k in keys}))
    changed = sorted(k for k in keys if earlier.meta.get(k) != same[k])
    shapes = {name: (c.num_layers, c.num_heads) for name, c in fresh.components.items()}
    if shapes != {name: (c.num_layers, c.num_heads) for name, c in earlier.components.items()}:
        changed.append("model layers/heads")
    if changed:
        raise CalibrationError(
            f"{path} holds measurements of other settings ({', '.join(changed)}); pass --overwrite to start over"
        )
    done: dict[int, set[int]] = {}  # the steps measured per sample, by any transformer (two-expert models: by one)
    for comp in earlier.components.values():
        for sample, step in zip(comp.sample, comp.step, strict=True):
            done.setdefault(sample, set()).add(step)
    finished = {sample for sample, found in done.items() if found == set(fresh.meta["measured_steps"])}
    for comp in earlier.components.values():
        comp.keep_samples(finished)
    return earlier, finished


def collect(
    pipe: Any,
    samples: Sequence[Sample],
    plan: CalibrationPlan,
    base: NablaConfig,
    *,
    stats_path: str | os.PathLike | None = None,
    model: str = "",
    progress: bool = True,
    overwrite: bool = False,
    processes: Processes = ONE_PROCESS,
) -> Stats:
    """Run every sample through the dense pipeline and measure the plan's candidates at its sampled steps.

    With `stats_path`, an earlier run's file there is resumed (same settings) or refused (other settings) unless
    `overwrite`. The pipeline's transformers are restored afterwards (their previous NABLA settings, or dense).
    With several `processes` (calibrate/distributed.py), each runs its share of the samples, every process ends with
    the records of all, and only the main process writes `stats_path`.
    """
    if not samples:
        raise CalibrationError("no samples to calibrate on")
    stats = new_stats(pipe, samples, plan, base, model)
    finished: set[int] = set()
    if stats_path is not None:
        stats, finished = resumed_stats(stats, Path(stats_path), overwrite)
    measured = plan.measured_steps()
    last = measured[-1]
    maps_at = map_step(measured)
    transformers = pipeline_transformers(pipe)
    previous = {name: getattr(t, "_nabla_state", None) for name, t in transformers.items()}
    probes: dict[str, Probe] = {}
    shapes = {name: comp.record_shapes(len(stats.candidates)) for name, comp in stats.components.items()}

    def keep_step() -> None:
        """Take this step's records (of every process) into the stats and save them."""
        mine = {name: [record] for name, probe in probes.items() if (record := probe.take()) is not None}
        for name in mine:
            stats.components[name].maps.update(probes[name].maps)
            stats.meta["layout"] = asdict(nabla_state(transformers[name]).layout)
        for name, records in processes.exchange(mine, shapes).items():
            for record in records:
                stats.components[name].insert(record)
        if stats_path is not None and processes.is_main:
            stats.save(stats_path)

    try:
        for name, transformer in transformers.items():
            apply_nabla(transformer, base)
            state = nabla_state(transformer)
            comp = stats.components[name]
            probes[name] = probe = Probe(base, plan.candidates(), comp.num_layers, comp.num_heads, plan.query_blocks)
            comp.map_heads = probe.map_heads
            set_processors(
                transformer,
                lambda index, _, state=state, probe=probe: MeasuringProcessor(index, base.layer(index), state, probe),
            )
        bar = tqdm(
            total=len(samples) * (last + 1),
            desc="calibrate (samples x steps)",
            unit="step",
            disable=not (progress and processes.is_main),
        )

        bar.update(len(finished) * (last + 1))
        for round_ in processes.rounds([index for index in range(len(samples)) if index not in finished]):
            index = processes.pick(round_)
            if index is None:  # no sample left for this process: take the others' records
                for _ in measured:
                    keep_step()
                continue

            def start_step(step: int, sample_index: int = index) -> None:
                for probe in probes.values():
                    probe.start(
                        sample_index, step, step in measured, capture_maps=sample_index == 0 and step == maps_at
                    )

            def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict, width: int = len(round_)) -> dict:
                if step in measured:
                    keep_step()
                bar.update(width)
                if step >= last:
                    pipeline._interrupt = True
                else:
                    start_step(step + 1)
                return {}

            start_step(0)
            sample = samples[index]
            pipe(
                **{
                    key: value.to(pipe.device) if torch.is_tensor(value) else value
                    for key, value in sample.inputs.items()
                },
                height=plan.height,
                width=plan.width,
                num_frames=plan.frames,
                num_inference_steps=plan.steps,
                guidance_scale=plan.guidance,
                generator=torch.Generator("cpu").manual_seed(sample.seed),
                output_type="latent",
                callback_on_step_end=on_step_end,
            )
        bar.close()
    finally:
        for name, transformer in transformers.items():
            if previous[name] is not None:
                apply_nabla(transformer, previous[name].config)
            else:
                remove_nabla(transformer)
    return stats
