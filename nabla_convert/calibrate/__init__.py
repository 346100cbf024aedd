"""calibrate: per-layer NABLA settings measured on the user's own prompts, with a report that shows why.

`calibrate(model, out, prompts=...)` runs the dense pipeline, measures every self-attention layer
over candidate thresholds / STA windows (collect.py), chooses each layer's setting for a target
(search.py) and writes nabla_config.json (for `convert --config`), calibration.json (the
`nabla_reports/calibration.json` of a converted folder), report.md, PNG plots and
stats.safetensors; `recalibrate(stats, out, ...)` re-runs the search on saved stats without the model.
--out must not touch MODEL or the prompt files (folders.check_output) and is marked as a calibrate folder; rerun
into the same folder with the same settings, calibrate resumes from the stats it saved (a killed run loses at
most the sample in progress); other settings are refused unless overwrite=True (--overwrite).
Launched as N processes (`accelerate launch` / `torchrun`, one per GPU), calibrate shares the samples over them and
merges their measurements into the stats one process would write (distributed.py); only process 0 writes --out.

Recipe `calibrate:` section (all keys optional; CLI options override them):
  thresholds:     candidate thresholds in (0, 1]            default [0.2, 0.3, ..., 0.9, 0.95, 0.99]
  sta:            candidate STA windows, null = none, "scaled" = the public windows (11-3-3, 11-5-5 at the published
                  720p presets' 21x5x10 tiles) scaled to this tile grid     default [the recipe's nabla.sta]
  target_density: mean block density over layers and steps (dense layers and dense steps count 1.0)
  error_budget:   per-layer relative L2 attention-output error at the NABLA steps
  target_speedup: the whole run this many times faster than dense, through cost_model (give one of the three)
  cost_model:     a step-time model of calibration/costs.yaml (from measured bench timings; calibrate/costs.py)
  error_quantile: quantile over calibration samples an error budget is checked on   default 0.9
  steps:          denoising steps of each run                default 50
  sample_steps:   how many steps to measure, spread over [dense_steps, steps), or a list of steps   default 5
  seeds:          seeds per prompt                           default [0]
  height, width, frames, guidance:                           default 480, 832, 81, 5.0
  query_blocks:   query blocks per attention call whose output error is computed exactly   default 16
  dense_layers:   layers kept dense                          default the recipe's nabla.dense_layers
  dense_steps:    first K steps run dense                    default the recipe's nabla.dense_steps
  dense_step_options: dense step counts the search chooses among (>= dense_steps)   default [] (dense_steps fixed)
  per_head:       one threshold per attention head (a layer's heads share one STA window)   default false (per layer)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nabla_convert.attention import TileLayout
from nabla_convert.calibrate.collect import collect, pipeline_transformers
from nabla_convert.calibrate.distributed import Processes
from nabla_convert.calibrate.plan import CalibrationError, CalibrationPlan, Candidate, Sample
from nabla_convert.calibrate.report import write_outputs
from nabla_convert.calibrate.search import ComponentChoice, Target, evaluate, search
from nabla_convert.calibrate.stats import Stats
from nabla_convert.config import NablaConfig
from nabla_convert.convert import load_pipeline, resolve_model, transformer_components
from nabla_convert.folders import check_output, public_name, write_marker
from nabla_convert.io import atomic_write, open_safetensors
from nabla_convert.models import family_of
from nabla_convert.recipes import Recipe, load_recipe

STATS_FILE = "stats.safetensors"


@dataclass
class Calibration:
    stats: Stats
    choices: dict[str, ComponentChoice]
    report: Path

    def config(self) -> NablaConfig | dict[str, NablaConfig]:
        """What `convert` takes: one config, or one per transformer (two-expert models)."""
        configs = {name: choice.config for name, choice in self.choices.items()}
        return next(iter(configs.values())) if len(configs) == 1 else configs


def make_plan(
    recipe: str | os.PathLike | Recipe | None = None, **overrides: Any
) -> tuple[CalibrationPlan, NablaConfig]:
    """The plan and base NABLA config from a recipe (or the defaults), with overrides (None values ignored)."""
    if recipe is not None and not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    base = recipe.nabla if recipe else NablaConfig()
    plan = CalibrationPlan.from_recipe(
        recipe.calibrate if recipe else {}, base, where=recipe.name if recipe else "defaults"
    )
    given = {key: value for key, value in overrides.items() if value is not None}
    return replace(plan, **given), base


def prompt_samples(prompts: Sequence[str], seeds: Sequence[int]) -> list[Sample]:
    return [Sample(prompt, seed, {"prompt": prompt}) for prompt in prompts for seed in seeds]


def embedding_samples(path: str | os.PathLike, seeds: Sequence[int], guidance: float) -> list[Sample]:
    """Samples from precomputed embeddings: safetensors with "prompt_embeds" (N, L, D), optional
    "negative_prompt_embeds" (N or 1, L, D) and optional metadata "prompts" (a JSON list of N labels)."""
    import json

    path = Path(path)
    with open_safetensors(path, "prompt embeddings file") as handle:
        names = set(handle.keys())
        if "prompt_embeds" not in names:
            raise CalibrationError(f"{path}: no tensor named 'prompt_embeds' (N, L, D)")
        embeds = handle.get_tensor("prompt_embeds")
        negative = handle.get_tensor("negative_prompt_embeds") if "negative_prompt_embeds" in names else None
        labels = json.loads((handle.metadata() or {}).get("prompts", "null"))
    if embeds.dim() != 3:
        raise CalibrationError(f"{path}: prompt_embeds must be (N, L, D), got {tuple(embeds.shape)}")
    if negative is None and guidance > 1.0:
        raise CalibrationError(
            f"{path}: no 'negative_prompt_embeds' for classifier-free guidance; add them or use guidance 1"
        )
    if negative is not None and (negative.dim() != 3 or negative.shape[0] not in (1, embeds.shape[0])):
        raise CalibrationError(f"{path}: negative_prompt_embeds must be (1 or N, L, D), got {tuple(negative.shape)}")
    if not isinstance(labels, list) or len(labels) != embeds.shape[0]:
        labels = [f"{path.name}[{i}]" for i in range(embeds.shape[0])]
    samples = []
    for i, label in enumerate(labels):
        inputs: dict[str, Any] = {"prompt_embeds": embeds[i : i + 1]}
        if negative is not None and guidance > 1.0:
            inputs["negative_prompt_embeds"] = negative[i : i + 1] if negative.shape[0] > 1 else negative
        samples += [Sample(str(label), seed, inputs) for seed in seeds]
    return samples


def calibrate(
    model: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    prompts: Sequence[str] | None = None,
    prompt_embeds: str | os.PathLike | None = None,
    recipe: str | os.PathLike | Recipe | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    **overrides: Any,
) -> Calibration | None:
    """Measure `model` (pipeline folder, transformer folder, Hub id, or a loaded pipeline) and write the outputs.

    `overrides` are CalibrationPlan fields (steps, seeds, height, width, frames, target_density,
    error_budget, dense_layers, dense_steps, ...) that replace the recipe's values. Under `accelerate launch` or
    `torchrun` every process measures its share of the samples on its own GPU (a loaded pipeline must be on it
    already); process 0 writes the outputs and returns the calibration, the others return None.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise CalibrationError("give prompts or prompt embeddings (one of the two)")
    plan, base = make_plan(recipe, **overrides)
    target = Target.from_plan(plan)
    if prompts is not None:
        samples = prompt_samples(prompts, plan.seeds)
    else:
        samples = embedding_samples(prompt_embeds, plan.seeds, plan.guidance)
    processes, device = Processes.launched(device)
    out = Path(out)
    local = model if isinstance(model, (str, os.PathLike)) else None
    check_output(out, {"MODEL": local, "--prompt-embeds file": prompt_embeds}, overwrite=overwrite, reuse="calibrate")
    processes.wait()  # every process checked --out before process 0 writes into it
    if local is not None:
        folder, _ = resolve_model(local)
        components = transformer_components(folder)
        bare = "" in components
        for _, family in components.values():
            if prompt_embeds is not None and not family.calibrates_from_embeddings():
                raise CalibrationError(
                    f"{family.name} pipelines take more than prompt embeddings: give --prompts with a pipeline folder"
                )
        if bare and prompts is not None:
            raise CalibrationError(f"{local} is a transformer folder without a text encoder: give --prompt-embeds")
        required = {name for _, family in components.values() for name in family.required_components}
        unused = ("vae",) if prompts is not None else ("vae", "text_encoder", "tokenizer")
        skipped = tuple(name for name in unused if name not in required)
        pipe = load_pipeline(folder, device=device, dtype=dtype, without=skipped, transformer_folder=bare)
        name = public_name(local)
    else:
        name, pipe = type(model).__name__, model
    for transformer in pipeline_transformers(pipe).values():
        family = family_of(transformer)
        replace(base, dense_layers=plan.dense_layers).check_num_layers(len(family.self_attention(transformer)))
        grid = family.token_grid((plan.width, plan.height), plan.frames, family.patch_size(transformer.config))
        plan = plan.with_tile_grid(TileLayout.for_blocks(grid, base.tile).grid)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "calibrate")
    stats = collect(
        pipe,
        samples,
        plan,
        base,
        stats_path=out / STATS_FILE,
        model=name,
        progress=progress,
        overwrite=overwrite,
        processes=processes,
    )
    if not processes.is_main:
        return None
    choices = search(
        stats, target, plan.dense_layers, plan.dense_steps, plan.per_head, dense_step_options=plan.dense_step_options
    )
    return Calibration(stats, choices, write_outputs(out, stats, choices))


