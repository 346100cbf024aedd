"""Data safety of the commands that write: outputs never touch inputs, links never lead out, corrupt weights are
refused, killed runs leave nothing behind, nothing private is recorded.

Each test works on its own copy of the tiny pipeline (the damage it tries would otherwise hit the shared fixture) and
checks the real filesystem afterwards: every byte of the input is compared with a snapshot taken before.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from nabla_convert import NablaConfig, convert
from nabla_convert.cli import main
from nabla_convert.folders import MARKER, TEMP_TAG, read_marker, weight_digests


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (links as their target text) under `folder`, with its sha256: what an untouched input looks like."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture
def model(tiny_pipeline_dir, tmp_path) -> Path:
    """A private copy of the tiny dense pipeline, with a card, a license and a git folder as a Hub clone has."""
    folder = tmp_path / "models" / "wan"
    shutil.copytree(tiny_pipeline_dir, folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    (folder / "LICENSE.txt").write_text("Apache-2.0")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return folder


def run_convert(model: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(model), "--out", str(out), "--threshold", "0.5", *extra])


@pytest.mark.parametrize("where", ["itself", "parent", "inside", "component", "link to it"])
@pytest.mark.parametrize("converted_first", [False, True], ids=["dense", "marked"])
def test_convert_out_aliasing_the_model_is_refused_and_nothing_is_touched(model, tmp_path, where, converted_first):
    if converted_first:  # a nabla-convert output carries a marker, so only the alias check can protect it
        model = convert(model, tmp_path / "models" / "converted", NablaConfig())
    (tmp_path / "models" / "sibling.txt").write_text("a neighbour of MODEL")
    link = tmp_path / "link"
    link.symlink_to(model)
    out = {
        "itself": model,
        "parent": model.parent,
        "inside": model / "nabla",
        "component": model / "transformer",
        "link to it": link,
    }[where]
    before = snapshot(tmp_path)

    line = one_line_error(run_convert(model, out, "--overwrite"))

    assert "--out" in line and "MODEL" in line
    assert snapshot(tmp_path) == before


def test_convert_out_holding_the_config_file_is_refused(model, tmp_path):
    calibration = convert(model, tmp_path / "cal", NablaConfig())  # any marked folder that holds the config
    (calibration / "nabla_config.json").write_text(json.dumps(NablaConfig(threshold=0.4).to_dict()))
    before = snapshot(tmp_path)
    args = ["convert", str(model), "--out", str(calibration), "--config", str(calibration / "nabla_config.json")]
    line = one_line_error(CliRunner().invoke(main, [*args, "--overwrite"]))
    assert "--config file" in line
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_folder_nabla_convert_wrote(model, tmp_path, monkeypatch, links_small_files):
    monkeypatch.setattr(importlib.import_module("nabla_convert.convert"), "reflink", lambda src, dst: False)  # as ext4
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a checkpoint")
    assert "not written by nabla-convert" in one_line_error(run_convert(model, mine, "--overwrite"))
    assert (mine / "notes.txt").read_text() == "not a checkpoint"

    out = tmp_path / "out"
    result = run_convert(model, out)
    assert result.exit_code == 0 and "Warning: " in result.stderr and "hard links to MODEL's" in result.stderr
    assert "Warning" not in run_convert(model, tmp_path / "copied", "--copy").stderr
    marker = read_marker(out)
    digests, identities = marker["weights"], marker.get("weight_identities", {})
    assert marker["command"] == "convert" and sorted(digests.keys() | identities.keys()) == sorted(weight_digests(out))
    assert all(digests[path] == sha for path, sha in weight_digests(out).items() if path in digests)
    assert "transformer/diffusion_pytorch_model-00001-of-00004.safetensors" in digests.keys() | identities.keys()
    assert "not empty" in one_line_error(run_convert(model, out))
    result = CliRunner().invoke(main, ["convert", str(model), "--out", str(out), "--threshold", "0.7", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "transformer" / "config.json").read_text())["_nabla"]["threshold"] == 0.7


def test_convert_from_an_uninstalled_source_tree_records_an_unknown_version(model, tmp_path, monkeypatch):
    """Run from a source tree on PYTHONPATH (no installed metadata, as on a GPU machine without pip install), convert
    still writes its folder and says the version is unknown, in the marker and in the converted config."""
    from importlib.metadata import PackageNotFoundError

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(importlib.import_module("nabla_convert.folders"), "version", not_installed)
    out = tmp_path / "out"
    assert run_convert(model, out).exit_code == 0
    assert read_marker(out)["version"] == "unknown"
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["_nabla"]["provenance"]["tool_version"] == "unknown"


def test_links_leaving_the_model_are_refused_and_listed(model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (model / "transformer" / "notes.txt").symlink_to(secret)
    (model / "scheduler" / "gone.json").symlink_to(tmp_path / "missing.json")
    (model / "vae" / "loop").symlink_to(model)
    (model / "README.md").unlink()
    (model / "README.md").symlink_to(secret)  # convert never copies the base card: not a problem
    out = tmp_path / "out"

    line = one_line_error(run_convert(model, out))

    assert "links that leave it" in line
    for listed in ("transformer/notes.txt -> ", "scheduler/gone.json -> ", "vae/loop -> "):
        assert listed in line
    assert "README.md" not in line
    assert not out.exists() and not list(tmp_path.glob(f".out.{TEMP_TAG}*"))


def test_links_inside_the_model_are_copied_as_files(model, tmp_path):
    (model / "tokenizer" / "alias.json").symlink_to(model / "tokenizer" / "tokenizer_config.json")
    out = tmp_path / "out"
    assert run_convert(model, out).exit_code == 0
    copy = out / "tokenizer" / "alias.json"
    assert not copy.is_symlink() and copy.read_bytes() == (model / "tokenizer" / "tokenizer_config.json").read_bytes()


def first_shard(folder: Path) -> Path:
    return sorted((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))[0]


def truncate(model: Path) -> str:
    shard = first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-100])
    return "not readable safetensors"


def truncate_vae(model: Path) -> str:
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "vae/diffusion_pytorch_model.safetensors is not readable safetensors"


def rewrite_first_shard(model: Path, change) -> None:
    shard = first_shard(model)
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def wrong_shape(model: Path) -> str:
    def change(tensors):
        name = sorted(n for n in tensors if tensors[n].dim() == 2)[0]
        tensors[name] = tensors[name][:, :-1].contiguous()

    rewrite_first_shard(model, change)
    return "has shape"


def wrong_dtype(model: Path) -> str:
    def change(tensors):
        name = sorted(n for n in tensors if tensors[n].dim() == 2)[0]
        tensors[name] = tensors[name].to(torch.int32)

    rewrite_first_shard(model, change)
    return "is stored as I32"


def missing_tensor(model: Path) -> str:
    rewrite_first_shard(model, lambda tensors: tensors.pop(sorted(tensors)[0]))
    return "lack 1 tensor(s)"


@pytest.mark.parametrize("damage", [truncate, truncate_vae, wrong_shape, wrong_dtype, missing_tensor])
def test_corrupt_weights_are_refused_before_anything_is_written(model, tmp_path, damage):
    message = damage(model)
    out = tmp_path / "out"
    line = one_line_error(run_convert(model, out))
    assert message in line
    assert not out.exists() and not list(tmp_path.glob(f".out.{TEMP_TAG}*"))


def test_transformer_without_safetensors_is_refused(model, tmp_path):
    for shard in (model / "transformer").glob("*.safetensors*"):
        shard.unlink()
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    assert "only safetensors weights are read" in one_line_error(run_convert(model, tmp_path / "out"))


SLOW_COPY = """
import shutil, sys, time
from pathlib import Path

