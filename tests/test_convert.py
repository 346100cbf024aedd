"""convert / load / the convert CLI: self-describing checkpoints that stock diffusers loads."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import generate
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import nabla_convert
from nabla_convert import NablaConfig, convert, load
from nabla_convert.cli import LAZY_COMMANDS, main
from nabla_convert.config import LayerSettings
from nabla_convert.convert import ConvertError
from nabla_convert.folders import FolderError
from nabla_convert.models.tiny import tiny_wan_pipeline
from nabla_convert.models.wan import NablaAttnProcessor, NablaWanTransformer3DModel


def digests(folder: Path, pattern: str = "*.safetensors") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def test_convert_pipeline_round_trip(tiny_pipeline_dir, tmp_path):
    out = convert(tiny_pipeline_dir, tmp_path / "nabla", NablaConfig(threshold=0.4, sta=(1, 3, 3)))
    # weights bit-exact, sharding kept
    assert digests(out / "transformer") == digests(tiny_pipeline_dir / "transformer")
    assert len(digests(out / "transformer")) > 1
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert json.loads((out / "model_index.json").read_text())["transformer"] == [
        "nabla_convert",
        "NablaWanTransformer3DModel",
    ]
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_nabla"]["threshold"] == 0.4
    assert config["_nabla"]["provenance"]["base_model"] == "pipe"  # the folder name, never the local path

    stock = WanPipeline.from_pretrained(out)
    assert isinstance(stock.transformer, NablaWanTransformer3DModel)
    assert all(isinstance(b.attn1.processor, NablaAttnProcessor) for b in stock.transformer.blocks)
    ours = load(out)
    ours.set_progress_bar_config(disable=True)
    stock.set_progress_bar_config(disable=True)
    expected = generate(ours)
    torch.testing.assert_close(generate(stock), expected, atol=0, rtol=0)

    # reference: the same weights with NABLA applied in memory
    reference = WanPipeline.from_pretrained(tiny_pipeline_dir)
    reference.set_progress_bar_config(disable=True)
    nabla_convert.apply_nabla(reference.transformer, NablaConfig(threshold=0.4, sta=(1, 3, 3)))
    torch.testing.assert_close(expected, generate(reference), atol=0, rtol=0)
    dense = WanPipeline.from_pretrained(tiny_pipeline_dir)
    dense.set_progress_bar_config(disable=True)
    assert not torch.allclose(expected, generate(dense), atol=1e-4)

    # the transformer folder still loads as a plain dense model
    plain = WanTransformer3DModel.from_pretrained(out / "transformer")
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in plain.blocks)


def test_per_head_thresholds_round_trip_through_a_converted_folder(tiny_pipeline_dir, tmp_path):
    config = NablaConfig(threshold=0.5, layers={1: LayerSettings(threshold=(0.25, 0.75))})
    out = convert(tiny_pipeline_dir / "transformer", tmp_path / "t", config)
    assert json.loads((out / "config.json").read_text())["_nabla"]["layers"]["1"]["threshold"] == [0.25, 0.75]
    model = load(out)
    assert model._nabla_state.config.layers == config.layers
    assert model.blocks[1].attn1.processor.settings.threshold == (0.25, 0.75)
    assert NablaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    wrong = NablaConfig(layers={0: LayerSettings(threshold=(0.5, 0.5, 0.5))})
    with pytest.raises(ConvertError, match="layer 0 has 3 per-head thresholds, the model has 2 heads"):
        convert(tiny_pipeline_dir / "transformer", tmp_path / "wrong", wrong)


def test_saving_a_loaded_model_keeps_its_settings(tiny_pipeline_dir, tmp_path):
    out = convert(tiny_pipeline_dir / "transformer", tmp_path / "t", NablaConfig(threshold=0.25, dense_steps=3))
    model = load(out)
    model.save_pretrained(tmp_path / "again")
    again = NablaWanTransformer3DModel.from_pretrained(tmp_path / "again")
    assert again._nabla_state.config.threshold == 0.25
    assert again._nabla_state.config.dense_steps == 3


def test_base_card_license_carried_and_card_not_copied(tiny_pipeline_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Wan base\n")
    out = convert(base, tmp_path / "nabla", NablaConfig())
    assert not (out / "README.md").exists()
    assert json.loads((out / "transformer" / "config.json").read_text())["_nabla"]["provenance"]["base_license"] == (
        "apache-2.0"
    )


def test_convert_keeps_dtype(tmp_path):
    pipe = tiny_wan_pipeline()
    pipe.transformer.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    out = convert(tmp_path / "bf16", tmp_path / "nabla", NablaConfig())
    model = NablaWanTransformer3DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert digests(out) == digests(tmp_path / "bf16")
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_two_transformers_get_their_own_settings(tmp_path):
    tiny_wan_pipeline(two_transformers=True).save_pretrained(tmp_path / "a14b")
    configs = {"transformer": NablaConfig(threshold=0.3, dense_steps=2), "transformer_2": NablaConfig(threshold=0.8)}
    out = convert(tmp_path / "a14b", tmp_path / "nabla", configs)
    pipe = WanPipeline.from_pretrained(out)
    assert pipe.transformer._nabla_state.config.dense_steps == 2
    assert pipe.transformer_2._nabla_state.config.threshold == 0.8


def test_config_file_per_component_through_cli(tmp_path):
    tiny_wan_pipeline(two_transformers=True).save_pretrained(tmp_path / "a14b")
    config_file = tmp_path / "nabla_config.json"
    config_file.write_text(
        json.dumps({"transformer": NablaConfig(threshold=0.3).to_dict(), "transformer_2": {"threshold": 0.9}})
    )
    result = CliRunner().invoke(
        main, ["convert", str(tmp_path / "a14b"), "--out", str(tmp_path / "o"), "--config", str(config_file)]
    )
    assert result.exit_code == 0, result.output
    pipe = WanPipeline.from_pretrained(tmp_path / "o")
    assert (pipe.transformer._nabla_state.config.threshold, pipe.transformer_2._nabla_state.config.threshold) == (
        0.3,
        0.9,
    )


def test_cli_recipe_and_threshold(tiny_pipeline_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "convert",
            str(tiny_pipeline_dir),
            "--out",
            str(tmp_path / "r"),
            "--recipe",
            "wan2.1-t2v-14b-720p-nabla0.6-sta11-3-3",
        ],
    )
    assert result.exit_code == 0, result.output
    config = load(tmp_path / "r").transformer._nabla_state.config
    assert (config.threshold, config.sta) == (0.6, (11, 3, 3))
    assert config.provenance["recipe"] == "wan2.1-t2v-14b-720p-nabla0.6-sta11-3-3"
    args = ["convert", str(tiny_pipeline_dir), "--out", str(tmp_path / "t")]
    result = runner.invoke(main, [*args, "--threshold", "0.5", "--sta", "3,1,1", "--dense-steps", "4"])
    assert result.exit_code == 0, result.output
    config = load(tmp_path / "t").transformer._nabla_state.config
    assert (config.threshold, config.sta, config.dense_steps) == (0.5, (3, 1, 1), 4)


def test_every_option_of_every_command_says_what_it_does():
    """Each option's help comes from its declaration (Click lists options with or without one): none is left bare,
    and --help shows each declared option with its own text."""
    ctx = click.Context(main)
    for name in LAZY_COMMANDS:
        command = main.get_command(ctx, name)
        shown = " ".join(CliRunner().invoke(main, [name, "--help"]).output.split())
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{name} {param.opts[0]} has no help text"
                assert param.opts[0] in shown and " ".join(param.help.split())[:30] in shown, (name, param.opts)


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["{missing}", "--threshold", "0.5"], "model folder not found", 1),
        (["{not_wan}", "--threshold", "0.5"], "not a supported transformer", 1),
        (["{pipe}", "--threshold", "1.5"], "0<=x<=1", 2),
        (["{pipe}", "--threshold", "0"], "it needs an STA window (STA only)", 1),
        (["{pipe}", "--threshold", "0.5", "--sta", "11,3"], "three", 2),
        (["{pipe}", "--threshold", "0.5", "--sta", "a,b,c"], "three integers", 2),
        (["{pipe}"], "no NABLA settings of its own", 1),
        (["{pipe}", "--recipe", "no-such-recipe"], "recipe not found", 1),
    ],
)
def test_cli_bad_input_is_one_line_error_and_writes_nothing(tiny_pipeline_dir, tmp_path, args, message, code):
    not_wan = tmp_path / "unet"
    not_wan.mkdir()
    (not_wan / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    paths = {"missing": tmp_path / "nope", "not_wan": not_wan, "pipe": tiny_pipeline_dir}
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", *args, "--out", str(out)])
    assert result.exit_code == code, result.output
    assert message in result.output
    if code == 1:
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_convert_refuses_nonempty_out_and_failed_convert_leaves_nothing(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FolderError, match="not empty"):
        convert(tiny_pipeline_dir, out, NablaConfig())
    with pytest.raises(FolderError, match="not written by nabla-convert"):
        convert(tiny_pipeline_dir, out, NablaConfig(), overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConvertError, match="the model has 2"):
        convert(tiny_pipeline_dir, tmp_path / "new", NablaConfig(dense_layers=(7,)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    first = convert(tiny_pipeline_dir, tmp_path / "first", NablaConfig(threshold=0.4))
    convert(tiny_pipeline_dir, first, NablaConfig(threshold=0.6), overwrite=True)  # a folder convert wrote
    assert load(first).transformer._nabla_state.config.threshold == 0.6


def test_load_refuses_dense_checkpoint(tiny_pipeline_dir):
    with pytest.raises(ConvertError, match="dense checkpoint"):
        load(tiny_pipeline_dir)
