"""nabla-convert command line: the group of the stage commands, each a thin Click layer in its package's cli.py."""

from __future__ import annotations

import importlib

import click

from nabla_convert.errors import one_line_errors

# name -> (module:attribute of the Click command, the one line `nabla-convert --help` shows for it)
LAZY_COMMANDS = {  # in pipeline order
    "calibrate": ("nabla_convert.calibrate.cli:calibrate_command", "Measure layers on prompts; choose thresholds."),
    "convert": ("nabla_convert.convert.cli:convert_command", "Rewrite self-attention into NABLA form; write it."),
    "adapt": ("nabla_convert.adapt.cli:adapt_command", "Fine-tune a converted model back to its dense self."),
    "push": ("nabla_convert.hub.cli:push", "Check, upload and verify a converted checkpoint on the Hub."),
    "eval": ("nabla_convert.eval.cli:eval_command", "Compare two pipelines on the same prompts and seeds."),
    "bench": ("nabla_convert.bench.cli:bench", "Time NABLA against dense attention on this GPU."),
}


class NablaGroup(click.Group):
    """Loads each stage's command only when it runs (so `--help` imports no torch, training or plotting stack),
    lists commands in pipeline order, and reports errors as one line with their exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(LAZY_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY_COMMANDS:
            return None
        module, attribute = LAZY_COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list without importing the commands."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, short_help) for name, (_, short_help) in LAZY_COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        """Every command under the exit-code policy of nabla_convert.errors."""
        with one_line_errors():
            return super().invoke(ctx)


@click.group(cls=NablaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nabla-convert")
def main() -> None:
    """Turn a dense video DiT into a NABLA sparse-attention model: calibrate -> convert -> adapt -> push."""


if __name__ == "__main__":  # accelerate launch -m nabla_convert.cli adapt ...
    main()
