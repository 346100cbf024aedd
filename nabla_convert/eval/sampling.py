"""Sampling both pipelines on the same prompts and seeds, and what is measured on the samples: the metrics of
B against A, each transformer's flow-matching loss on held-out latents, NABLA block densities per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nabla_convert.config import (
    CONFIG_KEY,
    ConfigError,
    NablaConfig,
    check_int,
    check_number,
    check_video_size,
)
from nabla_convert.errors import NablaError
from nabla_convert.eval.metrics import compare_latents, compare_videos
from nabla_convert.models import family_of_pipeline
from nabla_convert.models.nabla import layer_densities, reset_densities
from nabla_convert.reference import HEIGHT, NUM_FRAMES, RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS, WIDTH
from nabla_convert.reference.flow import flow_matching_loss as velocity_loss


class EvalError(NablaError, ValueError):
    """Bad eval input (missing folder, empty prompt file, ...), with a one-line message."""


@dataclass(frozen=True)
class EvalSettings:
    """How every sample is drawn; the same for both pipelines. Defaults fit the bundled reference model."""

    steps: int = RECOMMENDED_STEPS
    guidance: float = RECOMMENDED_GUIDANCE
    height: int = HEIGHT
    width: int = WIDTH
    frames: int = NUM_FRAMES
    loss_seed: int = 0
    preview_samples: int = 3
    preview_frames: int = 4

    def __post_init__(self) -> None:
        try:
            for name in ("steps", "height", "width", "frames"):
                check_int(getattr(self, name), name, minimum=1)
            check_number(self.guidance, "guidance")
            check_video_size(self.height, self.width)
        except ConfigError as err:
            raise EvalError(str(err)) from None


@dataclass
class HeldOut:
    """Clean latents (C, F, H, W) in the transformer's latent space, with the caption of each."""

    latents: list[torch.Tensor]
    prompts: list[str]
    source: str


@dataclass
class SampleMetrics:
    index: int
    prompt: str
    seed: int
    latent_psnr: float
    latent_ssim: float
    pixel_psnr: float
    pixel_ssim: float


@dataclass
class Preview:
    """Decoded videos (F, C, H, W) in [0, 1] of one sample from A and from B, for the grid and GIF."""

    index: int
    prompt: str
    seed: int
    video_a: torch.Tensor
    video_b: torch.Tensor


@dataclass
class EvalResult:
    name_a: str
    name_b: str
    settings: EvalSettings
    samples: list[SampleMetrics]
    held_out: HeldOut
    loss_a: list[float]
    loss_b: list[float]
    densities: list[dict[str, Any]]
    previews: list[Preview] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """Flat key -> number/string, the "summary" object of eval.json."""
        summary: dict[str, Any] = {
            "model_a": self.name_a,
            "model_b": self.name_b,
            "samples": len(self.samples),
            **{k: v for k, v in asdict(self.settings).items() if not k.startswith("preview")},
            "held_out": self.held_out.source,
            "held_out_samples": len(self.loss_a),
        }
        for metric in ("latent_psnr", "latent_ssim", "pixel_psnr", "pixel_ssim"):
            values = [getattr(s, metric) for s in self.samples]
            summary[f"{metric}_mean"] = float(np.mean(values))
            summary[f"{metric}_min"] = float(np.min(values))
        summary["loss_a"] = float(np.mean(self.loss_a))
        summary["loss_b"] = float(np.mean(self.loss_b))
        summary["loss_b_minus_a"] = summary["loss_b"] - summary["loss_a"]
        for which in ("a", "b"):
            rows = [row["density"] for row in self.densities if row["pipeline"] == which]
            if rows:
                summary[f"density_{which}"] = float(np.mean(rows))
        return summary

    def to_json(self) -> dict[str, Any]:
        held_out_rows = [
            {"index": i, "prompt": prompt, "loss_a": a, "loss_b": b}
            for i, (prompt, a, b) in enumerate(zip(self.held_out.prompts, self.loss_a, self.loss_b, strict=True))
        ]
        return {
            "summary": self.summary(),
            "samples": [asdict(s) for s in self.samples],
            "held_out": held_out_rows,
            "layers": self.densities,
        }


