"""Small helpers every stage shares: atomic writes, prompt files, markdown tables, devices and dtypes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads when a device or dtype is needed, not for every command's --help
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary file next to `path`, then rename it into place.

    An interrupted or failed write leaves the previous file (or none), never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def format_cell(value: Any) -> str:
    """A table cell: '-' for None, 4 significant digits for floats, JSON for lists and dicts."""
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.4g}" if math.isfinite(value) else str(value)
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple, dict, bool)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(format_cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(format_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named by one of DTYPES."""
    import torch

    return getattr(torch, name)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> the GPU when there is one, else the CPU; anything else as torch reads it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
