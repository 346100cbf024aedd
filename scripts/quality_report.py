"""Quality of NABLA settings on the embedded reference model, against the dense model (docs/quality.md).

For each setting: convert the reference pipeline, run `nabla-convert eval` against the dense one on held-out
prompts and seeds, and compute both transformers' flow-matching loss on latents of the held-out clips (rendered by
the scene generator, encoded by the model's VAE). Runs on CPU in minutes; results land in OUT/results.json and a
markdown table on stdout.

    python scripts/quality_report.py --out out/quality [--samples 3] [--extra NAME=CONVERTED_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import WanPipeline
from safetensors.torch import save_file

from nabla_convert import NablaConfig, convert
from nabla_convert.calibrate import calibrate
from nabla_convert.config import load_config_file
from nabla_convert.eval.run import run_eval
from nabla_convert.io import atomic_write, atomic_write_text, markdown_table
from nabla_convert.recipes import load_recipe
from nabla_convert.reference import (
    HEIGHT,
    NUM_FRAMES,
    PROMPTS_TRAIN,
    RECOMMENDED_GUIDANCE,
    RECOMMENDED_STEPS,
    REFERENCE_PIPELINE,
    WIDTH,
    heldout_prompts,
    heldout_videos,
)
from nabla_convert.reference.flow import normalise_latents

SETTINGS = {
    "nabla 0.7 (public preset)": lambda: load_recipe("wan2.1-t2v-14b-720p-nabla0.7").nabla,
    "nabla 0.6 + STA 11-3-3 (public preset)": lambda: load_recipe("wan2.1-t2v-14b-720p-nabla0.6-sta11-3-3").nabla,
    "nabla 0.5 + STA 11-5-5 (public preset)": lambda: load_recipe("wan2.1-t2v-14b-720p-nabla0.5-sta11-5-5").nabla,
    "nabla 0.5 + STA 3-1-1 (window scaled to the 9x2x2 grid)": lambda: NablaConfig(threshold=0.5, sta=(3, 1, 1)),
    "nabla 0.3 (aggressive)": lambda: NablaConfig(threshold=0.3),
}


def heldout_latents(out: Path, count: int) -> Path:
    path = out / "heldout_latents.safetensors"
    if not path.is_file():
        vae = WanPipeline.from_pretrained(REFERENCE_PIPELINE).vae
        prompts, videos = heldout_videos(count)
        with torch.no_grad():
            latents = torch.cat([normalise_latents(vae, video[None]) for video in videos])
        tensors, metadata = {"latents": latents.contiguous()}, {"prompts": json.dumps(prompts)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=3, help="held-out prompts sampled per setting (seed 0)")
    parser.add_argument("--heldout-clips", type=int, default=8, help="held-out clips for the loss")
    parser.add_argument("--calibrate-density", type=float, default=0.5, help="target of the calibrated setting")
    parser.add_argument("--extra", action="append", default=[], help="NAME=DIR: an already converted folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    latents = heldout_latents(args.out, args.heldout_clips)
    prompts_file = args.out / "prompts.txt"
    prompts_file.write_text("\n".join(heldout_prompts()[: args.samples]) + "\n")

    calibrated = args.out / "calibration" / "nabla_config.json"
    if not calibrated.is_file():  # calibrate once; later runs reuse it
        calibrate(
            REFERENCE_PIPELINE,
            calibrated.parent,
            prompts=PROMPTS_TRAIN.read_text().splitlines()[:4],
            target_density=args.calibrate_density,
            height=HEIGHT,
            width=WIDTH,
            frames=NUM_FRAMES,
            steps=RECOMMENDED_STEPS,
            guidance=RECOMMENDED_GUIDANCE,
            sample_steps=4,
        )
    settings = {name: make() for name, make in SETTINGS.items()}
    settings[f"calibrated, mean density target {args.calibrate_density}"] = load_config_file(calibrated)

    models = {}
    for index, (name, config) in enumerate(settings.items()):
        models[name] = convert(REFERENCE_PIPELINE, args.out / "models" / str(index), config, overwrite=True)
    models.update(dict(item.rsplit("=", 1) for item in args.extra))

    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for index, (name, folder) in enumerate(models.items()):
        if name in results:  # measured by an earlier, interrupted run
            continue
        result = run_eval(
            REFERENCE_PIPELINE, folder, args.out / "eval" / str(index), prompts_file=prompts_file, latents_file=latents
        )
        results[name] = result.summary()
        atomic_write_text(results_file, json.dumps(results, indent=1, default=str))

    rows = [
        [
            name,
            f"{s.get('density_b', 1.0):.3f}",
            f"{s['latent_psnr_mean']:.2f}",
            f"{s['pixel_psnr_mean']:.2f}",
            f"{s['pixel_ssim_mean']:.4f}",
            f"{s['loss_a']:.4f}",
            f"{s['loss_b']:.4f}",
        ]
        for name, s in results.items()
    ]
    header = ["setting", "density", "latent PSNR dB", "pixel PSNR dB", "pixel SSIM", "loss dense", "loss NABLA"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
