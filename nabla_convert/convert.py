"""convert: a dense diffusers Wan checkpoint -> a self-describing NABLA checkpoint.

Weights are copied file by file, never re-serialised, so they stay bit-exact with their dtype and
sharding. Only the transformers' config.json (class name + `_nabla` settings) and model_index.json
change. Before anything is written, --out is checked against the input (folders.check_output), links
leaving MODEL are refused, and every safetensors header is read (no tensor is loaded): a truncated file
or a transformer tensor whose name, shape or dtype does not fit the model config stops the conversion.
The result is built in a temporary sibling folder (removed on error and on SIGTERM) and renamed into
place at the end, so an interrupted or failed conversion leaves nothing partial at --out. The output's
marker (.nabla-convert.json) records the sha256 of every weight file; push checks the weights against it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from nabla_convert.config import CONFIG_KEY, ConfigError, NablaConfig, NablaError
from nabla_convert.folders import (
    MARKER,
    check_links,
    check_output,
    name_matcher,
    public_name,
    replace_folder,
    staging,
    weight_digests,
    write_marker,
)
from nabla_convert.io import atomic_write_text, read_json

WAN_CLASSES = ("WanTransformer3DModel", "NablaWanTransformer3DModel")
NABLA_CLASS = ["nabla_convert", "NablaWanTransformer3DModel"]
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")
REPORTS_DIR = "nabla_reports"  # calibration.json, eval.json, bench.json: measurements the model card shows
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Not carried into the output: the base model's card (push writes the NABLA model's own), VCS/cache files, and the
# base's own nabla-convert marker (the output gets a new one).
COPY_IGNORE = (".cache", ".git*", "README.md", MARKER)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


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
        return path, {"base_model": public_name(path), "base_revision": revision}
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
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*COPY_IGNORE), copy_function=shutil.copyfile)


def tensor_header(path: Path, root: Path, error: type[NablaError] = ConvertError) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (safetensors dtype, shape) from a file's header, read by safetensors without loading a tensor.

    safetensors also checks that the data section covers every tensor, so a truncated file fails here.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as weights:
            names = weights.keys()  # a safe_open handle is not iterable itself
            return {name: (weights.get_slice(name).get_dtype(), weights.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError) as err:
        raise error(f"{path.relative_to(root).as_posix()} is not readable safetensors: {err}") from None


def expected_tensors(folder: Path) -> dict[str, Any]:
    """The transformer's state dict as its config.json builds it, on the meta device (no memory, no weights read)."""
    import torch
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in _read_json(folder / "config.json").items() if k != CONFIG_KEY}
    try:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config(config)
    except (TypeError, ValueError) as err:
        raise ConvertError(f"{folder / 'config.json'} does not describe a Wan transformer: {err}") from None
    return model.state_dict()


def check_transformer_weights(folder: Path, root: Path) -> None:
    """Every tensor the model config asks for is in the safetensors weights, with its shape and a matching dtype."""
    where = folder.relative_to(root).as_posix() if folder != root else "the model"
    if (folder / WEIGHTS_INDEX).is_file():
        weight_map = _read_json(folder / WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{where}/{WEIGHTS_INDEX} has no weight_map")
        shards = sorted(set(map(str, weight_map.values())))
    elif (folder / WEIGHTS_NAME).is_file():
        shards = [WEIGHTS_NAME]
    else:
        raise ConvertError(f"{where} has no {WEIGHTS_NAME} nor {WEIGHTS_INDEX} (only safetensors weights are read)")
    stored: dict[str, tuple[str, list[int]]] = {}
    for shard in shards:
        if Path(shard).name != shard or not (folder / shard).is_file():
            raise ConvertError(f"{where}/{WEIGHTS_INDEX} lists shard {shard!r}, which is not a file beside it")
        stored.update(tensor_header(folder / shard, root))
    expected = expected_tensors(folder)
    missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    if missing:
        raise ConvertError(
            f"{where}: the weights lack {len(missing)} tensor(s) config.json asks for (e.g. {missing[0]})"
        )
    if extra:
        raise ConvertError(
            f"{where}: the weights hold {len(extra)} tensor(s) config.json does not know (e.g. {extra[0]})"
        )
    for name, tensor in expected.items():
        dtype, shape = stored[name]
        if list(shape) != list(tensor.shape):
            raise ConvertError(f"{where}: tensor {name} has shape {shape}, config.json asks for {list(tensor.shape)}")
        if (dtype in FLOAT_DTYPES) != tensor.dtype.is_floating_point:
            raise ConvertError(f"{where}: tensor {name} is stored as {dtype}, config.json asks for {tensor.dtype}")


def check_model_files(root: Path, components: Mapping[str, Path]) -> None:
    """Before copying: no link leaves MODEL, every safetensors header parses, every transformer fits its config."""
    skip = name_matcher(COPY_IGNORE)
    check_links(root, "MODEL", skip)
    for path in sorted(root.rglob("*.safetensors")):
        if not any(skip(part) for part in path.relative_to(root).parts):
            tensor_header(path, root)
    for folder in components.values():
        check_transformer_weights(folder, root)


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
    reads = {f"{name} report": path for name, path in (reports or {}).items()}
    check_output(out, {"MODEL": model, **reads}, overwrite=overwrite)  # a Hub id names no local path: skipped
    root, source = resolve_model(model, revision=revision, token=token)
    components = transformer_folders(root)
    chosen = configs_for(components, config)
    check_model_files(root, components)
    provenance = {
        "tool": "nabla-convert",
        "tool_version": version("nabla-convert"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **source,
    }
    license_name = base_license(root)
    if license_name:
        provenance["base_license"] = license_name
    with staging(out) as work:
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
        write_marker(staged, "convert", weight_digests(staged))
        replace_folder(staged, out)
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