copy = shutil.copyfile


def slow(src, dst, **kwargs):
    if str(src).endswith(".safetensors"):
        Path(sys.argv[3]).touch()
        time.sleep(120)
    return copy(src, dst, **kwargs)


shutil.copyfile = slow
from nabla_convert.config import NablaConfig
from nabla_convert.convert import convert

convert(sys.argv[1], sys.argv[2], NablaConfig(), link=False)  # copies (hard links would take no time to kill)
"""


@pytest.mark.slow
def test_killed_convert_leaves_no_temp_folder_and_the_next_run_removes_a_stale_one(model, tmp_path):
    """SIGTERM: the run removes its own temp folder. kill -9: nothing can, so the next run for that output does."""
    runs = {}
    for name, sig in (("term", signal.SIGTERM), ("kill", signal.SIGKILL)):
        flag = tmp_path / f"{name}.copying"
        command = [sys.executable, "-c", SLOW_COPY, str(model), str(tmp_path / name), str(flag)]
        runs[name] = (subprocess.Popen(command, stderr=subprocess.PIPE, text=True), flag, sig)
    deadline = time.monotonic() + 120
    for process, flag, sig in runs.values():
        while not flag.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert list(tmp_path.glob(f".{flag.stem}.{TEMP_TAG}-*"))  # the temp folder exists while it copies
        process.send_signal(sig)
    for process, _, _ in runs.values():
        assert process.wait(timeout=60) != 0

    assert not list(tmp_path.glob(f".term.{TEMP_TAG}-*")) and not (tmp_path / "term").exists()
    stale = list(tmp_path.glob(f".kill.{TEMP_TAG}-*"))
    assert len(stale) == 1 and not (tmp_path / "kill").exists()
    convert(model, tmp_path / "kill", NablaConfig())
    assert not stale[0].exists() and (tmp_path / "kill" / MARKER).is_file()


def test_provenance_records_the_folder_name_not_the_local_path(model, tmp_path):
    out = convert(model, tmp_path / "out", NablaConfig())
    text = (out / "transformer" / "config.json").read_text()
    assert json.loads(text)["_nabla"]["provenance"]["base_model"] == "wan"
    assert str(tmp_path) not in text


# --- adapt -------------------------------------------------------------------------------------------------------

TINY_ADAPT = {"latent_shape": (2, 16, 32), "rollout_steps": 2, "text_length": 8, "validation_samples": 1}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety-adapt")
    convert_dir = convert(_tiny_dense(root), root / "converted", NablaConfig(threshold=0.3))
    (root / "prompts.txt").write_text("a red ball\na blue cube\na green field\n")
    return convert_dir


def _tiny_dense(root: Path) -> Path:
    from nabla_convert.models.tiny import tiny_wan_pipeline

    tiny_wan_pipeline(0).save_pretrained(root / "dense")
    return root / "dense"


def adapt_settings(converted: Path, **overrides):
    from nabla_convert.adapt import AdaptSettings

    plan = {"prompts": str(converted.parent / "prompts.txt"), "warmup_steps": 0, "steps": 2, **TINY_ADAPT}
    return AdaptSettings(**{**plan, **overrides})


@pytest.mark.parametrize("where", ["inside", "itself", "parent"])
def test_adapt_out_aliasing_the_converted_folder_is_refused(converted, where):
    out = {"inside": converted / "x", "itself": converted, "parent": converted.parent}[where]
    before = snapshot(converted)
    args = ["adapt", str(converted), "--out", str(out), "--steps", "1", "--latent-shape", "2,16,32"]
    line = one_line_error(CliRunner().invoke(main, args))
    assert "CONVERTED folder" in line
    assert snapshot(converted) == before and not (converted / "x.run").exists()


def test_adapt_refuses_links_out_of_its_run_folder(converted, tmp_path):
    from nabla_convert.adapt import adapt

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "out.run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"tool": "nabla-convert", "command": "adapt"}))
    (run / "metrics.jsonl").symlink_to(victim)  # appending metrics would write into it
    with pytest.raises(Exception, match="links that leave it") as raised:
        adapt(converted, tmp_path / "out", adapt_settings(converted), progress=False)
    assert "metrics.jsonl" in str(raised.value) and victim.read_text() == "keep me"


class Payload:
    """A pickle that, when loaded, writes a file: proof that something unpickled it."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.write_text, (self.flag, "unpickled"))


