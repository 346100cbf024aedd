"""eval: metrics against closed forms and a brute-force SSIM, pipelines against themselves and perturbed copies."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import nabla_convert.reference as nabla_reference
from nabla_convert import NablaConfig, apply_nabla, convert, layer_densities
from nabla_convert.cli import main
from nabla_convert.convert import load_pipeline
from nabla_convert.errors import InputFileError
from nabla_convert.eval.metrics import psnr, ssim
from nabla_convert.eval.run import load_held_out, load_prompts, run_eval
from nabla_convert.eval.sampling import EvalError, EvalSettings, evaluate, flow_matching_loss
from nabla_convert.models.tiny import tiny_wan_pipeline

TINY = EvalSettings(steps=2, height=32, width=32, frames=5, preview_samples=2, preview_frames=3)
PROMPTS = ["a red ball moves left", "a blue cube rotates"]


def brute_force_ssim(x: np.ndarray, y: np.ndarray, data_range: float, size: int, sigma: float = 1.5) -> float:
    """SSIM by definition: for every valid window position, gaussian-weighted moments of both images."""
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    weights = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for image_x, image_y in zip(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]), strict=True):
        for i in range(image_x.shape[0] - size + 1):
            for j in range(image_x.shape[1] - size + 1):
                px, py = image_x[i : i + size, j : j + size], image_y[i : i + size, j : j + size]
                mx, my = (weights * px).sum(), (weights * py).sum()
                vx, vy = (weights * (px - mx) ** 2).sum(), (weights * (py - my) ** 2).sum()
                cov = (weights * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize(("shape", "window"), [((2, 3, 17, 14), 11), ((3, 2, 4, 6), 3), ((1, 1, 5, 5), 5)])
def test_ssim_matches_brute_force_definition(shape, window):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=generator)
    y = (x + 0.2 * torch.randn(shape, generator=generator)).clamp(0, 1)
    expected = brute_force_ssim(x.numpy().astype(np.float64), y.numpy().astype(np.float64), 1.0, window)
    assert ssim(x, y, 1.0) == pytest.approx(expected, rel=1e-9)


def test_ssim_known_values():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert ssim(x, x, 1.0) == 1.0
    # constant images: no variance, SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.7, 0.01**2
    constant_a, constant_b = (torch.full((1, 1, 12, 12), v, dtype=torch.float64) for v in (a, b))
    assert ssim(constant_a, constant_b, 1.0) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # SSIM does not depend on units: scaling both images and the data range changes nothing
    y = x.flip(-1)
    assert ssim(3 * x, 3 * y, 3.0) == pytest.approx(ssim(x, y, 1.0), rel=1e-9)
    assert ssim(x, y, 1.0) < 0.5


def test_psnr_known_values():
    zeros = torch.zeros(3, 8, 8)
    assert psnr(zeros, zeros, 1.0) == math.inf
    assert psnr(zeros, torch.full_like(zeros, 0.1), 1.0) == pytest.approx(20.0)
    assert psnr(zeros, torch.full_like(zeros, 0.1), 2.0) == pytest.approx(20.0 + 20 * math.log10(2))


def load_pair(path):
    return load_pipeline(path, device="cpu"), load_pipeline(path, device="cpu")


def perturb(pipe, eps: float, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            parameter.add_(eps * torch.randn(parameter.shape, generator=generator))


def test_identical_pipelines_give_infinite_psnr_and_equal_loss(tiny_pipeline_dir):
    pipe_a, pipe_b = load_pair(tiny_pipeline_dir)
    result = evaluate(pipe_a, pipe_b, PROMPTS[:1], seeds=(0, 1), settings=TINY, progress=False)
    assert len(result.samples) == 2
    for sample in result.samples:
        assert sample.latent_psnr == sample.pixel_psnr == math.inf
        assert sample.latent_ssim == pytest.approx(1.0, abs=1e-12)
        assert sample.pixel_ssim == pytest.approx(1.0, abs=1e-12)
    assert result.loss_a == result.loss_b
    assert all(math.isfinite(loss) and loss > 0 for loss in result.loss_a)
    assert result.densities == []


def test_perturbed_transformer_psnr_falls_with_perturbation(tiny_pipeline_dir):
    pipe_a = load_pipeline(tiny_pipeline_dir, device="cpu")
    summaries, latent_psnr = [], []
    for eps in (1e-4, 1e-3, 1e-2):
        pipe_b = load_pipeline(tiny_pipeline_dir, device="cpu")
        perturb(pipe_b, eps)
        result = evaluate(pipe_a, pipe_b, PROMPTS[:1], seeds=(0, 1), settings=TINY, progress=False)
        summaries.append(result.summary())
        latent_psnr.append([s.latent_psnr for s in result.samples])
        assert all(math.isfinite(s.latent_psnr) and math.isfinite(s.pixel_psnr) for s in result.samples)
        assert result.loss_a != result.loss_b
    # first-order regime: the output error grows like eps, so PSNR drops about 20 dB per decade
    for smaller, larger in itertools.pairwise(latent_psnr):
        for before, after in zip(smaller, larger, strict=True):
            assert 17.0 < before - after < 23.0
    for key in ("latent_psnr_mean", "latent_ssim_mean", "pixel_psnr_mean"):
        values = [s[key] for s in summaries]
        assert values == sorted(values, reverse=True) and len(set(values)) == len(values), (key, values)
    loss_gaps = [abs(s["loss_b_minus_a"]) for s in summaries]
    assert loss_gaps == sorted(loss_gaps) and loss_gaps[0] > 0
    assert all(s["loss_a"] == summaries[0]["loss_a"] for s in summaries)


class VelocityOracle(torch.nn.Module):
    """Predicts the exact flow-matching velocity (x_t - x0) / s for a known x0, reading s from the timestep."""

    dtype = torch.float32  # what pipelines read from a diffusers model
    device = torch.device("cpu")

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        sigma = timestep.reshape(-1, 1, 1, 1, 1).double() / 1000
        return (((hidden_states.double() - self.x0.double()) / sigma).float(),)


def test_loss_convention_against_a_velocity_oracle(tiny_pipeline_dir):
    """Zero loss only if x_t = (1 - s) x0 + s noise, target = noise - x0 and timestep = 1000 s all hold."""
    pipe = load_pipeline(tiny_pipeline_dir, device="cpu")
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    dense_loss = flow_matching_loss(pipe, x0, PROMPTS[0], seed=0, steps=4)
    pipe.transformer = VelocityOracle(x0[None])
    assert dense_loss > 0.1
    assert flow_matching_loss(pipe, x0, PROMPTS[0], seed=0, steps=4) < 1e-10


def test_loss_follows_the_sampler_step_schedule():
    """Loss passes run high noise first, one step each, so dense_steps=1 of 2 makes exactly the first pass dense."""
    pipe = tiny_wan_pipeline()
    x0 = torch.randn(16, 2, 32, 32, generator=torch.Generator().manual_seed(4))  # 4 tiles of 8x8 tokens per frame
    densities = {}
    for dense_steps in (0, 1):
        apply_nabla(pipe.transformer, NablaConfig(threshold=0.3, dense_steps=dense_steps))
        flow_matching_loss(pipe, x0, PROMPTS[0], seed=0, steps=2)
        densities[dense_steps] = layer_densities(pipe.transformer)
    for layer, sparse in densities[0].items():
        assert sparse < 0.9
        assert densities[1][layer] == pytest.approx((1.0 + sparse) / 2, abs=1e-6)


def test_held_out_latent_file(tiny_pipeline_dir, tmp_path):
    latents = torch.randn(3, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "held_out.safetensors"
    save_file({"latents": latents}, path, metadata={"prompts": json.dumps(["a red ball", "a cube", "the sky"])})
    held_out = load_held_out(path)
    assert held_out.prompts == ["a red ball", "a cube", "the sky"]
    torch.testing.assert_close(torch.stack(held_out.latents), latents, atol=0, rtol=0)

    pipe_a, pipe_b = load_pair(tiny_pipeline_dir)
    perturb(pipe_b, 1e-2)
    result = evaluate(pipe_a, pipe_b, PROMPTS[:1], settings=TINY, held_out=held_out, progress=False)
    assert len(result.loss_a) == 3 and result.summary()["held_out"] == "held_out.safetensors"
    # the loss is seeded per held-out sample: the same numbers again, independent of the samples drawn
    again = evaluate(pipe_a, pipe_b, PROMPTS[1:], seeds=(5,), settings=TINY, held_out=held_out, progress=False)
    assert again.loss_a == result.loss_a and again.loss_b == result.loss_b
    assert result.loss_a != result.loss_b

    save_file({"latents": latents}, tmp_path / "no_prompts.safetensors")
    with pytest.raises(EvalError, match="prompts"):
        load_held_out(tmp_path / "no_prompts.safetensors")


def test_densities_of_a_nabla_pipeline(tiny_pipeline_dir, tmp_path):
    nabla_dir = convert(tiny_pipeline_dir, tmp_path / "nabla", NablaConfig(threshold=0.3, dense_layers=(0,)))
    settings = EvalSettings(steps=2, height=256, width=256, frames=5, preview_samples=1)
    result = run_eval(
        tiny_pipeline_dir, nabla_dir, tmp_path / "out", prompts_file=prompts_file(tmp_path), settings=settings,
        max_samples=1, device="cpu", progress=False,
    )  # fmt: skip
    rows = {(row["pipeline"], row["layer"]): row for row in result.densities}
    assert set(rows) == {("b", 0), ("b", 1)}  # the dense model A has no density rows
    assert rows["b", 0]["dense"] and rows["b", 0]["density"] == 1.0
    assert rows["b", 1]["threshold"] == 0.3 and 0.0 < rows["b", 1]["density"] < 1.0
    assert result.summary()["density_b"] == pytest.approx((1.0 + rows["b", 1]["density"]) / 2)
    assert "density_a" not in result.summary()
    assert math.isfinite(result.samples[0].latent_psnr)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Block density per layer" in report and "| B | transformer | 1 |" in report


def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def test_cli_writes_report_json_and_decodable_images(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    args = [str(tiny_pipeline_dir), str(tiny_pipeline_dir), "--out", str(out), "--prompts", str(prompts_file(tmp_path))]
    args += ["--seeds", "0,1", "--max-samples", "3", "--steps", "2", "--height", "32", "--width", "32", "--frames", "5"]
    outcome = CliRunner().invoke(main, ["eval", *args, "--device", "cpu"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads((out / "eval.json").read_text())  # strict JSON: infinities are strings
    assert report["summary"]["samples"] == 3 and report["summary"]["pixel_psnr_mean"] == "inf"
    assert report["summary"]["loss_a"] == report["summary"]["loss_b"]
    assert [(row["prompt"], row["seed"]) for row in report["samples"]] == [
        (PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0)
    ]  # fmt: skip
    assert len(report["held_out"]) == 3
    markdown = (out / "report.md").read_text()
    assert "| latent_psnr_mean | inf |" in markdown and "![A | B | |A-B|](grid.png)" in markdown
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width > 100 and grid.height > 100
        grid.load()
    with Image.open(out / "samples.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 5
        assert gif.size == (3 * 32, 3 * 32)  # A | B | |A-B| side by side, one row per preview sample
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize(
    ("which", "message"), [("missing", "model folder not found"), ("empty", "not a diffusers pipeline folder")]
)
def test_cli_bad_model_is_one_line_error(tiny_pipeline_dir, tmp_path, which, message):
    (tmp_path / "empty").mkdir()
    args = [str(tiny_pipeline_dir), str(tmp_path / which), "--out", str(tmp_path / "out")]
    outcome = CliRunner().invoke(main, ["eval", *args, "--prompts", str(prompts_file(tmp_path))])
    assert outcome.exit_code != 0
    assert outcome.output.startswith("Error:") and outcome.output.strip().count("\n") == 0
    assert message in outcome.output and which in outcome.output
    assert not (tmp_path / "out").exists()


def test_prompt_files(tmp_path):
    assert load_prompts(prompts_file(tmp_path)) == PROMPTS  # blank lines skipped
    bundled = Path(nabla_reference.__file__).parent / "prompts_heldout.txt"
    assert load_prompts() == [line.strip() for line in bundled.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"\n \n\t\n", "has no prompts"),
        ("caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
        ("a red ball\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
        (b"a red ball\x00\n", "NUL bytes"),
        (b"a red\x1b[31m ball\n", "control characters"),
    ],
)
def test_bad_prompt_files_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputFileError, match=re.escape(message)):
        load_prompts(path)
    with pytest.raises(InputFileError, match="is not a file"):
        load_prompts(tmp_path)
    path.write_bytes("\ufeffa red ball\n".encode())  # a UTF-8 byte-order mark is fine
    assert load_prompts(path) == ["a red ball"]


def test_evaluate_needs_samples(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir, device="cpu")
    with pytest.raises(EvalError, match="nothing to evaluate"):
        evaluate(pipe, pipe, [], settings=TINY)
