"""The end-to-end path of a tiny pipeline folder that the family tests share: calibrate -> convert -> adapt (2 LoRA
steps on teacher rollouts) -> push --dry-run -> eval against the dense pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

from click.testing import CliRunner

from nabla_convert import convert
from nabla_convert.adapt import AdaptSettings, adapt
from nabla_convert.calibrate import calibrate
from nabla_convert.cli import main
from nabla_convert.convert import transformer_components
from nabla_convert.eval.run import run_eval
from nabla_convert.eval.sampling import EvalSettings

SHAPE = dict(height=128, width=176, frames=5)  # token grid 2 x 8 x 11: padded
PROMPTS = ["a red ball moves left", "a blue cube"]


def calibrate_convert_adapt_push_and_eval(
    dense: Path, tmp_path: Path, *, calibrate_guidance: float, eval_guidance: float, repo_id: str
) -> Path:
    """Runs the stages on the dense pipeline folder `dense`, asserting each one's output, and returns the adapted
    folder. eval runs last, after what the stages wrote: it compares the adapted pipeline with `dense`."""
    calibration = calibrate(
        dense, tmp_path / "cal", prompts=PROMPTS, steps=2, sample_steps=2, guidance=calibrate_guidance,
        target_density=0.5, device="cpu", progress=False, **SHAPE,
    )  # fmt: skip
    converted = convert(dense, tmp_path / "nabla", calibration.config())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{prompt}\n" for prompt in PROMPTS))
    family = next(iter(transformer_components(dense).values()))[1]
    latent_shape = family.token_grid((SHAPE["width"], SHAPE["height"]), SHAPE["frames"], patch=(1, 1, 1))
    plan = dict(latent_shape=latent_shape, rollout_steps=2, text_length=16, validation_samples=1, lora_rank=4)
    out = adapt(converted, tmp_path / "adapted", AdaptSettings(steps=2, prompts=str(prompts), **plan), progress=False)
    report = json.loads((out / "nabla_reports" / "adapt.json").read_text())
    assert report["summary"]["steps"] == 2 and (out / "lora").is_dir()
    result = CliRunner().invoke(main, ["push", str(out), "--repo-id", repo_id, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "pipeline_tag: text-to-video" in result.output
    settings = EvalSettings(steps=2, guidance=eval_guidance, preview_samples=1, **SHAPE)
    result = run_eval(
        dense, out, tmp_path / "eval", prompts_file=prompts, settings=settings, device="cpu", progress=False
    )
    summary = result.summary()
    assert summary["samples"] == 2 and math.isfinite(summary["latent_psnr_mean"])
    assert summary["loss_a"] > 0 and summary["loss_b"] > 0 and 0 < summary["density_b"] < 0.9
    assert (tmp_path / "eval" / "report.md").is_file()
    return out