def recalibrate(
    stats_file: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, **overrides: Any
) -> Calibration:
    """Re-run the search on saved stats with another target / dense layers / dense steps / per_head, without the model.

    `out` may be the calibrate folder that holds `stats_file`; another calibrate folder's stats are replaced only
    with `overwrite`."""
    stats = Stats.load(stats_file)
    if not any(comp.sample for comp in stats.components.values()):
        raise CalibrationError(f"{stats_file} holds no measurements yet")
    given = {key: value for key, value in overrides.items() if value is not None}
    measured = dict(stats.meta["plan"])
    if given.keys() & {"target_density", "error_budget", "target_speedup"}:
        measured.update(target_density=None, error_budget=None, target_speedup=None)
    plan = CalibrationPlan(**{**measured, **given})
    choices = search(
        stats,
        Target.from_plan(plan),
        plan.dense_layers,
        plan.dense_steps,
        plan.per_head,
        dense_step_options=plan.dense_step_options,
    )
    out = Path(out)
    in_place = (out / STATS_FILE).exists() and (out / STATS_FILE).samefile(stats_file)
    check_output(out, {} if in_place else {"--from-stats file": stats_file}, overwrite=overwrite, reuse="calibrate")
    if (out / STATS_FILE).exists() and not in_place and not overwrite:
        raise CalibrationError(f"{out} holds the stats of another calibration; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "calibrate")
    if not in_place:
        atomic_write(out / STATS_FILE, lambda tmp: shutil.copyfile(stats_file, tmp))
    return Calibration(stats, choices, write_outputs(out, stats, choices))


__all__ = [
    "STATS_FILE",
    "Calibration",
    "CalibrationError",
    "CalibrationPlan",
    "Candidate",
    "Sample",
    "Stats",
    "Target",
    "calibrate",
    "collect",
    "embedding_samples",
    "evaluate",
    "make_plan",
    "prompt_samples",
    "recalibrate",
    "search",
]
