"""Checks a converted folder before anything leaves the machine, and writes down what will be uploaded.

A push that fails half way, or succeeds with a broken checkpoint, costs more than reading every header first:
no link may lead out of the folder (it would publish what lies outside), the config must carry `_nabla`, every
weight index must match its shards tensor for tensor, every safetensors file must parse and hold only finite
numbers, no file may exceed the Hub's per-file limit, and the measurement reports must be JSON objects.
The manifest (size, sha256, git blob sha1 per file) is what the upload is later verified against; its weight
files must match the sha256 that convert or adapt recorded in the folder's marker (weights_changed).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from safetensors import safe_open
from tqdm.auto import tqdm

from nabla_convert.config import CONFIG_KEY, ConfigError, NablaConfig
from nabla_convert.convert import REPORTS_DIR, tensor_header
from nabla_convert.errors import InvalidCheckpointError
from nabla_convert.folders import MARKER, check_links, file_identity, is_weight_file

NABLA_LIBRARY = "nabla_convert"

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# The Hub refuses single files over 50 GB (https://huggingface.co/docs/hub/storage-limits).
HUB_MAX_FILE_BYTES = 50 * 1000**3
HASH_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class TransformerInfo:
    """One NABLA transformer of the folder: where it is, its config, and what its weights hold."""

    subfolder: str  # "transformer", "transformer_2", or "" for a transformer-only folder
    config: dict[str, Any]
    nabla: NablaConfig
    num_parameters: int
    num_layers: int | None = None  # NABLA layers as the family counts them (None: unknown)


@dataclass(frozen=True)
class Checkpoint:
    """What the checks learned about a converted folder; the model card is written from this alone."""

    folder: Path
    pipeline_class: str | None  # model_index.json "_class_name"; None for a transformer-only folder
    transformers: tuple[TransformerInfo, ...]
    reports: dict[str, dict[str, Any]]  # nabla_reports/<name>.json -> parsed object


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative, POSIX separators, as in the repo
    size: int
    sha256: str  # what the Hub reports for LFS files
    git_sha1: str  # what the Hub reports for regular (non-LFS) files


def read_json(path: Path, folder: Path) -> dict[str, Any]:
    """A JSON object from the folder (every JSON file of a checkpoint holds one)."""
    where = path.relative_to(folder).as_posix()
    if not path.is_file():
        raise InvalidCheckpointError(f"{where} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidCheckpointError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidCheckpointError(f"{where} must hold a JSON object, not {type(data).__name__}")
    return data


def check_checkpoint(folder: str | Path) -> Checkpoint:
    """Validate a converted pipeline or transformer folder; raise InvalidCheckpointError with the first problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidCheckpointError(f"{folder} is not a folder")
    check_links(folder, "the folder", skip=lambda path: not uploaded(path), error=InvalidCheckpointError)
    pipeline_class = None
    if (folder / "model_index.json").is_file():
        model_index = read_json(folder / "model_index.json", folder)
        pipeline_class = model_index.get("_class_name")
        subfolders = []
        for name, spec in model_index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
                continue
            if not (folder / name).is_dir():
                raise InvalidCheckpointError(f"model_index.json names component {name!r} but {name}/ is missing")
            if name.startswith("transformer"):
                if spec[0] != NABLA_LIBRARY:
                    raise InvalidCheckpointError(
                        f"model_index.json loads {name} as {spec[0]}.{spec[1]}; a converted pipeline names "
                        f"[{NABLA_LIBRARY!r}, <Nabla class>] so that the stock pipeline loads it with NABLA"
                    )
                subfolders.append((name, spec[1]))
        if not subfolders:
            raise InvalidCheckpointError("model_index.json names no transformer: not a converted pipeline")
    elif (folder / "config.json").is_file():
        subfolders = [("", None)]
    else:
        raise InvalidCheckpointError(f"{folder} has neither model_index.json nor config.json: not a checkpoint")

    check_weights(folder)
    transformers = tuple(check_transformer(folder, name, expected_class) for name, expected_class in subfolders)
    return Checkpoint(folder, pipeline_class, transformers, read_reports(folder))


