"""GPU driver: calibrate a Wan2.1-1.3B-sized transformer (random weights) at 480p, 81 frames.

Records seconds per prompt and peak memory (docs/benchmarks.md, "Calibration"). Prompt embeddings
are random and precomputed, so no text encoder is loaded. `--small` runs a CPU smoke test.

    python scripts/gpu_calibrate.py --out $OUT          # on the GPU machine
    python scripts/gpu_calibrate.py --small --out /tmp/cal
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import save_file

from nabla_convert.calibrate import calibrate
from nabla_convert.models import family_for_arch

WAN_1_3B = family_for_arch("wan2.1-t2v-1.3b").archs[
    "wan2.1-t2v-1.3b"
]  # the public checkpoint's config (the rest are diffusers defaults)
SMALL = dict(num_layers=2, attention_head_dim=24, ffn_dim=64, text_dim=32, num_attention_heads=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="tiny CPU smoke test")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    device = "cpu" if args.small else "cuda"
    config = {**WAN_1_3B, **(SMALL if args.small else {})}
    height, width, frames = (240, 256, 17) if args.small else (480, 832, 81)

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**config)
    transformer = transformer.to(torch.float32 if args.small else torch.bfloat16).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)

    generator = torch.Generator().manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(args.prompts, 512, transformer.config.text_dim, generator=generator),
        "negative_prompt_embeds": torch.randn(1, 512, transformer.config.text_dim, generator=generator),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    embeds_file = args.out / "embeds.safetensors"
    save_file(embeds, embeds_file)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    start = time.time()
    pipe(
        prompt_embeds=embeds["prompt_embeds"][:1].to(device),
        negative_prompt_embeds=embeds["negative_prompt_embeds"].to(device),
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=args.steps,
        output_type="latent",
    )
    sync()
    dense_s = time.time() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    result = calibrate(
        pipe,
        args.out / "calibration",
        prompt_embeds=embeds_file,
        steps=args.steps,
        sample_steps=args.steps,
        height=height,
        width=width,
        frames=frames,
        target_density=0.3,
    )
    sync()
    calibrate_s = time.time() - start
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "layout": result.stats.meta["layout"],
        "steps": args.steps,
        "measured_steps": result.stats.meta["measured_steps"],
        "prompts": args.prompts,
        "cfg": True,
        "query_blocks": result.stats.meta["plan"]["query_blocks"],
        "candidates": len(result.stats.candidates),
        "dense_run_s_per_prompt": dense_s,
        "calibrate_s_total": calibrate_s,
        "calibrate_s_per_prompt": calibrate_s / args.prompts,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "summary": result.choices["transformer"].summary,
    }
    print(json.dumps(info, indent=1))
    (args.out / "result.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
