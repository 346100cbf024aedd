"""convert: a dense diffusers Wan checkpoint -> a self-describing NABLA checkpoint.

Weights are copied file by file, never re-serialised, so they stay bit-exact with their dtype and
sharding. Only the transformers' config.json (class name + `_nabla` settings) and model_index.json
change. The result is written to a temporary sibling folder and renamed into place at the end, so
an interrupted or failed conversion leaves nothing partial at --out.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from nabla_convert.config import CONFIG_KEY, ConfigError, NablaConfig, NablaError
from nabla_convert.io import atomic_write_text, read_json

WAN_CLASSES = ("WanTransformer3DModel", "NablaWanTransformer3DModel")
NABLA_CLASS = ["nabla_convert", "NablaWanTransformer3DModel"]
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")
REPORTS_DIR = "nabla_reports"  # calibration.json, eval.json, bench.json: measurements the model card shows


class ConvertError(NablaError, ValueError):
    """A model that cannot be converted, or an output that cannot be written."""


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "model file", dict)


def resolve_model(
    model: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> tuple[Path, dict]:
    """A local folder, or a Hub repo id fetched with snapshot_download. Returns (folder, source info)."""
    if not str(model).strip():
        raise ConvertError("MODEL is empty: give a folder or a Hub id (or leave it out for the reference model)")
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"{path} is not a folder")
        return path, {"base_model": str(path.resolve()), "base_revision": revision}
    if os.path.isabs(str(model)) or str(model).startswith(".") or str(model).count("/") != 1:
        raise ConvertError(f"model folder not found: {model}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    from nabla_convert.hub.push import check_token

    try:
        validate_repo_id(str(model))
    except HFValidationError:
        raise ConvertError(f"model folder not found, and {model!r} is not a valid Hub id (namespace/name)") from None
    if token:
        check_token(token)
    try:
        local = snapshot_download(str(model), revision=revision, token=token)
    except RepositoryNotFoundError:
        raise ConvertError(f"{model}: no such folder, and no such model on the Hub (or no access)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise ConvertError(f"{model}: could not download from the Hub: {err}") from None
    commit = Path(local).name  # snapshot folders are named by commit hash
    return Path(local), {"base_model": str(model), "base_revision": commit}


def transformer_folders(root: Path) -> dict[str, Path]:
    """Component name -> transformer folder, for a pipeline folder or a single transformer folder."""
    index = root / "model_index.json"
    if index.is_file():
        model_index = _read_json(index)
        if not str(model_index.get("_class_name", "")).startswith("Wan"):
            raise ConvertError(f"{root} holds a {model_index.get('_class_name')}, not a Wan pipeline")
        found = {}
        for name in TRANSFORMER_COMPONENTS:
            entry = model_index.get(name)
            if entry and entry[1] is not None:
                if entry[1] not in WAN_CLASSES:
                    raise ConvertError(f"{root}: component {name} is a {entry[1]}, not a WanTransformer3DModel")
                found[name] = root / name
        if not found:
            raise ConvertError(f"{root}: the pipeline has no Wan transformer")
        return found
    config = root / "config.json"
    if not config.is_file():
        raise ConvertError(f"{root} is neither a diffusers pipeline (model_index.json) nor a model (config.json)")
    class_name = _read_json(config).get("_class_name")
    if class_name not in WAN_CLASSES:
        raise ConvertError(f"{root} holds a {class_name}, not a WanTransformer3DModel")
    return {"": root}


def configs_for(
    components: Mapping[str, Path], config: NablaConfig | Mapping[str, NablaConfig]
) -> dict[str, NablaConfig]:
    """One config per transformer: a single config applies to all; a mapping names each ("*" = the rest)."""
    if isinstance(config, NablaConfig):
        return dict.fromkeys(components, config)
    chosen = {}
    for name in components:
        key = name or "transformer"
        if key in config:
            chosen[name] = config[key]
        elif "*" in config:
            chosen[name] = config["*"]
        else:
            raise ConvertError(f"the config has no entry for {key} (entries: {sorted(config)})")
    return chosen


def _copy_tree(src: Path, dst: Path) -> None:
    """Everything but the base model's card (push writes the NABLA model's own) and VCS/cache files."""
    ignore = shutil.ignore_patterns(".cache", ".git*", "README.md")
    shutil.copytree(src, dst, ignore=ignore, copy_function=shutil.copyfile)


def base_license(root: Path) -> str | None:
    """The license in the base model's card metadata, carried into the converted model's card."""
    card = root / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(card).data.license


def _rewrite_transformer_config(folder: Path, config: NablaConfig) -> None:
    data = _read_json(folder / "config.json")
    num_layers = data.get("num_layers")
    if not isinstance(num_layers, int):
        raise ConvertError(f"{folder}/config.json has no num_layers")
    try:
        config.check_num_layers(num_layers)
    except ConfigError as err:
        raise ConvertError(f"{folder.name or folder}: {err}") from None
    data["_class_name"] = NABLA_CLASS[1]
    data[CONFIG_KEY] = config.to_dict()
    atomic_write_text(folder / "config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert(
    model: str | os.PathLike,
    out: str | os.PathLike,
    config: NablaConfig | Mapping[str, NablaConfig],
    *,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    reports: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write a NABLA checkpoint of `model` (pipeline folder, transformer folder or Hub id) to `out`.

    `config` is one NablaConfig for every transformer, or a mapping {"transformer": ..,
    "transformer_2": ..} (Wan2.2 A14B has two transformers, each with its own settings).
    `reports` ({"calibration": path to calibration.json, ...}) are copied to nabla_reports/, where
    the model card reads them.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConvertError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    root, source = resolve_model(model, revision=revision, token=token)
    components = transformer_folders(root)
    chosen = configs_for(components, config)
    provenance = {
        "tool": "nabla-convert",
        "tool_version": version("nabla-convert"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **source,
    }
    license_name = base_license(root)
    if license_name:
        provenance["base_license"] = license_name
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = work / "out"
        _copy_tree(root, staged)
        for name, cfg in chosen.items():
            _rewrite_transformer_config(staged / name, cfg.with_provenance(**provenance))
        for name, report in (reports or {}).items():
            (staged / REPORTS_DIR).mkdir(exist_ok=True)
            shutil.copyfile(report, staged / REPORTS_DIR / f"{name}.json")
        if "" not in components:
            model_index = _read_json(staged / "model_index.json")
            for name in components:
                model_index[name] = NABLA_CLASS
            atomic_write_text(staged / "model_index.json", json.dumps(model_index, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def load(path: str | os.PathLike, **kwargs: Any):
    """Load a converted checkpoint: a pipeline folder gives the pipeline, a transformer folder the transformer.

    kwargs go to from_pretrained (torch_dtype, device_map, ...). NABLA is active on every transformer.
    """
    from diffusers import DiffusionPipeline

    from nabla_convert.models.wan import NablaWanTransformer3DModel

    folder, _ = resolve_model(path, revision=kwargs.pop("revision", None), token=kwargs.pop("token", None))
    components = transformer_folders(folder)
    for sub in components.values():
        if CONFIG_KEY not in _read_json(sub / "config.json"):
            raise ConvertError(f"{sub} is a dense checkpoint (no {CONFIG_KEY} settings); run convert first")
    if "" in components:
        return NablaWanTransformer3DModel.from_pretrained(folder, **kwargs)
    return DiffusionPipeline.from_pretrained(folder, **kwargs)
