"""Calibrate v2 on the reference model: measured quality of searched settings on held-out prompts and seeds.

Two stages (docs/quality.md, "Calibration v2"):

    python scripts/calibration_quality.py --stats out/cs/cal/stats.safetensors --out out/cs run [--only NAME ...]
    python scripts/calibration_quality.py --stats out/cs/cal/stats.safetensors --out out/cs report

`run` builds every setting of `settings()` (public presets, single thresholds, scaled STA windows, and the
calibrate searches, v1 per layer and v2 per head + windows + dense steps, at the 0.7 preset's density and at half
of it) from the calibration stats, applies it to the reference transformer in place, and measures what eval
measures against the dense model: latent and pixel PSNR of held-out prompts sampled with seeds calibration never
used, the flow-matching loss on held-out clips, and the block density over the sampling runs (dense steps count
1.0). Results are kept in OUT/quality.json (a rerun measures only what is missing).

`report` prints the table and the rank correlations (Spearman) between what calibrate predicts from its stats
(proxies computed by `nabla_convert.calibrate.search.predict`) and the measured latent PSNR and held-out loss.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import WanPipeline
from quality_report import heldout_latents
from scipy.stats import spearmanr

from nabla_convert import NablaConfig
from nabla_convert.calibrate import Stats, Target, search
from nabla_convert.calibrate.search import predict
from nabla_convert.eval.metrics import compare_latents, compare_videos
from nabla_convert.eval.run import load_held_out
from nabla_convert.eval.sampling import EvalSettings, generate, held_out_losses
from nabla_convert.io import atomic_write_text, markdown_table
from nabla_convert.models.nabla import apply_nabla, layer_densities, remove_nabla, reset_densities
from nabla_convert.recipes import load_recipe
from nabla_convert.reference import REFERENCE_PIPELINE, heldout_prompts

PRESET_DENSITY = 0.171  # the 0.7 preset's measured density on the reference model (docs/quality.md)
SEED = 1  # calibration ran seed 0 on training prompts; held-out prompts are sampled with this seed


def searched(stats: Stats, density: float, **options) -> NablaConfig:
    return search(stats, Target("density", density), **options)["transformer"].config


def settings(stats: Stats) -> dict[str, Callable[[], NablaConfig]]:
    half = PRESET_DENSITY / 2
    no_window = {"windows": (None,)}
    return {
        "nabla 0.7 (public preset)": lambda: load_recipe("wan2.1-t2v-14b-720p-nabla0.7").nabla,
        "threshold 0.9": lambda: NablaConfig(threshold=0.9),
        "threshold 0.5": lambda: NablaConfig(threshold=0.5),
        "threshold 0.4": lambda: NablaConfig(threshold=0.4),
        "threshold 0.3": lambda: NablaConfig(threshold=0.3),
        "threshold 0.5 + STA 3-1-1 (scaled)": lambda: NablaConfig(threshold=0.5, sta=(3, 1, 1)),
        "v1 per layer, density 0.171": lambda: searched(stats, PRESET_DENSITY, **no_window),
        "v1 per layer, density 0.0855": lambda: searched(stats, half, **no_window),
        "per head, no STA, density 0.0855": lambda: searched(stats, half, per_head=True, **no_window),
        "v2, density 0.171": lambda: searched(stats, PRESET_DENSITY, per_head=True, dense_step_options=(0, 1, 2)),
        "v2, density 0.0855": lambda: searched(stats, half, per_head=True, dense_step_options=(0, 1, 2)),
    }


def run(args: argparse.Namespace, stats: Stats) -> None:
    torch.set_num_threads(1)  # the shared 2-core CPU: one thread per process runs 5x faster than two under load
    results_file = args.out / "quality.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    pipe = WanPipeline.from_pretrained(REFERENCE_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    eval_settings = EvalSettings()
    prompts = heldout_prompts()[: args.samples]
    held_out = load_held_out(heldout_latents(args.out, args.heldout_clips))
    dense_file = args.out / "dense.pt"
    if not dense_file.is_file():
        dense = [generate(pipe, prompt, SEED, eval_settings) for prompt in prompts]
        loss = held_out_losses(pipe, held_out, eval_settings, "dense", progress=False)
        torch.save({"samples": dense, "loss": loss}, dense_file)
    reference = torch.load(dense_file)
    wanted = settings(stats)
    for name in args.only or wanted:
        if name in results:
            continue
        config = wanted[name]()
        apply_nabla(pipe.transformer, config)
        reset_densities(pipe.transformer)
        metrics = []
        for prompt, (latent_a, video_a) in zip(prompts, reference["samples"], strict=True):
            latent_b, video_b = generate(pipe, prompt, SEED, eval_settings)
            metrics.append([*compare_latents(latent_a, latent_b), *compare_videos(video_a, video_b)])
        density = float(np.mean(list(layer_densities(pipe.transformer).values())))
        loss = held_out_losses(pipe, held_out, eval_settings, name, progress=False)
        remove_nabla(pipe.transformer)
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        results[name] = {
            "config": config.to_dict(),
            "density": density,
            "latent_psnr": float(np.mean([m[0] for m in metrics])),
            "pixel_psnr": float(np.mean([m[2] for m in metrics])),
            "pixel_ssim": float(np.mean([m[3] for m in metrics])),
            "loss": float(np.mean(loss)),
            "loss_dense": float(np.mean(reference["loss"])),
        }
        atomic_write_text(results_file, json.dumps(results, indent=1))
        print(name, results[name]["density"], results[name]["latent_psnr"], results[name]["loss"], flush=True)


def report(args: argparse.Namespace, stats: Stats) -> None:
    results = json.loads((args.out / "quality.json").read_text())
    comp = stats.components["transformer"]
    rows, predicted = [], {}
    for name, r in results.items():
        config = NablaConfig.from_dict(r["config"])
        predicted[name] = predict(comp, stats.candidates, config, steps=stats.meta["plan"]["steps"])
        p = predicted[name]
        rows.append(
            [
                name,
                f"{r['density']:.3f}",
                f"{p['density']:.3f}",
                f"{r['latent_psnr']:.2f}",
                f"{r['pixel_psnr']:.2f}",
                f"{r['loss']:.4f}",
                f"{p['mean_error']:.4f}",
                f"{p['step_weighted_error']:.4f}",
            ]
        )
    header = ["setting", "density", "predicted", "latent PSNR dB", "pixel PSNR dB", "held-out loss"]
    print(markdown_table([*header, "mean layer error", "step-weighted error"], rows))
    names = list(results)
    psnr = np.array([results[n]["latent_psnr"] for n in names])
    loss = np.array([results[n]["loss"] for n in names])
    corr_rows = []
    for proxy in next(iter(predicted.values())):
        if proxy == "density":
            continue
        values = np.array([predicted[n][proxy] for n in names])
        corr_rows.append(
            [proxy, f"{spearmanr(-values, psnr).statistic:.3f}", f"{spearmanr(values, loss).statistic:.3f}"]
        )
    print(f"\nSpearman over {len(names)} settings (a proxy that ranks like eval gives +1 in both columns):")
    print(markdown_table(["proxy", "rho(-proxy, latent PSNR)", "rho(proxy, held-out loss)"], corr_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["run", "report"])
    parser.add_argument("--stats", type=Path, required=True, help="stats.safetensors of the calibration run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=1, help="held-out prompts sampled per setting (seed 1)")
    parser.add_argument("--heldout-clips", type=int, default=2, help="held-out clips for the loss")
    parser.add_argument("--only", action="append", help="measure only these settings (repeatable)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stats = Stats.load(args.stats)
    run(args, stats) if args.stage == "run" else report(args, stats)


if __name__ == "__main__":
    main()
