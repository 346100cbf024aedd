"""nabla-convert command line: a thin Click layer over the Python API."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nabla-convert")
def main() -> None:
    """Turn a dense video DiT into a NABLA sparse-attention model: calibrate -> convert -> adapt -> push."""
