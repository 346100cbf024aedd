"""Compare two video pipelines (e.g. dense and NABLA) on the same prompts and seeds.

Quality is measured, never assumed: per sample latent and pixel PSNR/SSIM of B against A, the
flow-matching loss of each transformer on held-out latents, and the per-layer block density of
NABLA models. `run_eval` loads two pipeline folders and writes report.md, eval.json (a "summary"
object as in the converted checkpoint's nabla_reports/), grid.png and samples.gif.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nabla_convert.config import (
    CONFIG_KEY,
    ConfigError,
    NablaConfig,
    check_int,
    check_number,
    check_video_size,
    threshold_text,
)
from nabla_convert.convert import load_pipeline, resolve_model
from nabla_convert.errors import NablaError
from nabla_convert.folders import check_output, public_name, write_marker
from nabla_convert.io import (
    atomic_write,
    atomic_write_text,
    markdown_table,
    open_safetensors,
)
from nabla_convert.models import family_of_pipeline
from nabla_convert.models.nabla import layer_densities, reset_densities
from nabla_convert.reference import HEIGHT, NUM_FRAMES, RECOMMENDED_GUIDANCE, RECOMMENDED_STEPS, WIDTH, heldout_prompts
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


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; infinite when the tensors are identical."""
    mse = float(torch.mean((reference.double() - test.double()) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (structural similarity, IEEE TIP 2004) of images (N, C, H, W): gaussian window, per channel, valid region only.

    Images smaller than the window use the largest odd window that fits, so tiny latents still count.
    """
    if reference.shape != test.shape or reference.dim() != 4:
        raise ValueError(f"ssim expects two (N, C, H, W) tensors of one shape, got {reference.shape} and {test.shape}")
    x, y = reference.double(), test.double()
    channels = x.shape[1]
    size = min(window, *x.shape[-2:])
    size -= 1 - size % 2
    kernel = gaussian_window(size, sigma)

    def blur(image: torch.Tensor) -> torch.Tensor:
        rows = F.conv2d(image, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, size), groups=channels)
        return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, size, 1), groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def compare_latents(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of latents (C, F, H, W), frame by frame, with A's value range as the peak."""
    data_range = float(a.max() - a.min())
    frames_a, frames_b = a.transpose(0, 1), b.transpose(0, 1)
    return psnr(frames_a, frames_b, data_range), ssim(frames_a, frames_b, data_range)


def compare_videos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of decoded videos (F, C, H, W) in [0, 1]."""
    return psnr(a, b, 1.0), ssim(a, b, 1.0)


def generate(pipe: Any, prompt: str, seed: int, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: final latents (C, F, H, W) as the transformer sees them and the decoded video (F, C, H, W).

    The noise comes from a CPU generator, so a seed gives the same start on every device.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep_latents(pipeline: Any, step: int, timestep: Any, tensors: dict[str, torch.Tensor]) -> dict:
        captured["latents"] = tensors["latents"]
        return {}

    output = pipe(
        prompt=prompt,
        height=settings.height,
        width=settings.width,
        num_frames=settings.frames,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    latents = family_of_pipeline(pipe).clean_latents(pipe, captured["latents"])
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


def json_safe(value: Any) -> Any:
    """JSON has no infinity: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def preview_frames(preview: Preview, count: int) -> list[int]:
    frames = preview.video_a.shape[0]
    return sorted({round(i * (frames - 1) / max(count - 1, 1)) for i in range(min(count, frames))})


def to_image(frame: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) float array for matplotlib."""
    return frame.clamp(0, 1).permute(1, 2, 0).numpy()


def save_grid(result: EvalResult, path: Path) -> None:
    """Rows of (sample, frame); columns A | B | |A-B| (raw difference, its maximum in the title)."""
    from matplotlib.figure import Figure

    rows = [(p, f) for p in result.previews for f in preview_frames(p, result.settings.preview_frames)]
    height, width = result.previews[0].video_a.shape[-2:]
    panel = 2.2
    figure = Figure(figsize=(3 * panel, len(rows) * panel * height / width + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for row, (preview, frame) in zip(axes, rows, strict=True):
        a, b = preview.video_a[frame], preview.video_b[frame]
        difference = (a - b).abs()
        titles = ("A", "B", f"|A-B| max {float(difference.max()):.3f}")
        for axis, image, title in zip(row, (a, b, difference), titles, strict=True):
            axis.imshow(to_image(image))
            axis.set_title(title, fontsize=7)
            axis.set_xticks([])
            axis.set_yticks([])
        label = f"#{preview.index} seed {preview.seed} frame {frame}\n{textwrap.shorten(preview.prompt, 40)}"
        row[0].set_ylabel(label, fontsize=6)
    figure.suptitle(f"A = {result.name_a}\nB = {result.name_b}", fontsize=8)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def save_gif(result: EvalResult, path: Path, fps: int = 8) -> None:
    """Every frame of the preview samples, one sample per row: A | B | |A-B|."""
    from PIL import Image

    def frame_image(index: int) -> Image.Image:
        rows = [
            torch.cat([p.video_a[index], p.video_b[index], (p.video_a[index] - p.video_b[index]).abs()], dim=-1)
            for p in result.previews
        ]
        pixels = (to_image(torch.cat(rows, dim=-2)) * 255).round().astype(np.uint8)
        return Image.fromarray(pixels)

    images = [frame_image(i) for i in range(result.previews[0].video_a.shape[0])]
    atomic_write(
        path,
        lambda tmp: images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0
        ),
    )


def render_report(result: EvalResult) -> str:
    summary = result.summary()
    parts = [
        f"# Eval: {result.name_b} vs {result.name_a}",
        f"A = `{result.name_a}` (reference), B = `{result.name_b}`. {summary['samples']} samples, "
        f"{summary['steps']} steps, guidance {summary['guidance']}, {summary['frames']} frames at "
        f"{summary['height']}x{summary['width']}. PSNR/SSIM of B against A (latents: peak = A's value range; "
        "pixels: peak 1); infinite PSNR means identical outputs.",
        "## Summary",
        markdown_table(("metric", "value"), list(summary.items())),
        "## Samples",
        markdown_table(
            ("#", "prompt", "seed", "latent PSNR dB", "latent SSIM", "pixel PSNR dB", "pixel SSIM"),
            [
                (s.index, s.prompt, s.seed, s.latent_psnr, s.latent_ssim, s.pixel_psnr, s.pixel_ssim)
                for s in result.samples
            ],
        ),
        f"## Held-out flow-matching loss\nOn {result.held_out.source}; the same noise and timesteps for A and B.",
        markdown_table(
            ("#", "prompt", "loss A", "loss B"),
            [
                (i, p, a, b)
                for i, (p, a, b) in enumerate(zip(result.held_out.prompts, result.loss_a, result.loss_b, strict=True))
            ],
        ),
    ]
    if result.densities:
        parts += [
            "## Block density per layer\nMean fraction of key blocks kept over the sampling passes.",
            markdown_table(
                ("pipeline", "transformer", "layer", "density", "threshold", "STA", "dense"),
                [
                    (
                        r["pipeline"].upper(),
                        r["transformer"],
                        r["layer"],
                        r["density"],
                        threshold_text(r["threshold"]),
                        r["sta"],
                        r["dense"],
                    )
                    for r in result.densities
                ],
            ),
        ]
    else:
        parts.append("## Block density per layer\nNeither pipeline runs NABLA attention.")
    parts.append("## Samples side by side\n![A | B | |A-B|](grid.png)\n\n![animated](samples.gif)")
    return "\n\n".join(parts) + "\n"


def write_outputs(result: EvalResult, out_dir: str | os.PathLike) -> Path:
    """report.md, eval.json, grid.png and samples.gif in `out_dir`, each written atomically, and the folder's marker."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_marker(out_dir, "eval")
    atomic_write_text(out_dir / "eval.json", json.dumps(json_safe(result.to_json()), indent=2, allow_nan=False) + "\n")
    save_grid(result, out_dir / "grid.png")
    save_gif(result, out_dir / "samples.gif")
    atomic_write_text(out_dir / "report.md", render_report(result))
    return out_dir


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """One prompt per non-empty line; without a path, the reference model's bundled held-out prompts."""
    return heldout_prompts(path)


def load_held_out(path: str | os.PathLike) -> HeldOut:
    """Held-out latents from a safetensors file: tensor "latents" (N, C, F, H, W), metadata "prompts" (JSON list)."""
    path = Path(path)
    with open_safetensors(path, "latent file") as handle:
        if "latents" not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise EvalError(f"{path}: no tensor named 'latents'")
        latents = handle.get_tensor("latents")
        prompts = json.loads((handle.metadata() or {}).get("prompts", "null"))
    if latents.dim() != 5 or not isinstance(prompts, list) or len(prompts) != latents.shape[0]:
        raise EvalError(
            f"{path}: needs latents (N, C, F, H, W) and metadata 'prompts', a JSON list of N captions; "
            f"got latents {tuple(latents.shape)} and {type(prompts).__name__} prompts"
        )
    return HeldOut(list(latents.unbind(0)), [str(p) for p in prompts], path.name)


def pipeline_folder(path: str | os.PathLike) -> Path:
    """A local pipeline folder, or a Hub id downloaded; an error unless it has a model_index.json."""
    folder, _ = resolve_model(path)
    if not (folder / "model_index.json").is_file():
        raise EvalError(f"not a diffusers pipeline folder (no model_index.json): {path}")
    return folder


def run_eval(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prompts_file: str | os.PathLike | None = None,
    seeds: Sequence[int] = (0,),
    settings: EvalSettings | None = None,
    max_samples: int | None = None,
    latents_file: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = True,
    overwrite: bool = False,
) -> EvalResult:
    """Load two pipeline folders, evaluate B against A and write the report files into `out_dir`.

    `out_dir` must not touch the inputs; an existing non-empty one is replaced only with `overwrite`, and only when
    nabla-convert wrote it. The report names each model by its Hub id or folder name, never its local path.
    """
    inputs = {"MODEL_A": path_a, "MODEL_B": path_b, "--prompts file": prompts_file, "--latents file": latents_file}
    check_output(out_dir, inputs, overwrite=overwrite)
    prompts = load_prompts(prompts_file)
    held_out = load_held_out(latents_file) if latents_file is not None else None
    folder_a, folder_b = pipeline_folder(path_a), pipeline_folder(path_b)  # both checked before the slow loads
    pipe_a, pipe_b = (load_pipeline(folder, device=device, dtype=dtype) for folder in (folder_a, folder_b))
    result = evaluate(
        pipe_a,
        pipe_b,
        prompts,
        seeds,
        settings,
        held_out=held_out,
        max_samples=max_samples,
        names=(public_name(path_a), public_name(path_b)),
        progress=progress,
    )
    write_outputs(result, out_dir)
    return result
