"""`nabla-convert convert [MODEL] --out DIR`: the Click layer over nabla_convert.convert."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from nabla_convert import reference
from nabla_convert.config import NablaConfig, load_config_file
from nabla_convert.convert import SharedWeightsWarning, convert
from nabla_convert.folders import check_output
from nabla_convert.options import StaWindow, model_argument
from nabla_convert.recipes import load_recipe


def nabla_settings(
    config: Path | None, recipe: str | None, threshold: float | None, sta, dense_steps: int | None
) -> NablaConfig | dict[str, NablaConfig] | None:
    """One source of NABLA settings: --config, --recipe, or --threshold [--sta] [--dense-steps];
    none (None) means the checkpoint's own settings."""
    given = [
        name for name, v in (("--config", config), ("--recipe", recipe), ("--threshold", threshold)) if v is not None
    ]
    if len(given) > 1:
        raise click.UsageError("give at most one of --config FILE, --recipe FILE or --threshold T")
    if (sta is not None or dense_steps is not None) and threshold is None:
        raise click.UsageError("--sta and --dense-steps go with --threshold (recipes and configs carry their own)")
    if config:
        return load_config_file(config)
    if recipe:
        return load_recipe(recipe).nabla
    if threshold is None:
        return None
    return NablaConfig(threshold=threshold, sta=sta, dense_steps=dense_steps or 0)


@click.command("convert")
@click.argument("model", required=False, callback=model_argument)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder (created).")
@click.option(
    "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="NABLA config JSON (from calibrate)."
)
@click.option("--recipe", help="Recipe YAML file, or the name of one in recipes/.")
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    help="One threshold for every layer: the share of pooled attention mass each query block keeps, in [0, 1] "
    "(0 with --sta: the STA window alone).",
)
@click.option("--sta", type=StaWindow(), help="Sliding-tile window wT,wH,wW in tiles, OR-ed with the NABLA mask.")
@click.option("--dense-steps", type=click.IntRange(min=0), help="Run the first K denoising steps dense.")
@click.option("--revision", help="Hub revision when MODEL is a Hub id.")
@click.option("--token", envvar="HF_TOKEN", help="Hub token when MODEL is a private Hub id.")
@click.option(
    "--overwrite", is_flag=True, help="Replace --out if it exists and is not empty (only a folder nabla-convert wrote)."
)
@click.option(
    "--base",
    help="Dense diffusers pipeline (folder or Hub id) that completes a checkpoint in its family's own layout "
    "(e.g. the published NABLA fine-tunes, shipped in their family's original layout).",
)
@click.option(
    "--copy",
    is_flag=True,
    help="Never hard-link weight files: clone them where the filesystem can (reflink), else copy them. By default "
    "a weight file is cloned, else hard-linked if 64 MiB or more (the same file as MODEL's: anything that later writes into it in "
    "place, rather than replacing it, changes MODEL too; convert warns), else copied.",
)
def convert_command(
    model, out, config, recipe, threshold, sta, dense_steps, revision, token, overwrite, base, copy
) -> None:
    """Rewrite MODEL's self-attention into NABLA form and write a self-describing checkpoint to --out.

    MODEL is a diffusers pipeline folder of a supported family, a transformer folder, or a Hub id; omitted,
    the embedded reference model. The output loads with the stock pipeline's from_pretrained(OUT) or
    nabla_convert.load(OUT); weights stay bit-exact (hard-linked on the same filesystem, else copied).
    With --config DIR/nabla_config.json from calibrate, DIR/calibration.json goes along into
    OUT/nabla_reports/ for the model card. Without settings, the checkpoint's own are used (families whose
    config carries NABLA settings). A checkpoint in its family's original layout needs --base, the dense
    diffusers pipeline of the same architecture (README: importing the published NABLA fine-tunes).
    """
    settings = nabla_settings(config, recipe, threshold, sta, dense_steps)
    model = reference.default_model() if model is None else model
    inputs = {"MODEL": model, "--config file": config, **({"--base": base} if base else {})}
    check_output(out, inputs, overwrite=overwrite)
    calibration = config.parent / "calibration.json" if config else None
    reports = {"calibration": calibration} if calibration and calibration.is_file() else None
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", SharedWeightsWarning)
        written = convert(
            model,
            out,
            settings,
            revision=revision,
            token=token,
            overwrite=overwrite,
            reports=reports,
            base=base,
            link=not copy,
        )
    for warning in warned:
        if issubclass(warning.category, SharedWeightsWarning):
            click.echo(f"Warning: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    click.echo(f"wrote NABLA checkpoint to {written}")