@pytest.mark.slow
def test_resume_never_loads_a_planted_pickle(converted, tmp_path):
    import pickle

    from nabla_convert.adapt import adapt
    from nabla_convert.adapt.checkpoint import CheckpointError

    plan = adapt_settings(converted, steps=2, validate_every=0, checkpoint_every=0)
    assert adapt(converted, tmp_path / "out", plan, stop_after=1, progress=False) is None
    checkpoint = tmp_path / "out.run" / "checkpoints" / "step-000001"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.safetensors",
        "state.json",
        "trainable.safetensors",
    ]
    flag = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "model.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(Payload(flag)))
    assert adapt(converted, tmp_path / "out", plan, resume=True, progress=False) == tmp_path / "out"
    assert not flag.exists()

    # an older version's checkpoint (accelerate save_state: pickles only) is refused, not loaded
    (tmp_path / "old.run" / "checkpoints" / "step-000001").mkdir(parents=True)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (tmp_path / "old.run" / "checkpoints" / "step-000001" / name).write_bytes(pickle.dumps(Payload(flag)))
    (tmp_path / "old.run" / MARKER).write_text(json.dumps({"tool": "nabla-convert", "command": "adapt"}))
    with pytest.raises(CheckpointError, match="never loaded"):
        adapt(converted, tmp_path / "old", plan, resume=True, progress=False)
    assert not flag.exists()


