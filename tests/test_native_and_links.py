"""Import of checkpoints in the official Wan layout, and conversion without a second copy of the weights."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file
from test_wan import inputs, raster_reference

from nabla_convert import NablaConfig, convert, load
from nabla_convert.config import ConfigError
from nabla_convert.convert import ConvertError
from nabla_convert.folders import public_name

# diffusers name fragment -> the official WanModel name (the Wan2.1 repository's state dict), written out here
# independently of diffusers' converter so that the test checks it
OFFICIAL_NAMES = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".norm2.", ".norm3."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def official_name(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = key.replace("scale_shift_table", "modulation")
    for diffusers_part, official_part in OFFICIAL_NAMES:
        key = key.replace(diffusers_part, official_part)
    return key


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def native_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A fine-tuned tiny transformer in the official Wan layout: WanModel config, official names, 3 shards."""
    base = WanTransformer3DModel.from_pretrained(tiny_pipeline_dir / "transformer")
    generator = torch.Generator().manual_seed(5)
    official = {
        official_name(k): v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()
    }
    assert set(convert_wan_transformer_to_diffusers(dict(official))) == set(base.state_dict())  # fixture is right
    folder = tmp_path_factory.mktemp("native") / "Wan2.1-T2V-tiny-NABLA"
    folder.mkdir()
    names = sorted(official)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for index, keys in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{index:05d}-of-00003.safetensors"
        save_file({k: official[k].contiguous() for k in keys}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    config = base.config
    native_config = {
        "_class_name": "WanModel",
        "model_type": "t2v",
        "dim": config.num_attention_heads * config.attention_head_dim,
        "num_heads": config.num_attention_heads,
        "num_layers": config.num_layers,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "in_dim": config.in_channels,
        "out_dim": config.out_channels,
        "text_len": 512,
    }
    (folder / "config.json").write_text(json.dumps(native_config))
    return folder


def diffusers_reference(native_dir: Path, base: Path) -> WanTransformer3DModel:
    """The dense transformer loaded the way diffusers' single-file path does: whole state dict through its converter."""
    state = {}
    for shard in sorted(native_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(base / "transformer"))
    model.load_state_dict(convert_wan_transformer_to_diffusers(state))
    return model.eval()


@pytest.mark.parametrize("config", [NablaConfig(threshold=1.0), NablaConfig(threshold=0.7)])
def test_native_checkpoint_imports_and_matches_diffusers_converter(native_dir, tiny_pipeline_dir, tmp_path, config):
    before = digests(native_dir)
    out = convert(native_dir, tmp_path / "out", config, base=tiny_pipeline_dir)
    assert digests(native_dir) == before
    pipe = WanPipeline.from_pretrained(out)  # stock loader, other components from the base
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    provenance = json.loads((out / "transformer" / "config.json").read_text())["_nabla"]["provenance"]
    assert provenance["base_model"] == public_name(native_dir)  # folder names, not local paths
    assert provenance["pipeline_base"] == public_name(tiny_pipeline_dir)
    reference = diffusers_reference(native_dir, tiny_pipeline_dir)
    if config.threshold < 1.0:
        reference = raster_reference(reference, (2, 12, 20), config)
    x, timestep, text = inputs((1, 16, 2, 24, 40))
    with torch.no_grad():
        expected = reference(x, timestep, text, return_dict=False)[0]
        got = pipe.transformer(x, timestep, text, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        got,
        WanTransformer3DModel.from_pretrained(tiny_pipeline_dir / "transformer")(x, timestep, text, return_dict=False)[
            0
        ].detach(),
        atol=1e-3,
    )  # the fine-tuned weights, not the base's


def test_native_checkpoint_needs_a_matching_base(native_dir, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ConvertError, match="give --base"):
        convert(native_dir, tmp_path / "a", NablaConfig())
    with pytest.raises(ConvertError, match="--base is for checkpoints in a family's original layout"):
        convert(tiny_pipeline_dir, tmp_path / "a", NablaConfig(), base=tiny_pipeline_dir)
    wrong = tmp_path / "wrong"
    shutil.copytree(native_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_heads": 4}))
    with pytest.raises(ConfigError, match="num_heads 4 differs"):
        convert(wrong, tmp_path / "b", NablaConfig(), base=tiny_pipeline_dir)
    assert not (tmp_path / "b").exists()


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_conversion_hard_links_weights_and_never_touches_the_source(tiny_pipeline_dir, tmp_path, links_small_files):
    source = tmp_path / "source"
    shutil.copytree(tiny_pipeline_dir, source)
    before = digests(source)
    out = convert(source, tmp_path / "out", NablaConfig(threshold=0.5))
    for path in weight_files(out):
        assert path.stat().st_ino == (source / path.relative_to(out)).stat().st_ino  # no second copy
    copied = convert(source, tmp_path / "copied", NablaConfig(threshold=0.5), link=False)
    for path in weight_files(copied):
        assert path.stat().st_ino != (source / path.relative_to(copied)).stat().st_ino
    assert [p.read_bytes() for p in weight_files(copied)] == [p.read_bytes() for p in weight_files(out)]
    # what a writer of the output must do (and nabla-convert does): replace files, never write into them
    weights = weight_files(out)[0]
    replacement = weights.with_name(weights.name + ".tmp")
    replacement.write_bytes(b"retrained")
    os.replace(replacement, weights)
    (out / "transformer" / "config.json").unlink()
    convert(source, out, NablaConfig(threshold=0.3), overwrite=True)  # overwrite drops the old links
    load(out)
    shutil.rmtree(out)
    assert digests(source) == before


def write_in_place(path: Path) -> None:
    """What an in-place writer does (save_pretrained over a file, an editor): the same inode, new bytes."""
    with path.open("r+b") as stream:
        stream.seek(-8, os.SEEK_END)
        stream.write(b"\x00" * 8)


@pytest.mark.parametrize("reflinks", [False, True])
def test_linked_weights_are_recorded_unread_and_push_still_catches_any_change(
    tiny_pipeline_dir, tmp_path, monkeypatch, reflinks, links_small_files
):
    """convert does not read the weights it links or clones (their identity goes in the marker, not their sha256),
    warns when they are hard links, and push's check still refuses a weight written in place afterwards.
    (This machine's ext4 has no reflink: a clone is stood in for by a copy the way FICLONE would make it.)"""
    from nabla_convert.convert import SharedWeightsWarning
    from nabla_convert.errors import InvalidCheckpointError
    from nabla_convert.folders import read_marker
    from nabla_convert.hub.push import prepare_push

    converting = importlib.import_module("nabla_convert.convert")  # the package's `convert` is the function
    monkeypatch.setattr(converting, "reflink", lambda src, dst: reflinks and bool(shutil.copyfile(src, dst)))
    source = tmp_path / "source"
    shutil.copytree(tiny_pipeline_dir, source)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        out = convert(source, tmp_path / "out", NablaConfig(threshold=0.5))
    shared = [w for w in warned if issubclass(w.category, SharedWeightsWarning)]
    assert len(shared) == (0 if reflinks else 1) and all("hard links to MODEL's" in str(w.message) for w in shared)
    assert all((source / p.relative_to(out)).stat().st_ino != p.stat().st_ino for p in weight_files(out)) == reflinks
    marker = read_marker(out)
    weights = {path.relative_to(out).as_posix() for path in weight_files(out)}
    assert sorted(marker["weight_identities"]) == sorted(weights) and marker["weights"] == {}
    prepare_push(out, "you/model")  # unchanged: accepted
    shard = weight_files(out)[-1]
    stat = shard.stat()
    write_in_place(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even a clock that barely moved
    with pytest.raises(InvalidCheckpointError, match=r"\(changed\)"):
        prepare_push(out, "you/model")
    monkeypatch.setattr(converting, "reflink", lambda src, dst: False)
    fresh = convert(source, tmp_path / "again", NablaConfig(threshold=0.5), link=False)
    replaced = weight_files(fresh)[0]
    os.replace(shutil.copyfile(replaced, tmp_path / "copy"), replaced)  # same bytes, another file
    prepare_push(fresh, "you/model")  # a copied weight is recorded by sha256: replacing it with equal bytes is fine
    assert read_marker(fresh).get("weight_identities") is None


def test_copy_mode_shares_nothing_and_the_toolkit_never_writes_into_the_source(
    tiny_pipeline_dir, tmp_path, links_small_files
):
    """--copy: no file of the output is the source's; nabla-convert's own writes into a linked output (convert
    --overwrite, push's card and restamp, removal) leave every byte of the source as it was."""
    from nabla_convert.folders import write_marker
    from nabla_convert.hub.push import prepare_push
    from nabla_convert.io import atomic_write_text

    source = tmp_path / "source"
    shutil.copytree(tiny_pipeline_dir, source)
    before = {path: path.read_bytes() for path in sorted(source.rglob("*")) if path.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shared-weights warning
        copied = convert(source, tmp_path / "copied", NablaConfig(threshold=0.5), link=False)
    source_inodes = {path.stat().st_ino for path in before}
    assert not {path.stat().st_ino for path in copied.rglob("*") if path.is_file()} & source_inodes
    write_in_place(weight_files(copied)[0])
    out = convert(source, tmp_path / "out", NablaConfig(threshold=0.5))
    convert(source, out, NablaConfig(threshold=0.3), overwrite=True)
    plan = prepare_push(out, "you/model", restamp=True)
    atomic_write_text(out / "README.md", plan.card)  # what push writes after a verified upload
    write_marker(out, "convert", plan.weights())
    shutil.rmtree(out)
    assert {path: path.read_bytes() for path in sorted(source.rglob("*")) if path.is_file()} == before


def test_small_weight_files_are_copied_without_a_warning(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Below LINK_MIN_BYTES a copy costs nothing, so convert takes no hard-link risk and says nothing (the README's
    first job converts the small embedded model); the output shares no file with the source."""
    from nabla_convert.convert import LINK_MIN_BYTES

    converting = importlib.import_module("nabla_convert.convert")
    monkeypatch.setattr(converting, "reflink", lambda src, dst: False)  # as ext4
    source = tmp_path / "source"
    shutil.copytree(tiny_pipeline_dir, source)
    assert max(path.stat().st_size for path in weight_files(source)) < LINK_MIN_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shared-weights warning
        out = convert(source, tmp_path / "out", NablaConfig(threshold=0.5))
    source_inodes = {path.stat().st_ino for path in source.rglob("*") if path.is_file()}
    assert not {path.stat().st_ino for path in out.rglob("*") if path.is_file()} & source_inodes
    assert [p.read_bytes() for p in weight_files(out)] == [p.read_bytes() for p in weight_files(source)]
