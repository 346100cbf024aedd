"""`nabla-convert bench`: the Click layer over nabla_convert.bench.run_bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nabla_convert.config import CONFIG_KEY, ConfigError, NablaConfig, parse_window
from nabla_convert.folders import FolderError, check_output_file
from nabla_convert.io import read_json
from nabla_convert.models import family_for_arch, family_for_class_name
from nabla_convert.recipes import load_recipe

if TYPE_CHECKING:
    from nabla_convert.models.family import ModelFamily


def _model_config(model: Path) -> tuple[ModelFamily, dict[str, Any], NablaConfig | None]:
    """Family, architecture (transformer constructor kwargs) and NABLA settings of a pipeline or transformer folder."""
    for candidate in (model / "transformer" / "config.json", model / "config.json"):
        if candidate.is_file():
            data = read_json(candidate, "model config", dict)
            family = family_for_class_name(data.get("_class_name"))
            if family is None:
                raise click.BadParameter(f"{candidate} holds no supported transformer", param_hint="MODEL")
            nabla = NablaConfig.from_dict(data[CONFIG_KEY]) if CONFIG_KEY in data else None
            return family, {k: v for k, v in data.items() if not k.startswith("_")}, nabla
    raise click.BadParameter(f"{model} holds no transformer/config.json or config.json", param_hint="MODEL")


def _is_bench_report(path: Path) -> bool:
    """Whether `path` holds a report bench wrote (so --out may replace it)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and {"summary", "environment"} <= report.keys()


def _densities(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    if value is None:
        return ()
    try:
        densities = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"densities must be comma-separated numbers like 0.05,0.1, got {value!r}") from None
    if not densities or any(not 0.0 < d <= 1.0 for d in densities):
        raise click.BadParameter(f"every density must be in (0, 1], got {value!r}")
    return densities


@click.command("bench")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--arch", help="Architecture preset with random weights (e.g. wan2.1-t2v-14b, kandinsky5-t2v-lite).")
@click.option("--resolution", default="832x480", show_default=True, help="Video size WIDTHxHEIGHT.")
@click.option("--frames", type=click.IntRange(min=1), default=81, show_default=True)
@click.option("--density", callback=_densities, help="Forced densities, comma-separated (random key blocks per row).")
@click.option("--threshold", type=float, help="NABLA threshold (instead of the model's or recipe's).")
@click.option("--sta", help="STA window wT,wH,wW in tiles, e.g. 11,3,3.")
@click.option("--recipe", help="Recipe name or YAML path whose NABLA settings to use.")
@click.option("--q-block", type=click.Choice(["64", "128"]), help="Query block (default: the config's).")
@click.option("--kv-block", type=click.Choice(["64", "128"]), help="Key block (default: the config's).")
@click.option(
    "--layers", type=click.IntRange(min=1), default=4, show_default=True, help="Blocks in the timed transformer step."
)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="2 = a CFG batch.")
@click.option("--skip-step", is_flag=True, help="Only the per-attention-call table.")
@click.option("--compiled", is_flag=True, help="Also time the step under diffusers' compile_repeated_blocks().")
@click.option(
    "--builtin",
    is_flag=True,
    help="Also time the family's own NABLA in diffusers, where it has one, compiled as ours.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default="bench.json",
    show_default=True,
    help="JSON report (an existing file is replaced only if it is an earlier bench report).",
)
def bench(
    model,
    arch,
    resolution,
    frames,
    density,
    threshold,
    sta,
    recipe,
    q_block,
    kv_block,
    layers,
    batch,
    skip_step,
    compiled,
    builtin,
    out,
) -> None:
    """Time NABLA against the best dense SDPA on this GPU, per attention call and per transformer step.

    MODEL is a (converted) pipeline or transformer folder: its architecture and NABLA settings are
    used with random weights. Or give --arch. Prints a table and writes JSON to --out.
    """
    from nabla_convert.bench import GPUUnavailableError, parse_resolution, run_bench

    if (model is None) == (arch is None):
        raise click.UsageError("give either MODEL or --arch")
    if density and (threshold is not None or recipe is not None):
        raise click.UsageError("--density forces the selection; it cannot be combined with --threshold or --recipe")
    try:
        check_output_file(out, {"MODEL": model}, _is_bench_report)
    except FolderError as err:
        raise click.ClickException(str(err)) from None
    try:
        size = parse_resolution(resolution)
        if arch is not None:
            family = family_for_arch(arch)
            model_config, nabla = dict(family.archs[arch]), None
        else:
            family, model_config, nabla = _model_config(model)
            arch = model.name
        family.token_grid(size, frames, family.patch_size(model_config))
        if recipe is not None:
            nabla = load_recipe(recipe).nabla
        nabla = nabla or NablaConfig()
        overrides = {
            "threshold": threshold,
            "q_block": q_block and int(q_block),
            "kv_block": kv_block and int(kv_block),
        }
        if sta is not None:
            overrides["sta"] = parse_window(sta)
        nabla = NablaConfig.from_dict({**nabla.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
        report = run_bench(
            family=family,
            arch=arch,
            model_config=model_config,
            resolution=size,
            frames=frames,
            nabla=nabla,
            densities=density,
            layers=layers,
            batch=batch,
            step=not skip_step,
            compiled=compiled,
            builtin=builtin,
        )
    except GPUUnavailableError as err:
        raise click.ClickException(str(err)) from None
    except (ConfigError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    click.echo(report.table())
    click.echo(f"wrote {report.write(out)}")