@pytest.mark.slow
def test_non_finite_gradient_stops_adapt_and_keeps_the_last_good_checkpoint(converted, tmp_path):
    from nabla_convert.adapt import AdaptError, adapt, write_latent_shard
    from nabla_convert.adapt.data import sample_positions, split_heldout

    count, poisoned_step, heldout_fraction = 6, 2, 0.2  # the third step (0-based 2) trains on the NaN sample
    train, _ = split_heldout(count, heldout_fraction)
    poisoned = train[sample_positions(0, len(train), poisoned_step, 1)[0]]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(count, 16, 2, 16, 32, generator=generator)
    latents[poisoned, 0, 0, 0, 0] = float("nan")
    write_latent_shard(tmp_path / "data" / "shard.safetensors", latents, torch.randn(count, 8, 32, generator=generator))
    plan = adapt_settings(
        converted,
        steps=4,
        loss="flow",
        data=str(tmp_path / "data"),
        validate_every=0,
        checkpoint_every=1,
        heldout_fraction=heldout_fraction,
    )

    with pytest.raises(AdaptError, match="step 3: the gradient norm is nan") as raised:
        adapt(converted, tmp_path / "out", plan, progress=False)

    assert "last good checkpoint" in str(raised.value) and "step-000002" in str(raised.value)
    assert not (tmp_path / "out").exists()
    kept = sorted(p.name for p in (tmp_path / "out.run" / "checkpoints").iterdir())
    assert kept == ["step-000001", "step-000002"]
    weights = load_file(tmp_path / "out.run" / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


# --- eval and bench ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "inside", "parent"])
def test_eval_out_never_touches_a_model(model, where):
    out = {"model": model, "inside": model / "eval", "parent": model.parent}[where]
    before = snapshot(model.parent)
    line = one_line_error(CliRunner().invoke(main, ["eval", str(model), str(model), "--out", str(out)]))
    assert "MODEL_A" in line
    assert snapshot(model.parent) == before


def test_eval_replaces_only_its_own_report_and_names_models_without_their_path(model, tmp_path):
    from nabla_convert.eval.run import run_eval
    from nabla_convert.eval.sampling import EvalSettings

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    args = ["eval", str(model), str(model), "--out", str(mine), "--prompts", str(prompts), "--overwrite"]
    assert "not written by nabla-convert" in one_line_error(CliRunner().invoke(main, args))
    assert (mine / "report.md").read_text() == "my report"

    settings = EvalSettings(steps=1, height=32, width=32, frames=5, preview_samples=1)
    out = tmp_path / "eval"
    run_eval(model, model, out, prompts_file=prompts, settings=settings, device="cpu", progress=False)
    text = (out / "eval.json").read_text() + (out / "report.md").read_text()
    assert json.loads((out / "eval.json").read_text())["summary"]["model_a"] == "wan" and str(tmp_path) not in text
    assert read_marker(out)["command"] == "eval"
    with pytest.raises(Exception, match="pass --overwrite"):
        run_eval(model, model, out, prompts_file=prompts, settings=settings, device="cpu", progress=False)
    run_eval(model, model, out, prompts_file=prompts, settings=settings, device="cpu", progress=False, overwrite=True)


def test_bench_out_never_lands_in_the_model_or_on_a_foreign_file(model, tmp_path):
    before = snapshot(model)
    for target in (model / "model_index.json", model / "transformer" / "bench.json"):
        result = CliRunner().invoke(main, ["bench", str(model), "--out", str(target)])
        assert "lies inside the MODEL" in one_line_error(result)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    result = CliRunner().invoke(main, ["bench", "--arch", "wan2.1-t2v-1.3b", "--out", str(notes)])
    assert "not a report this command wrote" in one_line_error(result)
    assert snapshot(model) == before and notes.read_text() == '{"mine": true}'
