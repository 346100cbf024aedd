"""convert: a dense diffusers checkpoint of a registered family -> a self-describing NABLA checkpoint.

Weights are never re-serialised, so they stay bit-exact with their dtype and sharding, and are not
copied where the filesystem allows: a reflink (copy-on-write clone, e.g. btrfs or XFS: an independent
file, no space used) first, else a hard link on the same filesystem (the same file as the source's:
nabla-convert warns, since a later in-place write into it would change the source), else, or with
link=False where no reflink exists, a copy. Only the transformers' config.json (class name +
`_nabla` settings) and model_index.json change, and they are written as new files (atomic replace),
never in place, so the source behind a hard link is never touched; removing or overwriting the output
only drops links. Before anything is written, --out is checked against the input
(folders.check_output), links leaving MODEL are refused, and every safetensors header is read (no
tensor is loaded): a truncated file or a transformer tensor whose name, shape or dtype does not fit
the model config stops the conversion. The result is built in a temporary sibling folder (removed on
error and on SIGTERM) and renamed into place at the end, so an interrupted or failed conversion leaves
nothing partial at --out. The output's marker (.nabla-convert.json) records the sha256 of every weight
file convert wrote or copied and the identity (inode, size, mtime) of every one it linked or cloned,
which it never reads: converting a 14B pipeline takes seconds. push checks the weights against both.

A checkpoint in a family's own layout (the original layout the published NABLA fine-tunes ship in)
is imported with `base`: the dense diffusers pipeline of the same architecture gives every other
component and the transformer's config; the family maps the weights (ModelFamily.import_native).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nabla_convert.config import CONFIG_KEY, ConfigError, NablaConfig
from nabla_convert.errors import NablaError
from nabla_convert.folders import (
    MARKER,
    check_links,
    check_output,
    file_identity,
    is_weight_file,
    name_matcher,
    public_name,
    replace_folder,
    staging,
    tool_version,
    weight_digests,
    weight_files,
    write_marker,
)
from nabla_convert.io import DTYPES, atomic_write_text, read_json, resolve_device, torch_dtype
from nabla_convert.models import TRANSFORMER_COMPONENTS, families, family_for_class_name

if TYPE_CHECKING:
    from nabla_convert.models.family import ModelFamily

REPORTS_DIR = "nabla_reports"  # calibration.json, eval.json, bench.json: measurements the model card shows
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Not carried into the output: the base model's card (push writes the NABLA model's own), VCS/cache files, and the
# base's own nabla-convert marker (the output gets a new one).
COPY_IGNORE = (".cache", ".git*", "README.md", MARKER)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class ConvertError(NablaError, ValueError):
    """A model that cannot be converted, or an output that cannot be written."""


class SharedWeightsWarning(UserWarning):
    """The output's weight files are hard links to the source's: an in-place write into them changes the source."""


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


def transformer_components(root: Path) -> dict[str, tuple[Path, ModelFamily]]:
    """Component name -> (transformer folder, its family); "" names a bare transformer folder."""
    index = root / "model_index.json"
    if index.is_file():
        model_index = _read_json(index)
        found = {}
        for name in TRANSFORMER_COMPONENTS:
            entry = model_index.get(name)
            if entry and entry[1] is not None:
                family = family_for_class_name(entry[1])
                if family is None:
                    raise ConvertError(f"{root}: component {name} is a {entry[1]}, not a supported transformer")
                found[name] = (root / name, family)
        if not found:
            raise ConvertError(f"{root} holds a {model_index.get('_class_name')} without a supported transformer")
        return found
    config = root / "config.json"
    if not config.is_file():
        raise ConvertError(f"{root} is neither a diffusers pipeline (model_index.json) nor a model (config.json)")
    class_name = _read_json(config).get("_class_name")
    family = family_for_class_name(class_name)
    if family is None:
        raise ConvertError(f"{root} holds a {class_name}, not a supported transformer")
    return {"": (root, family)}


def configs_for(
    components: Mapping[str, tuple[Path, ModelFamily]], config: NablaConfig | Mapping[str, NablaConfig] | None
) -> dict[str, NablaConfig]:
    """One config per transformer: a single config applies to all; a mapping names each ("*" = the rest);
    None takes each checkpoint's own NABLA settings (ModelFamily.native_settings)."""
    if isinstance(config, NablaConfig):
        return dict.fromkeys(components, config)
    chosen = {}
    for name, (folder, family) in components.items():
        key = name or "transformer"
        if config is None:
            native = family.native_settings(_read_json(folder / "config.json"))
            if native is None:
                raise ConvertError(
                    f"{folder} carries no NABLA settings of its own; give --config, --recipe or --threshold"
                )
            chosen[name] = native
        elif key in config:
            chosen[name] = config[key]
        elif "*" in config:
            chosen[name] = config["*"]
        else:
            raise ConvertError(f"the config has no entry for {key} (entries: {sorted(config)})")
    return chosen


