"""`nabla-convert eval A B --out DIR`: the Click layer over nabla_convert.eval.run_eval."""

from __future__ import annotations

from pathlib import Path

import click

from nabla_convert import reference
from nabla_convert.io import DTYPES
from nabla_convert.options import CommaList, model_argument


@click.command("eval")
@click.argument("model_a", callback=model_argument)
@click.argument("model_b", callback=model_argument)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Prompt file, one per line (default: the reference model's held-out prompts).",
)
@click.option("--seeds", type=CommaList(int), default="0", show_default=True, help="Comma-separated seeds per prompt.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=reference.RECOMMENDED_STEPS,
    show_default=True,
    help="Denoising steps per sample.",
)
@click.option("--guidance", type=float, default=reference.RECOMMENDED_GUIDANCE, show_default=True, help="CFG scale.")
@click.option(
    "--height", type=click.IntRange(min=16), default=reference.HEIGHT, show_default=True, help="Video height in pixels."
)
@click.option(
    "--width", type=click.IntRange(min=16), default=reference.WIDTH, show_default=True, help="Video width in pixels."
)
@click.option(
    "--frames", type=click.IntRange(min=1), default=reference.NUM_FRAMES, show_default=True, help="Frames per video."
)
@click.option("--max-samples", type=click.IntRange(min=1), help="Evaluate at most this many (prompt, seed) pairs.")
@click.option(
    "--latents",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Held-out latents (safetensors: 'latents' N,C,F,H,W + 'prompts' metadata) for the loss; default: A's samples.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option(
    "--dtype",
    type=click.Choice(sorted(DTYPES)),
    default="float32",
    show_default=True,
    help="Weights dtype of both pipelines.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds an earlier nabla-convert report.")
def eval_command(
    model_a,
    model_b,
    out,
    prompts,
    seeds,
    steps,
    guidance,
    height,
    width,
    frames,
    max_samples,
    latents,
    device,
    dtype,
    overwrite,
) -> None:
    """Run the same prompts and seeds through MODEL_A and MODEL_B and compare B against A.

    Writes report.md, eval.json, grid.png and samples.gif to --out: per-sample latent and pixel
    PSNR/SSIM, each transformer's flow-matching loss on held-out latents, per-layer NABLA density.
    MODEL_A/MODEL_B are diffusers pipeline folders (dense or converted) or Hub ids.
    """
    from nabla_convert.eval.run import run_eval
    from nabla_convert.eval.sampling import EvalSettings

    settings = EvalSettings(steps=steps, guidance=guidance, height=height, width=width, frames=frames)
    result = run_eval(
        model_a,
        model_b,
        out,
        prompts_file=prompts,
        seeds=seeds,
        settings=settings,
        max_samples=max_samples,
        latents_file=latents,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
    )
    summary = result.summary()
    click.echo(
        f"{summary['samples']} samples: pixel PSNR {summary['pixel_psnr_mean']:.2f} dB, "
        f"SSIM {summary['pixel_ssim_mean']:.4f}; held-out loss A {summary['loss_a']:.4g}, "
        f"B {summary['loss_b']:.4g}; report in {out / 'report.md'}"
    )
