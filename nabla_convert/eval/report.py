"""The eval report: eval.json, report.md, grid.png (A | B | |A-B| frames) and samples.gif, written atomically."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nabla_convert.config import threshold_text
from nabla_convert.eval.sampling import EvalResult, Preview
from nabla_convert.folders import write_marker
from nabla_convert.io import atomic_write, atomic_write_text, markdown_table


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
