"""Small helpers every stage shares: atomic writes, prompt files, markdown tables, devices and dtypes."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def resolve_device(device: str) -> torch.device:
    """ "auto" -> the GPU when there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its tensor data starts."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header size)")
        size = int.from_bytes(size_bytes, "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (header is not an object)")
    return header, 8 + size


def rename_safetensors(src: str | os.PathLike, dst: str | os.PathLike, names: dict[str, str]) -> Path:
    """Copy a safetensors file with its tensors renamed (`names`: old -> new), streaming the data bytes.

    The tensor data, dtypes, shapes and offsets are untouched, so the copy is bit-exact and memory stays
    flat however large the file: safetensors' own writers need every tensor in memory, this needs none.
    """
    header, start = safetensors_header(src)
    renamed = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    renamed.update({names[key]: entry for key, entry in header.items() if key != "__metadata__"})
    text = json.dumps(renamed, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data start to 8 bytes

    def write(tmp: Path) -> None:
        with open(src, "rb") as source, open(tmp, "wb") as target:
            target.write(len(text).to_bytes(8, "little") + text)
            source.seek(start)
            shutil.copyfileobj(source, target, 16 << 20)

    return atomic_write(dst, write)
