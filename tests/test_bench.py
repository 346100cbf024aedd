"""`nabla-convert bench` on a machine without a GPU: the one-line refusal, argument checks, report arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from nabla_convert.bench.cli import _model_config
from nabla_convert.bench.measure import AttentionRow, StepRow, parse_resolution
from nabla_convert.bench.report import BenchReport
from nabla_convert.cli import main
from nabla_convert.config import NablaConfig
from nabla_convert.models import family_for_arch

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")


def invoke(*args: str):
    return CliRunner().invoke(main, ["bench", *args])


@needs_no_gpu
@pytest.mark.parametrize(
    ("arch", "resolution", "frames"),
    [
        ("wan2.1-t2v-14b", "1280x720", "81"),
        ("kandinsky5-t2v-lite", "768x512", "121"),
        ("kandinsky5-t2v-pro", "1024x768", "121"),
    ],
)
def test_no_gpu_is_one_clear_line_and_nonzero_exit(tmp_path, arch, resolution, frames) -> None:
    """The arguments (Wan, and Kandinsky 5 Lite / Pro shapes) are accepted; only the missing GPU stops the run."""
    result = invoke(
        "--arch",
        arch,
        "--resolution",
        resolution,
        "--frames",
        frames,
        "--density",
        "0.1",
        "-o",
        str(tmp_path / "b.json"),
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: nabla-convert bench needs a CUDA GPU and this machine has none (torch sees no CUDA)"
    ]
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "either MODEL or --arch"),
        (("--arch", "wan9-xl"), "unknown preset"),
        (("--arch", "wan2.1-t2v-1.3b", "--resolution", "832x481"), "multiples of 16"),
        (("--arch", "wan2.1-t2v-1.3b", "--resolution", "wide"), "width x height"),
        (("--arch", "wan2.1-t2v-1.3b", "--frames", "80"), "4k+1"),
        (("--arch", "wan2.1-t2v-1.3b", "--density", "1.5"), "(0, 1]"),
        (("--arch", "wan2.1-t2v-1.3b", "--density", "0.1", "--threshold", "0.7"), "cannot be combined"),
        (("--arch", "wan2.1-t2v-1.3b", "--threshold", "1.7"), "threshold"),
        (("--arch", "wan2.1-t2v-1.3b", "--sta", "11,3"), "STA window"),
        (("--arch", "wan2.1-t2v-1.3b", "--recipe", "no-such-recipe"), "recipe not found"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_token_grid_of_wan_resolutions() -> None:
    token_grid = family_for_arch("wan2.1-t2v-14b").token_grid
    assert parse_resolution("1280x720") == (1280, 720)
    assert token_grid((1280, 720), 81) == (21, 45, 80)
    assert token_grid((1280, 640), 81) == (21, 40, 80)
    assert token_grid((832, 480), 81) == (21, 30, 52)


def test_model_folder_gives_architecture_and_nabla_settings(tmp_path) -> None:
    nabla = NablaConfig(threshold=0.6, sta=(11, 3, 3), q_block=128)
    (tmp_path / "transformer").mkdir()
    config = {"_class_name": "NablaWanTransformer3DModel", "num_attention_heads": 12, "num_layers": 30}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({**config, "_nabla": nabla.to_dict()}))
    family, architecture, settings = _model_config(tmp_path)
    assert family is family_for_arch("wan2.1-t2v-1.3b")
    assert architecture == {"num_attention_heads": 12, "num_layers": 30}
    assert settings == nabla


def test_report_arithmetic_and_json(tmp_path) -> None:
    attention = AttentionRow(67200, 67200, 40, 128, 64, 0.1, 2.0, 7.0, 20.0, 146.0, "cudnn", 2.0)
    step = StepRow("wan2.1-t2v-14b", 4, 67200, 67200, 0.1, None, None, 980.0, 490.0, 10.0, 11.0, 1.5)
    report = BenchReport({"card": "H100", "torch": "2.11", "date": "2026-11-27"}, {}, [attention], [step])
    assert attention.speedup == pytest.approx(6.6364, abs=1e-4)  # 146 ms dense / (2 ms mask + 20 ms sparse)
    assert attention.target_ms == pytest.approx(18.98)  # 1.3 x density 0.1 x 146 ms
    data = json.loads(report.write(tmp_path / "bench.json").read_text())
    assert data["summary"]["step_speedup_d0.1"] == 2.0
    assert data["summary"]["mask_ms"] == 2.0
    assert data["attention"][0]["speedup"] == pytest.approx(6.6364, abs=1e-4)
    assert "| 2.00 (7.0) | 20.00 | 18.98 | 146.00 (cudnn) | 6.64x |" in report.table()
    assert "| wan2.1-t2v-14b (4) | 67,200 (67,200) | eager | 0.1 | 980.0 | 490.0 | 2.00x |" in report.table()
    compiled = StepRow("wan2.1-t2v-14b", 40, 75600, 80640, None, 0.1, 0.094, 9000.0, 3000.0, 35.0, 36.0, 40.0, True, 0)
    report.steps.append(compiled)
    assert report.summary()["step_speedup_thr0.1_compiled"] == 3.0
    assert "| compiled (0 graph breaks) | thr 0.1 -> 0.094 | 9000.0 | 3000.0 | 3.00x |" in report.table()


def test_forced_density_holds_one_selection_for_all_layers() -> None:
    """The forced path keeps one random selection per shape alive, as the real path does, not one per layer."""
    from nabla_convert.bench.measure import ForcedDensityProcessor, ForcedSelections
    from nabla_convert.models.nabla import apply_nabla, layer_densities
    from nabla_convert.models.tiny import tiny_transformer

    torch.manual_seed(0)
    model = apply_nabla(tiny_transformer(num_layers=3).eval(), NablaConfig(threshold=0.5, q_block=128, kv_block=64))
    forced = ForcedSelections()
    for block in model.blocks:
        block.attn1.set_processor(ForcedDensityProcessor(block.attn1.processor, 0.25, forced))
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 32, 32), torch.tensor([500]), torch.randn(1, 8, 32), return_dict=False)
    assert len(forced.cache) == 1
    (selection,) = forced.cache.values()
    assert selection.keep.float().mean() == pytest.approx(0.25, abs=0.05)
    assert list(layer_densities(model).values()) == pytest.approx([float(selection.keep.float().mean())] * 3)