def check_transformer(folder: Path, subfolder: str, expected_class: str | None) -> TransformerInfo:
    where = f"{subfolder}/config.json" if subfolder else "config.json"
    config = read_json(folder / where, folder)
    if CONFIG_KEY not in config:
        raise InvalidCheckpointError(f"{where} has no {CONFIG_KEY!r} entry: not a NABLA-converted transformer")
    if expected_class is not None and config.get("_class_name") != expected_class:
        raise InvalidCheckpointError(
            f"{where} is a {config.get('_class_name')} but model_index.json loads it as {expected_class}"
        )
    try:
        nabla = NablaConfig.from_dict(config[CONFIG_KEY])
        num_layers, num_heads = model_shape(config)
        if num_layers is not None:
            nabla.check_num_layers(num_layers)
        if num_heads is not None:
            nabla.check_num_heads(num_heads)
    except ConfigError as err:
        raise InvalidCheckpointError(f"{where}: {err}") from None
    weights_dir = folder / subfolder
    index = weights_dir / (WEIGHTS_NAME.removesuffix(".safetensors") + INDEX_SUFFIX)
    if index.is_file():
        shards = sorted(set(read_json(index, folder).get("weight_map", {}).values()))
    elif (weights_dir / WEIGHTS_NAME).is_file():
        shards = [WEIGHTS_NAME]
    else:
        raise InvalidCheckpointError(f"{subfolder or 'the folder'} has no {WEIGHTS_NAME} nor a weight index")
    num_parameters = sum(
        math.prod(shape) for shard in shards for shape in tensor_shapes(weights_dir / shard, folder).values()
    )
    return TransformerInfo(subfolder, config, nabla, num_parameters, num_layers)


