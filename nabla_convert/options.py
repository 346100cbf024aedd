"""Click parameter types and callbacks shared by the stage commands (each stage's command is in its package's cli.py)."""

from __future__ import annotations

import re
from typing import Any

import click

from nabla_convert.config import ConfigError, parse_window


def model_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A MODEL folder or Hub id: an empty one is a mistake (it would mean the current folder), not the default."""
    if value is not None and not value.strip():
        raise click.BadParameter("empty; give a folder or a Hub id, or leave it out for the reference model")
    return value


class CommaList(click.ParamType):
    """Comma-separated numbers, e.g. --seeds 0,1,2 -> (0, 1, 2): each read by `item` (int or float), `count` of them
    when given (at least one unless `allow_empty`), each inside [minimum, maximum] (above `minimum` with
    `open_minimum`). `separators` are the characters
    besides the comma that split values (a latent shape reads 9x32x32 too)."""

    def __init__(
        self,
        item: type = int,
        *,
        count: int | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        open_minimum: bool = False,
        allow_empty: bool = False,
        separators: str = " ",
        example: str = "0,1,2",
    ) -> None:
        self.item, self.count, self.example, self.allow_empty = item, count, example, allow_empty
        self.minimum, self.maximum, self.open_minimum = minimum, maximum, open_minimum
        self.split = re.compile(f"[,{re.escape(separators)}]")
        self.name = f"{item.__name__}s"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        kind = "integers" if self.item is int else "numbers"
        expected = f"{self.count if self.count else 'comma-separated'} {kind} like {self.example}"
        try:
            values = tuple(self.item(part) for part in self.split.split(value) if part.strip())
        except ValueError:
            self.fail(f"expected {expected}, got {value!r}", param, ctx)
        if (not values and not self.allow_empty) or (self.count is not None and len(values) != self.count):
            self.fail(f"expected {expected}, got {value!r}", param, ctx)
        low_ok = self.minimum is None or all(
            v > self.minimum if self.open_minimum else v >= self.minimum for v in values
        )
        if not low_ok or (self.maximum is not None and any(v > self.maximum for v in values)):
            low = "-inf" if self.minimum is None else f"{self.minimum:g}"
            high = "inf" if self.maximum is None else f"{self.maximum:g}"
            span = f"{'(' if self.open_minimum else '['}{low}, {high}{']' if self.maximum is not None else ')'}"
            self.fail(f"every value must be in {span}, got {value!r}", param, ctx)
        return values


class StaWindow(click.ParamType):
    """An STA window wT,wH,wW in tiles (11,3,3, 11-3-3 or 11x3x3), read as NablaConfig reads one."""

    name = "wT,wH,wW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int, int]:
        try:
            return parse_window(value)  # type: ignore[return-value]
        except ConfigError as err:
            self.fail(str(err), param, ctx)
