"""Bad input on the command line: one "Error:" line and a non-zero exit, never a traceback or a silent success.

The cases are what a careless user or an attacker types: values of the wrong type in recipes and configs, files
that are not UTF-8 text, devices this machine lacks, malformed Hub ids. Each must fail before any work is done.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nabla_convert.cli import main


@pytest.fixture
def no_downloads(monkeypatch):
    """Any Hub download fails the test: these inputs must be refused before a request."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)


def run(*args) -> tuple[int, str]:
    """Exit code and the one error line; fails the test on a traceback or on output beside the error line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]  # no progress bars
    if result.exit_code == 2:  # Click's usage errors come with the usage line and a pointer to --help
        lines = [line for line in lines if not line.startswith(("Usage: ", "Try "))]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return result.exit_code, lines[0]


@pytest.mark.parametrize(
    ("nabla", "message"),
    [
        ({"threshold": "0.7"}, "threshold must be a finite number, got '0.7'"),
        ({"threshold": True}, "threshold must be a finite number, got True"),
        ({"threshold": float("nan")}, "threshold must be a finite number"),
        ({"dense_layers": "12"}, "dense_layers must be a list of integers, got '12'"),
        ({"dense_layers": [True]}, "dense_layers item must be an integer, got True"),
        ({"dense_layers": 3}, "dense_layers must be a list of integers, got 3"),
        ({"dense_steps": True}, "dense_steps must be an integer, got True"),
        ({"sta": True}, "STA window must be a list of integers, got True"),
        ({"sta": [11.5, 3, 3]}, "STA window item must be an integer, got 11.5"),
        ({"tile": "88"}, "tile must be a list of integers"),
        ({"q_block": 64.0}, "q_block must be an integer, got 64.0"),
        ({"schema_version": "2"}, "schema_version must be an integer"),
        ({"provenance": "x"}, "provenance must be a mapping"),
        ({"layers": [1, 2]}, "layers must be a mapping"),
        ({"layers": {"x": {"threshold": 0.5}}}, "a layers key (a layer index) must be an integer, got 'x'"),
        ({"layers": {"0": 5}}, "layer 0 must be a mapping"),
        ({"layers": {"0": {"dense": "no"}}}, "dense must be true or false, got 'no'"),
        ({"layers": {"0": {"threshold": [0.5, "0.7"]}}}, "threshold of head 1 must be a finite number, got '0.7'"),
        ({"layers": {"0": {"threshold": [True, 0.5]}}}, "threshold of head 0 must be a finite number, got True"),
        ({"layers": {"0": {"threshold": [0.5, 1.5]}}}, "layer 0: threshold of head 1 must be in [0, 1]"),
        ({"layers": {"0": {"threshold": [0.5, 0]}}}, "per-head thresholds must be in (0, 1] (STA only is a layer"),
        ({"layers": {"0": {"threshold": []}}}, "threshold must be a number or a non-empty list of per-head numbers"),
        ({"layers": {"0": {"threshold": "0.5,0.7"}}}, "threshold must be a finite number, got '0.5,0.7'"),
        ({"threshold": 0.5, "treshold": 0.6}, "unknown NABLA config keys ['treshold']"),
    ],
)
def test_config_and_recipe_schemas_refuse_instead_of_coercing(tiny_pipeline_dir, tmp_path, nabla, message):
    config = tmp_path / "nabla_config.json"
    config.write_text(json.dumps(nabla))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"nabla": nabla}))  # JSON is YAML
    for option, path in (("--config", config), ("--recipe", recipe)):
        code, line = run("convert", tiny_pipeline_dir, "--out", tmp_path / "out", option, path)
        assert code == 1 and message in line and str(path) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "text", "message"),
    [
        ("--recipe", "nabla: [1, 2]", "nabla must be a mapping"),
        ("--recipe", "nabla: {threshold: 0.5}\ncalibrate: [1]", "calibrate must be a mapping"),
        ("--recipe", "nabla: {threshold: 0.5}\nextra: 1", "unknown recipe keys ['extra']"),
        ("--recipe", "name: [1]\nnabla: {threshold: 0.5}", "name must be text"),
        ("--recipe", "- 1\n- 2", "a recipe must be a mapping"),
        ("--recipe", "nabla: {threshold: [", "is not valid YAML"),
        ("--recipe", "# caf\xe9\nnabla: {threshold: 0.5}", "not UTF-8 text (byte 0xe9 at offset 5)"),
        ("--config", '{"threshold": ', "is not valid JSON"),
        ("--config", "", "is not valid JSON"),
        ("--config", "[1]", "must be a mapping of settings, got list"),
        ("--config", '{"transformer": 5}', "must be a mapping of settings, got int"),
    ],
)
def test_malformed_recipe_and_config_files(tiny_pipeline_dir, tmp_path, option, text, message):
    path = tmp_path / ("recipe.yaml" if option == "--recipe" else "nabla_config.json")
    path.write_bytes(text.encode("latin-1"))
    code, line = run("convert", tiny_pipeline_dir, "--out", tmp_path / "out", option, path)
    assert code == 1 and message in line


def test_recipe_names_do_not_walk_out_of_the_shipped_folder(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative to here, nothing exists: only a lookup in recipes/ could find it
    walk = "../recipes/wan2.1-t2v-14b-720p-nabla0.7"  # recipes/../recipes/NAME: a path, not a name
    code, line = run("convert", tiny_pipeline_dir, "--out", tmp_path / "out", "--recipe", walk)
    assert code == 1 and "recipe not found" in line and "shipped recipes: kandinsky5" in line


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("bad id/with space", "not a valid Hub id"),
        ("bad--id/x", "not a valid Hub id"),
    ],
)
def test_malformed_model_ids_are_refused_before_any_request(tmp_path, model, message, monkeypatch, no_downloads):
    monkeypatch.chdir(tmp_path)  # an empty MODEL must not mean the current folder
    code, line = run("convert", model, "--out", tmp_path / "out", "--threshold", "0.5")
    assert code == 1 and message in line


def test_model_folder_with_a_json_list_for_model_index(tiny_pipeline_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    (broken / "model_index.json").write_text("[]")
    code, line = run("convert", broken, "--out", tmp_path / "out", "--threshold", "0.5")
    assert code == 1 and "holds a JSON list, not a dict" in line


@pytest.mark.parametrize("device", ["banana", "cuda:99", "mps"])
def test_devices_this_machine_lacks(tiny_pipeline_dir, tmp_path, device):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    small = ["--steps", "1", "--height", "32", "--width", "32", "--frames", "5", "--device", device]
    code, line = run(
        "eval", tiny_pipeline_dir, tiny_pipeline_dir, "--out", tmp_path / "e", "--prompts", prompts, *small
    )
    assert code == 1 and f"device {device!r} is not usable" in line
    code, line = run(
        "calibrate", tiny_pipeline_dir, "--out", tmp_path / "c", "--prompts", prompts, *small, "--target-density", "0.5"
    )
    assert code == 1 and f"device {device!r} is not usable" in line


@pytest.mark.parametrize(
    ("command", "options", "message"),
    [
        ("calibrate", ["--height", "40"], "height must be a multiple of 16"),
        ("calibrate", ["--guidance", "nan"], "guidance must be a finite number"),
        ("calibrate", ["--error-budget", "inf"], "error_budget must be a finite number"),
        ("eval", ["--height", "40"], "height must be a multiple of 16"),
        ("eval", ["--guidance", "nan"], "guidance must be a finite number"),
    ],
)
def test_numbers_the_models_cannot_use(tiny_pipeline_dir, tmp_path, command, options, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    models = [tiny_pipeline_dir] * (2 if command == "eval" else 1)
    code, line = run(command, *models, "--out", tmp_path / "out", "--prompts", prompts, "--device", "cpu", *options)
    assert code == 1 and message in line


@pytest.mark.parametrize(
    ("command", "content", "message"),
    [
        ("calibrate", "caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
        ("calibrate", b"", "has no prompts"),
        ("eval", "a red ball\n".encode("utf-16"), "not UTF-8 text"),
        ("eval", b"a red ball\x00", "NUL bytes"),
    ],
)
def test_prompt_files_that_are_not_prompts(tiny_pipeline_dir, tmp_path, command, content, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    models = [tiny_pipeline_dir] * (2 if command == "eval" else 1)
    code, line = run(command, *models, "--out", tmp_path / "out", "--prompts", prompts, "--device", "cpu")
    assert code == 1 and message in line and str(prompts) in line


@pytest.mark.parametrize(
    ("adapt", "message"),
    [
        ({"steps": "10"}, "steps must be an integer, got '10'"),
        ({"lr": "1e-4"}, "lr must be a finite number, got '1e-4'"),
        ({"latent_shape": "123"}, "latent_shape must be a list of integers"),
        ({"gradient_checkpointing": "no"}, "gradient_checkpointing must be true or false"),
        ({"stepz": 1}, "unknown adapt settings ['stepz']"),
    ],
)
def test_adapt_recipe_values_are_checked_even_where_an_option_overrides_them(
    tiny_pipeline_dir, tmp_path, adapt, message
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"nabla": {"threshold": 0.5}, "adapt": adapt}))
    converted = tmp_path / "converted"
    assert (
        CliRunner()
        .invoke(main, ["convert", str(tiny_pipeline_dir), "--out", str(converted), "--threshold", "0.5"])
        .exit_code
        == 0
    )
    options = ["--steps", "1", "--latent-shape", "2,4,4", "--recipe", recipe]
    code, line = run("adapt", converted, "--out", tmp_path / "adapted", *options)
    assert code == 1 and message in line


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_adapt_learning_rate_must_be_finite(tiny_pipeline_dir, tmp_path, value):
    converted = tmp_path / "converted"
    assert (
        CliRunner()
        .invoke(main, ["convert", str(tiny_pipeline_dir), "--out", str(converted), "--threshold", "0.5"])
        .exit_code
        == 0
    )
    code, line = run("adapt", converted, "--out", tmp_path / "adapted", "--steps", "1", "--lr", value)
    assert code == 1 and "lr must be a finite number" in line


def test_a_token_that_cannot_be_a_header_is_refused_unprinted(tmp_path, no_downloads):
    args = ["convert", "someone/model", "--out", tmp_path / "out", "--threshold", "0.5"]
    code, line = run(*args, "--token", "hf_first\nhf_second")
    assert code == 4 and "token" in line and "hf_first" not in line and "hf_second" not in line


@pytest.mark.parametrize("command", ["convert", "calibrate", "eval"])
def test_an_empty_model_is_not_the_current_folder(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    models = ["", ""] if command == "eval" else [""]
    code, line = run(
        command,
        *models,
        "--out",
        tmp_path / "out",
        "--threshold" if command == "convert" else "--device",
        "0.5" if command == "convert" else "cpu",
    )
    assert code == 2 and "empty; give a folder or a Hub id" in line