def generate(pipe: Any, prompt: str, seed: int, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: final latents (C, F, H, W) as the transformer sees them and the decoded video (F, C, H, W).

    The noise comes from a CPU generator, so a seed gives the same start on every device.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep_latents(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        captured["latents"] = tensors["latents"]
        return {}

    family = family_of_pipeline(pipe)
    output = family.run_pipeline(
        pipe,
        guidance=settings.guidance,
        on_step_end=keep_latents,
        prompt=prompt,
        height=settings.height,
        width=settings.width,
        num_frames=settings.frames,
        num_inference_steps=settings.steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    )
    latents = family.clean_latents(pipe, captured["latents"])
    return latents[0].float().cpu(), output.frames[0].float().cpu()


@torch.inference_mode()
def flow_matching_loss(pipe: Any, latents: torch.Tensor, prompt: str, seed: int, steps: int) -> float:
    """Mean flow-matching MSE of the pipeline's transformer on clean `latents` (C, F, H, W).

    The objective is the reference model's own (x_t = (1 - s) x0 + s noise, target noise - x0,
    timestep 1000 s), evaluated at every sigma the pipeline's scheduler visits in `steps` steps, one
    call each, high noise first, so per-step rules (NABLA dense_steps) apply as they do when
    sampling. The noise is seeded by `seed`.
    """
    device = pipe._execution_device
    pipe.scheduler.set_timesteps(steps, device="cpu")
    sigmas = pipe.scheduler.sigmas[:steps].float()
    x0 = latents.float().unsqueeze(0).to(device)
    family = family_of_pipeline(pipe)
    embeds = family.encode_prompts(pipe, [prompt])
    generator = torch.Generator("cpu").manual_seed(seed)
    losses = [
        velocity_loss(
            family.denoiser_for(pipe, float(sigma) * pipe.scheduler.config.num_train_timesteps),
            x0,
            embeds,
            sigma.view(1).to(device),
            torch.randn(x0.shape, generator=generator).to(device),
            velocity=family.velocity,
        )
        for sigma in sigmas
    ]
    return float(torch.cat(losses).mean())


def nabla_transformers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's transformers that run NABLA attention (their config carries the NABLA settings)."""
    found = family_of_pipeline(pipe).transformers(pipe)
    return {name: module for name, module in found.items() if CONFIG_KEY in module.config}


def reset_pipeline_densities(pipe: Any) -> None:
    """Start density counts afresh, so they cover this evaluation's sampling passes only."""
    for transformer in nabla_transformers(pipe).values():
        reset_densities(transformer)


def density_rows(pipe: Any, which: str) -> list[dict[str, Any]]:
    """Per-layer mean block density since the last reset, with each layer's NABLA settings; none for dense models."""
    rows = []
    for name, transformer in nabla_transformers(pipe).items():
        config = NablaConfig.from_dict(dict(transformer.config[CONFIG_KEY]))
        for layer, density in sorted(layer_densities(transformer).items()):
            settings = config.layer(layer)
            rows.append(
                {
                    "pipeline": which,
                    "transformer": name,
                    "layer": layer,
                    "density": float(density),
                    "threshold": settings.threshold,
                    "sta": "-".join(map(str, settings.sta)) if settings.sta else None,
                    "dense": settings.dense,
                }
            )
    return rows


def evaluate(
    pipe_a: Any,
    pipe_b: Any,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    settings: EvalSettings | None = None,
    *,
    held_out: HeldOut | None = None,
    max_samples: int | None = None,
    names: tuple[str, str] = ("A", "B"),
    progress: bool = True,
) -> EvalResult:
    """Run every (prompt, seed) through A and B and compare B against A.

    The flow-matching loss of each is measured on `held_out`, by default A's own samples. Densities
    count the sampling passes only. The pipelines' own progress bars are switched off.
    """
    settings = settings or EvalSettings()
    cases = [(prompt, seed) for prompt in prompts for seed in seeds][:max_samples]
    if not cases:
        raise EvalError("nothing to evaluate: no prompts or no seeds")
    for pipe in (pipe_a, pipe_b):
        pipe.set_progress_bar_config(disable=True)
        reset_pipeline_densities(pipe)
    samples, previews, latents_a = [], [], []
    for index, (prompt, seed) in enumerate(tqdm(cases, desc="eval samples", unit="sample", disable=not progress)):
        latent_a, video_a = generate(pipe_a, prompt, seed, settings)
        latent_b, video_b = generate(pipe_b, prompt, seed, settings)
        latents_a.append(latent_a)
        samples.append(
            SampleMetrics(index, prompt, seed, *compare_latents(latent_a, latent_b), *compare_videos(video_a, video_b))
        )
        if index < settings.preview_samples:
            previews.append(Preview(index, prompt, seed, video_a, video_b))
    densities = density_rows(pipe_a, "a") + density_rows(pipe_b, "b")
    held_out = held_out or HeldOut(latents_a, [prompt for prompt, _ in cases], f"samples of {names[0]}")
    loss_a, loss_b = (
        held_out_losses(pipe, held_out, settings, name, progress)
        for pipe, name in zip((pipe_a, pipe_b), names, strict=True)
    )
    return EvalResult(*names, settings, samples, held_out, loss_a, loss_b, densities, previews)


def held_out_losses(pipe: Any, held_out: HeldOut, settings: EvalSettings, name: str, progress: bool) -> list[float]:
    """Flow-matching loss per held-out latent; sample i uses noise seed loss_seed + i for every pipeline."""
    pairs = list(zip(held_out.latents, held_out.prompts, strict=True))
    return [
        flow_matching_loss(pipe, latents, prompt, settings.loss_seed + i, settings.steps)
        for i, (latents, prompt) in enumerate(
            tqdm(pairs, desc=f"held-out loss {name}", unit="sample", disable=not progress)
        )
    ]
