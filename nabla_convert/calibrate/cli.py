"""`nabla-convert calibrate [MODEL] --out DIR`: the Click layer over nabla_convert.calibrate."""

from __future__ import annotations

from pathlib import Path

import click

from nabla_convert.calibrate import calibrate, recalibrate
from nabla_convert.calibrate.distributed import launched_processes
from nabla_convert.cli import model_argument
from nabla_convert.eval import load_prompts
from nabla_convert.io import DTYPES
from nabla_convert.shipped import shipped_folder

DEFAULT_PROMPTS = shipped_folder("calibration") / "prompts.txt"


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.replace(" ", ",").split(",") if part)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,1,2, got {value!r}") from None


@click.command("calibrate")
@click.argument("model", required=False, callback=model_argument)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Prompt file, one per line (default: {DEFAULT_PROMPTS.parent.name}/{DEFAULT_PROMPTS.name} of nabla-convert).",
)
@click.option(
    "--prompt-embeds",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Precomputed prompt embeddings (safetensors 'prompt_embeds' N,L,D [+ 'negative_prompt_embeds']): no text encoder.",
)
@click.option("--recipe", help="Recipe YAML (its nabla and calibrate sections), or the name of one in recipes/.")
@click.option("--steps", type=click.IntRange(min=1), help="Denoising steps per run [recipe, or 50].")
@click.option("--sample-steps", type=click.IntRange(min=1), help="How many steps to measure, spread evenly [5].")
@click.option("--seeds", callback=_int_list, help="Comma-separated seeds per prompt [0].")
@click.option("--height", type=click.IntRange(min=16), help="Video height in pixels [480].")
@click.option("--width", type=click.IntRange(min=16), help="Video width in pixels [832].")
@click.option("--frames", type=click.IntRange(min=1), help="Frames [81].")
@click.option("--guidance", type=float, help="CFG scale [5.0].")
@click.option("--target-density", type=click.FloatRange(0.0, 1.0, min_open=True), help="Mean block density target.")
@click.option(
    "--error-budget", type=click.FloatRange(min=0.0), help="Per-layer relative L2 attention-output error budget."
)
@click.option("--dense-layers", callback=_int_list, help="Comma-separated layers kept dense.")
@click.option("--dense-steps", type=click.IntRange(min=0), help="Run the first K steps dense (not searched).")
@click.option(
    "--per-head/--per-layer",
    default=None,
    help="Search one threshold per attention head, or one per layer [recipe, or per layer].",
)
@click.option("--query-blocks", type=click.IntRange(min=1), help="Query blocks per call whose error is computed [16].")
@click.option(
    "--from-stats",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Re-run only the search on a stats.safetensors from an earlier run (no model needed).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start over in an --out that holds another calibration (by default a rerun resumes its own stats).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", *sorted(DTYPES)]), default="auto", show_default=True)
def calibrate_command(model, out, prompts, prompt_embeds, recipe, from_stats, overwrite, device, dtype, **plan) -> None:
    """Measure MODEL's self-attention layers on prompts and choose each layer's NABLA threshold for a target.

    MODEL is a diffusers pipeline folder, a transformer folder (with --prompt-embeds) or a Hub
    id; omitted, the embedded reference model at its native size (256x256, 33 frames, 12 steps) on
    calibration/prompts_reference.txt (captions in its vocabulary). Writes nabla_config.json (for `convert --config`),
    calibration.json, report.md, PNG plots and stats.safetensors to --out. Rerun with the same
    settings into the same --out, a killed calibration resumes from its saved stats. Several GPUs:
    `accelerate launch --num_processes N -m nabla_convert.cli calibrate ...` (or `torchrun --nproc-per-node N`)
    shares the prompts and seeds over N processes; the outputs are those of one process.
    """
    if from_stats:
        if launched_processes() > 1:
            raise click.UsageError("--from-stats re-runs the search only: run it as one process")
        if model or prompts or prompt_embeds or recipe:
            raise click.UsageError(
                "--from-stats re-runs the search only: drop MODEL, --prompts, --prompt-embeds, --recipe"
            )
        search_only = ("target_density", "error_budget", "dense_layers", "dense_steps", "per_head")
        ignored = sorted(key for key, value in plan.items() if value is not None and key not in search_only)
        if ignored:
            raise click.UsageError(f"--from-stats takes only the search options; drop {', '.join(ignored)}")
        result = recalibrate(from_stats, out, overwrite=overwrite, **plan)
    else:
        if prompts and prompt_embeds:
            raise click.UsageError("give --prompts or --prompt-embeds, not both")
        if model is None:  # the embedded reference model, at its own size and vocabulary
            from nabla_convert import reference
            from nabla_convert.cli import default_model

            model, prompts = default_model(), prompts or DEFAULT_PROMPTS.with_name("prompts_reference.txt")
            native = {"height": reference.HEIGHT, "width": reference.WIDTH, "frames": reference.NUM_FRAMES}
            native |= {"steps": reference.RECOMMENDED_STEPS, "guidance": reference.RECOMMENDED_GUIDANCE}
            plan |= {key: value for key, value in native.items() if plan.get(key) is None}
        prompt_list = None if prompt_embeds else load_prompts(prompts or DEFAULT_PROMPTS)
        result = calibrate(
            model,
            out,
            prompts=prompt_list,
            prompt_embeds=prompt_embeds,
            recipe=recipe,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            **plan,
        )
        if result is None:  # not the main process: process 0 wrote the outputs and reports them
            return
    for name, choice in result.choices.items():
        s = choice.summary
        click.echo(
            f"{name}: mean density {s['mean_density']:.4f}, mean error {s['mean_error']:.4f}, "
            f"max error {s['max_error']:.4f}, {s['dense_layers']} dense layer(s)"
        )
    click.echo(f"wrote {out / 'nabla_config.json'} and {result.report}")