# A hard link is worth its risk (an in-place write into the output changes the source) only where a copy would cost
# real time and space: a 14B model's shards, not a small model's files, which are copied.
LINK_MIN_BYTES = 64 << 20
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): clone a whole file (btrfs, XFS with reflink, bcachefs, ...)
LINK_WARNING = (
    "{count} weight file(s) of {out} are hard links to MODEL's ({example}): the same files, so whatever writes into "
    "them in place (e.g. save_pretrained over {out}) changes MODEL too; nabla-convert itself only replaces files. "
    "Convert with --copy (link=False) to edit the output in place."
)


def reflink(src: str, dst: str) -> bool:
    """A copy-on-write clone of src at dst (no bytes copied; later writes to either stay apart), where the
    filesystem has one; False (and no dst) where it has not."""
    import fcntl

    try:
        with open(src, "rb") as source, open(dst, "xb") as target:
            try:
                fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
                return True
            except OSError:
                pass
        os.unlink(dst)
    except OSError:
        pass
    return False


def place_file(src: str, dst: str, *, share: bool) -> str:
    """src's bytes at dst without a second copy where possible: a reflink (an independent file), else with `share`
    a hard link (the same file as src) for files of LINK_MIN_BYTES or more, else a copy. Returns "reflink",
    "hardlink" or "copy"."""
    source = os.path.realpath(src)  # a Hub cache snapshot links to its blobs
    if reflink(source, dst):
        return "reflink"
    if share and os.path.getsize(source) >= LINK_MIN_BYTES:
        try:
            os.link(source, dst)
            return "hardlink"
        except OSError:
            pass
    shutil.copyfile(source, dst)
    return "copy"


def _copy_tree(src: Path, dst: Path, *, link: bool = True, skip: Path | None = None) -> dict[str, str]:
    """Everything but COPY_IGNORE and the weights under `skip` (replaced by an import), each file placed by
    `place_file` (`link`: hard links allowed). Returns relative path -> how it was placed."""
    placed: dict[str, str] = {}

    def ignore(folder: str, names: list[str]) -> set[str]:
        ignored = shutil.ignore_patterns(*COPY_IGNORE)(folder, names)
        if skip is not None and Path(folder) == skip:
            ignored |= shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json")(folder, names)
        return ignored

    def copy(source: str, target: str) -> None:
        placed[Path(target).relative_to(dst).as_posix()] = place_file(source, target, share=link)

    shutil.copytree(src, dst, ignore=ignore, copy_function=copy)
    return placed


