"""Measure NABLA candidates on the dense trajectory of a video pipeline: the run over the samples (what is measured:
plan.py; how: probe.py; where it is kept: stats.py).

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

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nabla_convert.calibrate.distributed import ONE_PROCESS, Processes
from nabla_convert.calibrate.plan import CalibrationError, CalibrationPlan, Sample
from nabla_convert.calibrate.probe import MeasuringProcessor, Probe
from nabla_convert.calibrate.stats import ComponentStats, Stats
from nabla_convert.config import (
    NablaConfig,
)
from nabla_convert.models import family_of, family_of_pipeline
from nabla_convert.models.nabla import apply_nabla, nabla_state, remove_nabla, set_processors


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
            family_of_pipeline(pipe).run_pipeline(
                pipe,
                guidance=plan.guidance,
                on_step_end=on_step_end,
                **{
                    key: value.to(pipe.device) if torch.is_tensor(value) else value
                    for key, value in sample.inputs.items()
                },
                height=plan.height,
                width=plan.width,
                num_frames=plan.frames,
                num_inference_steps=plan.steps,
                generator=torch.Generator("cpu").manual_seed(sample.seed),
                output_type="latent",
            )
        bar.close()
    finally:
        for name, transformer in transformers.items():
            if previous[name] is not None:
                apply_nabla(transformer, previous[name].config)
            else:
                remove_nabla(transformer)
    return stats
