"""Where commands read and write, so that no command destroys an input or publishes what lies outside a folder.

- An output never is, contains or lies inside an input (paths compared after resolving links).
- Every folder a command writes holds a marker, `.nabla-convert.json`, naming the command and, for checkpoints, the
  sha256 of each weight file it wrote, and the identity (inode, size, mtime) of each it linked without reading it.
  `--overwrite` replaces only a folder with a marker; push checks the weights against it.
- A link whose target leaves its folder (or is missing, or loops back) is refused, never followed: copying it would
  turn an outside file into part of the output, uploading it would publish it.
- Outputs are built in a temporary sibling folder that is removed on error and on SIGTERM; one left by a killed
  process (kill -9) is removed by the next run that writes the same output.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from nabla_convert.errors import NablaError

MARKER = ".nabla-convert.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
TEMP_TAG = "nabla-tmp"
HASH_CHUNK_BYTES = 8 * 1024 * 1024


class FolderError(NablaError, ValueError):
    """An output that would touch an input or a folder nabla-convert did not write, or a link out of a folder."""


def real(path: str | os.PathLike) -> Path:
    """The path with every link resolved (the path need not exist)."""
    return Path(os.path.realpath(path))


def within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def public_name(model: str | os.PathLike) -> str:
    """How a model is named in anything that may be published: a Hub id as given, a local folder by its name only
    (its absolute path would publish the user's home folder)."""
    path = Path(model)
    return real(path).name if path.exists() else str(model)


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a folder an earlier nabla-convert run wrote, or None."""
    path = Path(folder) / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "nabla-convert" else None


def tool_version() -> str:
    """The installed nabla-convert version, recorded in every folder, config and commit it writes ("unknown" when
    the package runs from a source tree that was never installed, e.g. on PYTHONPATH)."""
    try:
        return version("nabla-convert")
    except PackageNotFoundError:
        return "unknown"


def write_marker(
    folder: str | os.PathLike,
    command: str,
    weights: Mapping[str, str] | None = None,
    identities: Mapping[str, dict[str, int]] | None = None,
) -> Path:
    """Mark `folder` as written by `command`; `weights` (relative path -> sha256) is the checkpoint's manifest, and
    `identities` (relative path -> file_identity) records the weight files placed without reading them (linked)."""
    from nabla_convert.io import atomic_write_text

    data: dict[str, Any] = {"tool": "nabla-convert", "version": tool_version(), "command": command}
    if weights is not None:
        data["weights"] = dict(sorted(weights.items()))
    if identities:
        data["weight_identities"] = dict(sorted(identities.items()))
    return atomic_write_text(Path(folder) / MARKER, json.dumps(data, indent=2) + "\n")


def file_identity(path: Path) -> dict[str, int]:
    """What changes when a file's bytes change, read without reading them: inode, size and modification time (ns).

    Writing into a file (even in place, through a hard link) moves its mtime; replacing it changes the inode.
    """
    stat = path.stat()
    return {"inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def is_weight_file(relative: str) -> bool:
    return relative.endswith(WEIGHT_SUFFIXES)


def weight_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Relative path -> path of every weight file under `folder`."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and is_weight_file(path.name)
    }


def weight_digests(folder: str | os.PathLike, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Relative path -> sha256 of every weight file under `folder` (but those in `skip`): the manifest convert and
    adapt record."""
    return {relative: sha256_file(path) for relative, path in weight_files(folder).items() if relative not in skip}


def check_output(
    out: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None],
    *,
    overwrite: bool | None = False,
    reuse: str | None = None,
) -> Path:
    """Refuse an output that is, contains or lies inside one of `inputs` (label -> path; None skipped), that is a
    link, or that holds files nabla-convert may not replace. Nothing is touched either way.

    An existing non-empty output is accepted with `overwrite` when an earlier nabla-convert run wrote it (it has a
    marker), and without `overwrite` when that run was the command `reuse` (calibrate resumes its own folder).
    `overwrite=None`: the command has no --overwrite, a non-empty output is always refused.
    """
    out = Path(out)
    target = real(out)
    for label, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        source = real(given)
        if target == source:
            raise FolderError(f"--out {out} is the {label} itself; choose another folder")
        if within(target, source):
            raise FolderError(f"--out {out} lies inside the {label} {given}; choose a folder outside it")
        if within(source, target):
            raise FolderError(f"--out {out} contains the {label} {given}; choose a folder that does not hold it")
    if out.is_symlink():
        raise FolderError(f"--out {out} is a link; give the folder it points to, or another folder")
    if not out.exists():
        return target
    if not out.is_dir():
        raise FolderError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return target
    marker = read_marker(out)
    if marker is not None and reuse is not None and marker.get("command") == reuse:
        return target
    if overwrite is None:
        raise FolderError(f"--out {out} exists and is not empty; choose another folder or remove it")
    if not overwrite:
        raise FolderError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose another")
    if marker is None:
        raise FolderError(
            f"--out {out} was not written by nabla-convert (no {MARKER}), so --overwrite will not replace it; "
            "remove it yourself or choose another folder"
        )
    return target