def record_weights(staged: Path, placed: dict[str, str]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The marker's manifest: sha256 of each weight file convert wrote or copied (it reads those anyway), the
    identity of each linked or cloned one (not read: a 14B conversion takes seconds). Push checks both."""
    unread = {relative for relative in weight_files(staged) if placed.get(relative) in ("hardlink", "reflink")}
    identities = {relative: file_identity(staged / relative) for relative in sorted(unread)}
    return weight_digests(staged, frozenset(unread)), identities


def native_import(root: Path, base: str | os.PathLike | None, **hub: Any) -> tuple[Path, ModelFamily, dict] | None:
    """(base pipeline folder, family, base source info) when `root` is a checkpoint in a family's own layout."""
    family = next((f for f in families() if f.is_native(root)), None)
    if family is None:
        return None
    if base is None:
        raise ConvertError(
            f"{root} is a {family.name} checkpoint in its official layout; give --base, the dense diffusers "
            "pipeline of the same architecture (its text encoder, VAE, scheduler and transformer config are used)"
        )
    base_root, base_source = resolve_model(base, **hub)
    components = transformer_components(base_root)
    if list(components) != ["transformer"] or components["transformer"][1] is not family:
        raise ConvertError(f"--base {base} must be a diffusers {family.name} pipeline with one transformer")
    return (
        base_root,
        family,
        {"pipeline_base": base_source["base_model"], "pipeline_base_revision": base_source["base_revision"]},
    )


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


def expected_tensors(folder: Path, family: ModelFamily) -> dict[str, Any]:
    """The transformer's state dict as its config.json builds it, on the meta device (no memory, no weights read)."""
    import torch

    config = {k: v for k, v in _read_json(folder / "config.json").items() if k != CONFIG_KEY}
    try:
        with torch.device("meta"):
            model = family.transformer_classes[0].from_config(config)
    except (TypeError, ValueError) as err:
        raise ConvertError(f"{folder / 'config.json'} does not describe a {family.name} transformer: {err}") from None
    return model.state_dict()


def check_transformer_weights(folder: Path, root: Path, family: ModelFamily) -> None:
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
    expected = expected_tensors(folder, family)
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


def check_model_files(root: Path, components: Mapping[str, tuple[Path, ModelFamily]]) -> None:
    """Before copying: no link leaves MODEL, every safetensors header parses, every transformer fits its config."""
    skip = name_matcher(COPY_IGNORE)
    check_links(root, "MODEL", skip)
    for path in sorted(root.rglob("*.safetensors")):
        if not any(skip(part) for part in path.relative_to(root).parts):
            tensor_header(path, root)
    for folder, family in components.values():
        check_transformer_weights(folder, root, family)


def base_license(root: Path) -> str | None:
    """The license in the base model's card metadata, carried into the converted model's card."""
    card = root / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(card).data.license


def nabla_class_entry(family: ModelFamily) -> list[str]:
    """The model_index.json entry of a family's NABLA transformer class."""
    return ["nabla_convert", family.nabla_class.__name__]


def _rewrite_transformer_config(folder: Path, family: ModelFamily, config: NablaConfig) -> None:
    data = _read_json(folder / "config.json")
    try:
        config.check_num_layers(family.num_layers(data))
        config.check_num_heads(family.attention_shape(data)[0])
    except ConfigError as err:
        raise ConvertError(f"{folder.name or folder}: {err}") from None
    data["_class_name"] = family.nabla_class.__name__
    data[CONFIG_KEY] = config.to_dict()
    atomic_write_text(folder / "config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert(
    model: str | os.PathLike,
    out: str | os.PathLike,
    config: NablaConfig | Mapping[str, NablaConfig] | None,
    *,
    revision: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
    reports: Mapping[str, str | os.PathLike] | None = None,
    base: str | os.PathLike | None = None,
    link: bool = True,
) -> Path:
    """Write a NABLA checkpoint of `model` (pipeline folder, transformer folder or Hub id) to `out`.

    `config` is one NablaConfig for every transformer, or a mapping {"transformer": ..,
    "transformer_2": ..} (two-expert models have two transformers, each with its own settings), or None for
    the settings the checkpoint carries itself (ModelFamily.native_settings).
    `reports` ({"calibration": path to calibration.json, ...}) are copied to nabla_reports/, where
    the model card reads them. `base` is the dense diffusers pipeline a checkpoint in a family's own
    layout is completed with. `link=False` never hard-links (a reflink or a copy: the output's files are its own).
    """
    out = Path(out)
    reads = {f"{name} report": path for name, path in (reports or {}).items()}
    inputs = {"MODEL": model, **({"--base": base} if base is not None else {}), **reads}
    check_output(out, inputs, overwrite=overwrite)  # a Hub id names no local path: skipped
    root, source = resolve_model(model, revision=revision, token=token)
    imported = native_import(root, base, token=token)
    tree = root
    if imported is not None:
        tree, family, base_source = imported
        source.update(base_source)
        components = {"transformer": (tree / "transformer", family)}
    elif base is not None:
        raise ConvertError(f"--base is for checkpoints in a family's original layout; {root} is a diffusers checkpoint")
    else:
        components = transformer_components(root)
    chosen = configs_for(components, config)
    check_model_files(root, {} if imported else components)  # an import is checked once written, below
    if imported is not None:
        check_model_files(tree, {})
    provenance = {
        "tool": "nabla-convert",
        "tool_version": tool_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **source,
    }
    license_name = base_license(tree)
    if license_name:
        provenance["base_license"] = license_name
    with staging(out) as work:
        staged = work / "out"
        placed = _copy_tree(tree, staged, link=link, skip=None if imported is None else tree / "transformer")
        if imported is not None:
            imported[1].import_native(root, tree / "transformer", staged / "transformer")
            check_transformer_weights(staged / "transformer", staged, imported[1])
        for name, cfg in chosen.items():
            _rewrite_transformer_config(staged / name, components[name][1], cfg.with_provenance(**provenance))
        for name, report in (reports or {}).items():
            (staged / REPORTS_DIR).mkdir(exist_ok=True)
            shutil.copyfile(report, staged / REPORTS_DIR / f"{name}.json")
        if "" not in components:
            model_index = _read_json(staged / "model_index.json")
            for name, (_, family) in components.items():
                model_index[name] = nabla_class_entry(family)
            atomic_write_text(staged / "model_index.json", json.dumps(model_index, indent=2) + "\n")
        write_marker(staged, "convert", *record_weights(staged, placed))
        replace_folder(staged, out)
    linked = sorted(relative for relative, how in placed.items() if how == "hardlink" and is_weight_file(relative))
    if linked:
        warnings.warn(LINK_WARNING.format(count=len(linked), out=out, example=linked[0]), SharedWeightsWarning, 2)
    return out


def load(path: str | os.PathLike, **kwargs: Any):
    """Load a converted checkpoint: a pipeline folder gives the pipeline, a transformer folder the transformer.

    kwargs go to from_pretrained (torch_dtype, device_map, ...). NABLA is active on every transformer.
    """
    from diffusers import DiffusionPipeline

    folder, _ = resolve_model(path, revision=kwargs.pop("revision", None), token=kwargs.pop("token", None))
    components = transformer_components(folder)
    for sub, _ in components.values():
        if CONFIG_KEY not in _read_json(sub / "config.json"):
            raise ConvertError(f"{sub} is a dense checkpoint (no {CONFIG_KEY} settings); run convert first")
    if "" in components:
        return components[""][1].nabla_class.from_pretrained(folder, **kwargs)
    return DiffusionPipeline.from_pretrained(folder, **kwargs)


def load_pipeline(
    model: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str = "auto",
    without: tuple[str, ...] = (),
    transformer_folder: bool = False,
) -> Any:
    """A pipeline (dense or converted: NABLA is active when the folder says so) through stock from_pretrained, to
    measure or compare models.

    `dtype` "auto" is bfloat16 on a GPU, float32 on the CPU; the components in `without` are not loaded (None). A
    bare transformer folder becomes its family's pipeline without text encoder when `transformer_folder` allows it.
    """
    from diffusers import DiffusionPipeline

    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    folder, _ = resolve_model(model)
    components = transformer_components(folder) if transformer_folder else {}
    if "" in components:
        family = components[""][1]
        transformer = family.transformer_classes[0].from_pretrained(folder, torch_dtype=torch_dtype(dtype))
        pipe = family.bare_pipeline(transformer)
    elif (folder / "model_index.json").is_file():
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype(dtype), **dict.fromkeys(without))
    else:
        raise ConvertError(f"not a diffusers pipeline folder (no model_index.json): {model}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch_device)
