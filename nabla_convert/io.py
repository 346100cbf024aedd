"""Small helpers every stage shares: atomic writes, prompt files, markdown tables, devices and dtypes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nabla_convert.errors import DeviceError, InputFileError

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


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file (a byte-order mark is dropped), or an InputFileError that says why not."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{what} {path} is not a file" if path.exists() else f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputFileError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    if "\0" in text:
        raise InputFileError(f"{what} {path} holds NUL bytes: a binary file, not text")
    return text


def read_json(path: str | os.PathLike, what: str = "file", kind: type = object) -> Any:
    """The JSON value (of type `kind`) of a UTF-8 file, or an InputFileError naming the file and the fault."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{what} {path} is not valid JSON: {err}") from None
    if not isinstance(data, kind):
        raise InputFileError(f"{what} {path} holds a JSON {type(data).__name__}, not a {kind.__name__}")
    return data


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, what: str = "file") -> Iterator[Any]:
    """safetensors' safe_open (torch tensors), with an unreadable file reported as an InputFileError naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{what} {path} is not a file" if path.exists() else f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as err:
        raise InputFileError(f"{what} {path} is not a readable safetensors file ({err})") from None


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line; a file without any is an error, not an empty run."""
    prompts = [line.strip() for line in read_text(path, "prompt file").splitlines() if line.strip()]
    if not prompts:
        raise InputFileError(f"prompt file {path} has no prompts (one per line)")
    bad = next((p for p in prompts if not p.replace("\t", " ").isprintable()), None)
    if bad is not None:
        raise InputFileError(f"prompt file {path} holds control characters in {bad[:40]!r}")
    return prompts


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
    """ "auto" -> the GPU when there is one, else the CPU; anything else as torch reads it, if this machine has it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DeviceError(f"device {device!r} is not usable on this machine ({reason[:160]})") from None
    return resolved


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
