"""nabla-convert command line: a thin Click layer over the Python API."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import click

from nabla_convert.config import ConfigError, NablaConfig, NablaError, load_config_file, parse_window
from nabla_convert.convert import SharedWeightsWarning, convert
from nabla_convert.folders import check_output
from nabla_convert.recipes import load_recipe


def default_model() -> str:
    """The embedded reference pipeline, used when a command's MODEL is omitted."""
    from nabla_convert.reference import REFERENCE_PIPELINE

    if not (REFERENCE_PIPELINE / "model_index.json").is_file():
        raise click.ClickException(
            f"no MODEL given and the embedded reference model is missing at {REFERENCE_PIPELINE}"
        )
    return str(REFERENCE_PIPELINE)


def model_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A MODEL folder or Hub id: an empty one is a mistake (it would mean the current folder), not the default."""
    if value is not None and not value.strip():
        raise click.BadParameter("empty; give a folder or a Hub id, or leave it out for the reference model")
    return value


def _window(ctx: click.Context, param: click.Parameter, value: str | None):
    try:
        return parse_window(value)
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None


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


# name -> (module:attribute of the Click command, the one line `nabla-convert --help` shows for it)
LAZY_COMMANDS = {
    "calibrate": ("nabla_convert.calibrate.cli:calibrate_command", "Measure layers on prompts; choose thresholds."),
    "adapt": ("nabla_convert.adapt.cli:adapt_command", "Fine-tune a converted model back to its dense self."),
    "push": ("nabla_convert.hub.cli:push", "Check, upload and verify a converted checkpoint on the Hub."),
    "eval": ("nabla_convert.eval_cli:eval_command", "Compare two pipelines on the same prompts and seeds."),
    "bench": ("nabla_convert.bench_cli:bench", "Time NABLA against dense attention on this GPU."),
}


class NablaGroup(click.Group):
    """Loads each stage's command only when it runs (so `--help` and `convert` import no training or plotting
    stack), lists commands in pipeline order, and reports errors as one line with their exit code."""

    order = ("calibrate", "convert", "adapt", "push", "eval", "bench")

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = {*self.commands, *LAZY_COMMANDS}
        return sorted(names, key=lambda name: self.order.index(name) if name in self.order else len(self.order))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands or name not in LAZY_COMMANDS:
            return self.commands.get(name)
        module, attribute = LAZY_COMMANDS[name][0].split(":")
        command = getattr(importlib.import_module(module), attribute)
        self.add_command(command, name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list without importing the lazy commands."""
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
            else:
                rows.append((name, self.commands[name].get_short_help_str(formatter.width - 6 - len(name))))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        """The exit-code policy of nabla_convert.errors: a NablaError exits with its code, a file the operating
        system refuses with 1, each as one "Error: ..." line; Click's usage errors exit with 2."""
        try:
            return super().invoke(ctx)
        except (NablaError, OSError) as err:
            failure = click.ClickException(" ".join(str(err).split()))
            failure.exit_code = getattr(err, "exit_code", 1)
            raise failure from None


@click.group(cls=NablaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nabla-convert")
def main() -> None:
    """Turn a dense video DiT into a NABLA sparse-attention model: calibrate -> convert -> adapt -> push."""


@main.command("convert")
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
@click.option("--sta", callback=_window, help="Sliding-tile window wT,wH,wW in tiles, OR-ed with the NABLA mask.")
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
    "a weight file is cloned, else hard-linked (the same file as MODEL's: anything that later writes into it in "
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
    model = default_model() if model is None else model
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


if __name__ == "__main__":  # accelerate launch -m nabla_convert.cli adapt ...
    main()