def model_shape(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """NABLA layers and attention heads of a transformer config, as its family counts them (None, None: a class no
    family knows, or its family's keys missing)."""
    from nabla_convert.models import family_for_class_name

    family = family_for_class_name(config.get("_class_name"))
    if family is None:
        return None, None
    try:
        layers = family.num_layers(config)
    except ConfigError:
        layers = None
    return layers, family.attention_shape(config)[0]


def tensor_shapes(path: Path, folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header; a truncated or garbled file fails here, before any upload."""
    return {name: shape for name, (_, shape) in tensor_header(path, folder, InvalidCheckpointError).items()}


def check_finite(path: Path, folder: Path) -> None:
    """Every floating tensor of a safetensors file holds finite numbers (read one tensor at a time)."""
    with safe_open(path, framework="pt") as weights:
        names = weights.keys()
        bad = [n for n in names if (t := weights.get_tensor(n)).is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise InvalidCheckpointError(
            f"{path.relative_to(folder).as_posix()}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); not publishing"
        )


def check_weights(folder: Path) -> None:
    """Every index lists exactly the tensors of its shards, no unindexed shard lies beside it, every file parses."""
    indexed: set[Path] = set()
    for index in sorted(folder.rglob(f"*{INDEX_SUFFIX}")):
        where = index.relative_to(folder).as_posix()
        weight_map = read_json(index, folder).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidCheckpointError(f"{where} has no weight_map")
        by_shard: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(tensor)
        for shard, expected in sorted(by_shard.items()):
            shard_path = index.parent / shard
            if not shard_path.is_file():
                raise InvalidCheckpointError(f"{where} lists shard {shard} which is missing")
            found = set(tensor_shapes(shard_path, folder))
            if expected - found:
                missing = sorted(expected - found)
                raise InvalidCheckpointError(
                    f"{where} maps {len(missing)} tensors (e.g. {missing[0]}) to {shard}, which lacks them"
                )
            if found - expected:
                extra = sorted(found - expected)
                raise InvalidCheckpointError(
                    f"{shard} holds {len(extra)} tensors (e.g. {extra[0]}) that {where} does not list"
                )
            indexed.add(shard_path)
        prefix = index.name.removesuffix(INDEX_SUFFIX)
        shard_pattern = re.compile(rf"{re.escape(prefix)}-\d+-of-\d+\.safetensors")
        for stray in sorted(index.parent.iterdir()):
            if shard_pattern.fullmatch(stray.name) and stray not in indexed:
                raise InvalidCheckpointError(
                    f"{stray.relative_to(folder).as_posix()} is a shard that {where} does not use"
                )
    for path in sorted(folder.rglob("*.safetensors")):
        if path not in indexed:
            tensor_shapes(path, folder)
        check_finite(path, folder)


def read_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """nabla_reports/*.json: each a JSON object with a "summary" object, and optionally a "layers" list."""
    reports = {}
    for path in sorted((folder / REPORTS_DIR).glob("*.json")):
        where = path.relative_to(folder).as_posix()
        report = read_json(path, folder)
        if not isinstance(report.get("summary"), dict):
            raise InvalidCheckpointError(f"{where} must be a JSON object with a 'summary' object")
        if not isinstance(report.get("layers", []), list):
            raise InvalidCheckpointError(f"{where}: 'layers' must be a list of per-layer objects")
        reports[path.stem] = report
    return reports


def uploaded(path: str) -> bool:
    """Whether a relative path is published: not .git/, huggingface_hub's .cache/, nor the folder's marker."""
    return path != MARKER and bool(list(filter_repo_objects([path], ignore_patterns=DEFAULT_IGNORE_PATTERNS)))


def upload_paths(folder: Path) -> list[str]:
    """The files a push sends: everything under the folder except .git/, .cache/ and the marker."""
    return sorted(
        p for path in folder.rglob("*") if path.is_file() and uploaded(p := path.relative_to(folder).as_posix())
    )


def weights_changed(
    manifest: tuple[ManifestEntry, ...],
    recorded: dict[str, str],
    identities: dict[str, Any] | None = None,
    folder: Path | None = None,
) -> list[str]:
    """Weight files that differ from what convert/adapt recorded: changed, missing or new.

    A file is recorded by its sha256, or (convert's linked files, which it did not read) by its identity under
    `folder`: inode, size and mtime, which any write into the file, or its replacement, changes.
    """
    current = {entry.path: entry.sha256 for entry in manifest if is_weight_file(entry.path)}
    identities = identities if folder is not None and isinstance(identities, dict) else {}
    expected = {path: ("sha256", sha) for path, sha in recorded.items()}
    expected |= {path: ("identity", identity) for path, identity in identities.items() if path not in recorded}

    def same(path: str) -> bool:
        kind, value = expected[path]
        return current[path] == value if kind == "sha256" else file_identity(folder / path) == value

    changed = [f"{path} (changed)" for path in sorted(current.keys() & expected.keys()) if not same(path)]
    missing = [f"{path} (missing)" for path in sorted(expected.keys() - current.keys())]
    new = [f"{path} (not recorded)" for path in sorted(current.keys() - expected.keys())]
    return changed + missing + new


def build_manifest(folder: str | Path, replaced: dict[str, bytes] | None = None) -> tuple[ManifestEntry, ...]:
    """Size, sha256 and git blob sha1 of every file to upload, in one read each; `replaced` overrides file contents.

    Both hashes are kept because the Hub reports sha256 for LFS files and the git blob sha1 for the others, and
    which files go to LFS is the server's decision.
    """
    folder = Path(folder)
    replaced = replaced or {}
    paths = sorted(set(upload_paths(folder)) | set(replaced))
    sizes = {path: len(replaced[path]) if path in replaced else (folder / path).stat().st_size for path in paths}
    for path, size in sizes.items():
        if size > HUB_MAX_FILE_BYTES:
            raise InvalidCheckpointError(f"{path} is {size / 1e9:.1f} GB; the Hub accepts files up to 50 GB")
    entries = []
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="sha256 manifest") as progress:
        for path in paths:
            sha256 = hashlib.sha256()
            git_sha1 = hashlib.sha1(b"blob %d\0" % sizes[path])
            for chunk in file_chunks(folder / path, replaced.get(path)):
                sha256.update(chunk)
                git_sha1.update(chunk)
                progress.update(len(chunk))
            entries.append(ManifestEntry(path, sizes[path], sha256.hexdigest(), git_sha1.hexdigest()))
    return tuple(entries)


def file_chunks(path: Path, content: bytes | None):
    if content is not None:
        yield content
        return
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            yield chunk