def check_output_file(
    out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], ours: Callable[[Path], bool]
) -> Path:
    """A report file to write: not an input nor inside one, not a link, and an existing file is replaced only when
    `ours` recognises an earlier report of the same command in it."""
    out = Path(out)
    target = real(out)
    for label, given in inputs.items():
        if given is not None and Path(given).exists() and within(target, real(given)):
            raise FolderError(f"--out {out} lies inside the {label} {given}; choose a file outside it")
    if out.is_symlink():
        raise FolderError(f"--out {out} is a link; give another file")
    if out.exists() and (not out.is_file() or not ours(out)):
        raise FolderError(f"--out {out} exists and is not a report this command wrote; choose another file")
    return target


def _allowed_roots(root: Path) -> list[Path]:
    """Where links under `root` may point: inside it, and for a Hugging Face cache snapshot, its repo's blobs."""
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def links_leaving(root: str | os.PathLike, skip: Callable[[str], bool] | None = None) -> list[str]:
    """'path -> target' of every link under `root` whose target is outside it, missing, or an ancestor of the link
    (a loop); paths relative to `root`, those `skip` accepts (and everything below them) left out."""
    root = Path(root)
    allowed = _allowed_roots(real(root))
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked folders
        here = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = here / name
            relative = path.relative_to(root).as_posix()
            if skip is not None and skip(relative):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            if not path.is_symlink():
                continue
            target = real(path)
            loops = target.is_dir() and within(real(here), target)
            if not target.exists() or loops or not any(within(target, place) for place in allowed):
                found.append(f"{relative} -> {os.readlink(path)}")
    return found


def check_links(
    root: str | os.PathLike,
    what: str,
    skip: Callable[[str], bool] | None = None,
    error: type[NablaError] = FolderError,
) -> None:
    """Refuse a folder with links that leave it, listing them (at most 5) in one line."""
    found = links_leaving(root, skip)
    if found:
        listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise error(
            f"{what} {root} has links that leave it (not followed): {listed}; replace them with the files themselves"
        )


def name_matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """A `skip` for links_leaving: the last part of the path matches one of the glob patterns (as copytree ignores)."""
    return lambda relative: any(fnmatch.fnmatch(relative.rsplit("/", 1)[-1], p) for p in patterns)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the block runs, so its `finally` clauses clean up (main thread only)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{TEMP_TAG}-{socket.gethostname()}-"


def remove_stale_temps(parent: Path, name: str = "*") -> None:
    """Remove the temporary folders (for the output `name`, or any) in `parent` that killed processes of this host
    left behind: their pid is no longer running."""
    if not parent.is_dir():
        return
    pattern = re.compile(
        rf"\.{re.escape(name) if name != '*' else '.+'}\.{TEMP_TAG}-{re.escape(socket.gethostname())}-(\d+)-"
    )
    for path in parent.iterdir():
        found = pattern.match(path.name)
        if found and path.is_dir() and not path.is_symlink() and not _alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staging(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `target` to build it in; removed when the block ends, fails or gets SIGTERM.

    Its name carries host and pid, so the next run for the same target removes one that a kill -9 left.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    work = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        with sigterm_raises():
            yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replace_folder(staged: Path, target: Path) -> None:
    """Move a finished folder into place; an existing `target` (already checked by check_output) is removed first."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)
