"""The generated model card states what the folder's files say, and nothing they do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from nabla_convert import NablaConfig, convert
from nabla_convert.config import LayerSettings
from nabla_convert.errors import InvalidCheckpointError
from nabla_convert.hub import check_checkpoint, generate_card, prepare_push
from nabla_convert.models.tiny import tiny_wan_pipeline

REPO = "alice/wan-nabla"
CALIBRATION = {
    "summary": {"mean_density": 0.1234, "mean_error": 0.0456, "prompts": 8},
    "layers": [
        {"layer": 0, "threshold": 0.6, "density": 0.2, "error": 0.01},
        {"layer": 1, "threshold": 0.4, "density": 0.05, "error": 0.03},
    ],
}
EVAL = {"summary": {"psnr_db": 27.31, "ssim": 0.912}}
BENCH = {"summary": {"card": "NVIDIA H100 80GB", "speedup": 2.39}}
ADAPTED_PROVENANCE = {
    "base_model": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "base_revision": "0123abc",
    "base_license": "apache-2.0",
    "calibration": {"prompts": 8, "target_density": 0.1},
    "adaptation": {"steps": 200, "loss": 0.0123, "lora_rank": 16},
}


def set_provenance(folder: Path, subfolder: str, entries: dict) -> None:
    path = folder / subfolder / "config.json"
    config = json.loads(path.read_text())
    config["_nabla"]["provenance"].update(entries)
    path.write_text(json.dumps(config))


def write_reports(folder: Path, **reports: dict) -> None:
    (folder / "nabla_reports").mkdir()
    for name, report in reports.items():
        (folder / "nabla_reports" / f"{name}.json").write_text(json.dumps(report))


def table_rows(text: str) -> set[tuple[str, ...]]:
    """Every markdown table row as a tuple of stripped cells."""
    return {
        tuple(c.strip() for c in line.strip().strip("|").split("|"))
        for line in text.splitlines()
        if line.startswith("|")
    }


@pytest.fixture
def calibrated_and_adapted(tiny_pipeline_dir, tmp_path) -> Path:
    config = NablaConfig(threshold=0.6, sta=(3, 3, 3), dense_layers=(0,), layers={1: LayerSettings(threshold=0.4)})
    out = convert(tiny_pipeline_dir, tmp_path / "nabla", config)
    set_provenance(out, "transformer", ADAPTED_PROVENANCE)
    write_reports(out, calibration=CALIBRATION, eval=EVAL, bench=BENCH)
    return out


def test_card_of_calibrated_and_adapted_model_shows_its_numbers(calibrated_and_adapted):
    text = generate_card(check_checkpoint(calibrated_and_adapted), REPO)
    metadata = ModelCard(text).data.to_dict()

    assert metadata["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert metadata["base_model_relation"] == "finetune"
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-video"
    assert {"nabla", "sparse-attention"} <= set(metadata["tags"])
    rows = table_rows(text)
    # per layer, from the config: layer 0 listed dense, layer 1 overridden (its own threshold, no STA)
    assert ("0", "dense", "-", "-") in rows and ("1", "NABLA", "0.4", "none") in rows
    assert ("default STA window (T, H, W tiles)", "3-3-3") in rows
    # reports, as written in nabla_reports/
    for name, value in {**CALIBRATION["summary"], **EVAL["summary"], **BENCH["summary"]}.items():
        assert (name, str(value)) in rows
    for layer in CALIBRATION["layers"]:
        assert tuple(str(v) for v in layer.values()) in rows
    # provenance, flattened
    assert ("adaptation.loss", "0.0123") in rows and ("adaptation.lora_rank", "16") in rows
    assert ("calibration.target_density", "0.1") in rows and ("base_revision", "0123abc") in rows
    assert f'pipe = WanPipeline.from_pretrained("{REPO}")' in text
    assert text == generate_card(check_checkpoint(calibrated_and_adapted), REPO)  # deterministic: re-push is a no-op


def test_card_of_plain_conversion_claims_nothing_it_does_not_know(tiny_pipeline_dir, tmp_path):
    out = convert(tiny_pipeline_dir, tmp_path / "nabla", NablaConfig(threshold=0.7))
    text = generate_card(check_checkpoint(out), REPO)
    metadata = ModelCard(text).data.to_dict()

    assert "base_model" not in metadata  # the base is a local folder, not a Hub id
    assert "base_model_relation" not in metadata and "license" not in metadata
    assert "ships no calibration, evaluation or benchmark reports" in text
    assert ("base_model", tiny_pipeline_dir.name) in table_rows(text)  # the folder name, never the local path
    assert str(tiny_pipeline_dir.parent) not in text
    assert "fine-tuned" not in text


def test_two_transformers_get_one_table_each(tmp_path):
    tiny_wan_pipeline(two_transformers=True).save_pretrained(tmp_path / "a14b")
    per_head = {0: LayerSettings(threshold=(0.25, 0.5))}
    configs = {"transformer": NablaConfig(threshold=0.3), "transformer_2": NablaConfig(threshold=0.9, layers=per_head)}
    out = convert(tmp_path / "a14b", tmp_path / "nabla", configs)
    text = generate_card(check_checkpoint(out), REPO)

    high, low = text.split("### transformer_2")
    assert "### transformer\n" in high and ("1", "NABLA", "0.3", "none") in table_rows(
        high.split("### transformer\n")[1]
    )
    assert ("1", "NABLA", "0.9", "none") in table_rows(low.split("## Measurements")[0])
    assert ("0", "NABLA", "0.25 0.5", "none") in table_rows(low.split("## Measurements")[0])


def test_folder_card_is_kept_unless_regenerated_and_must_parse(calibrated_and_adapted):
    (calibrated_and_adapted / "README.md").write_text("---\nlicense: mit\n---\n\nHand written.\n")
    kept = prepare_push(calibrated_and_adapted, REPO)
    assert not kept.card_is_new and kept.card.endswith("Hand written.\n")
    regenerated = prepare_push(calibrated_and_adapted, REPO, regenerate_card=True)
    assert regenerated.card_is_new and "| psnr_db | 27.31 |" in regenerated.card

    (calibrated_and_adapted / "README.md").write_text("---\nlicense: [mit\n---\n\nBroken.\n")
    with pytest.raises(InvalidCheckpointError, match=r"README\.md has invalid metadata"):
        prepare_push(calibrated_and_adapted, REPO)


def test_checkpoint_with_per_head_thresholds_for_another_head_count_is_refused(tiny_pipeline_dir, tmp_path):
    out = convert(tiny_pipeline_dir, tmp_path / "nabla", NablaConfig(layers={1: LayerSettings(threshold=(0.3, 0.6))}))
    config_file = out / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["_nabla"]["layers"]["1"]["threshold"] = [0.3, 0.6, 0.9]
    config_file.write_text(json.dumps(config))
    with pytest.raises(InvalidCheckpointError, match="layer 1 has 3 per-head thresholds, the model has 2 heads"):
        check_checkpoint(out)
