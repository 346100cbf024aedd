"""GPU driver: calibrate a Wan-shaped transformer (random bf16 weights) on one GPU, or data-parallel on N.

Records seconds per prompt, the time of each transformer call (measured or not) and peak memory
(docs/benchmarks.md, "Calibration"). Prompt embeddings are random and precomputed, so no text encoder is
loaded. Launched with `torchrun --nproc-per-node N` (or `accelerate launch`), every process builds the same model
on its own GPU and calibrate shares the prompts over them; `--same-as STATS` then checks that the merged stats
equal those of a one-process run exactly. `--small` runs a CPU smoke test.

    python scripts/gpu_calibrate.py --out $OUT          # 1.3B, 480p, on the GPU machine
    python scripts/gpu_calibrate.py --arch wan2.1-t2v-14b --resolution 1280x720 --steps 1 --guidance 1 \\
        --no-dense-run --work /tmp/one --out $OUT/one
    torchrun --nproc-per-node 2 scripts/gpu_calibrate.py --arch wan2.1-t2v-14b --resolution 1280x720 --steps 1 \\
        --guidance 1 --no-dense-run --work /tmp/two --out $OUT/two --same-as /tmp/one/calibration/stats.safetensors
    python scripts/gpu_calibrate.py --small --work /tmp/cal --out /tmp/cal
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import diffusers
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file

from nabla_convert.bench import environment, parse_resolution
from nabla_convert.calibrate import calibrate
from nabla_convert.calibrate.distributed import Processes
from nabla_convert.io import resolve_device
from nabla_convert.models.wan import WAN

SMALL = dict(num_layers=2, attention_head_dim=24, ffn_dim=64, text_dim=32, num_attention_heads=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for result.json")
    parser.add_argument("--work", type=Path, help="scratch folder: embeddings and calibrate's --out [--out]")
    parser.add_argument("--arch", default="wan2.1-t2v-1.3b", choices=sorted(WAN.archs))
    parser.add_argument("--resolution", default="832x480", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps, all measured")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1: one transformer call per step)")
    parser.add_argument("--dense-run", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--same-as", type=Path, help="stats.safetensors of a one-process run to compare with")
    parser.add_argument("--small", action="store_true", help="tiny CPU smoke test")
    return parser.parse_args()


def timed_calls(module: torch.nn.Module, sync) -> list[float]:
    """Seconds of each forward of `module` from now on (synchronised on the GPU)."""
    calls: list[float] = []
    started: list[float] = []

    def before(*_: object) -> None:
        sync()
        started.append(time.perf_counter())

    def after(*_: object) -> None:
        sync()
        calls.append(time.perf_counter() - started.pop())

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)
    return calls


def same_stats(path: Path, reference: Path) -> dict[str, object]:
    """Exact comparison: header metadata and every tensor (not the bytes: safetensors orders metadata keys freely)."""
    with safe_open(path, "pt") as a, safe_open(reference, "pt") as b:
        meta_equal = a.metadata() == b.metadata()
        names, reference_names = sorted(a.keys()), sorted(b.keys())
        unequal = [] if names == reference_names else ["<tensor names differ>"]
        unequal += [n for n in names if n in reference_names and not torch.equal(a.get_tensor(n), b.get_tensor(n))]
    return {"metadata_equal": meta_equal, "tensors": len(names), "unequal_tensors": unequal}


def main() -> None:
    args = parse_args()
    processes, device = Processes.launched("cpu" if args.small else "auto")
    device = resolve_device(device)
    work = args.work or args.out
    config = {**WAN.archs[args.arch], **(SMALL if args.small else {})}
    width, height = (256, 240) if args.small else parse_resolution(args.resolution)
    frames = 17 if args.small else args.frames
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)  # the same weights in every process
    with device:
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
    embeds_file = work / "embeds.safetensors"
    if processes.is_main:
        work.mkdir(parents=True, exist_ok=True)
        save_file(embeds, embeds_file)
    processes.wait()
    calls = timed_calls(transformer, sync)

    dense_s = None
    if args.dense_run and processes.is_main:
        start = time.time()
        pipe(
            prompt_embeds=embeds["prompt_embeds"][:1].to(device),
            negative_prompt_embeds=embeds["negative_prompt_embeds"].to(device),
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            output_type="latent",
        )
        sync()
        dense_s = time.time() - start
    dense_calls = calls[:]
    calls.clear()
    processes.wait()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    result = calibrate(
        pipe,
        work / "calibration",
        prompt_embeds=embeds_file,
        steps=args.steps,
        sample_steps=args.steps,
        height=height,
        width=width,
        frames=frames,
        guidance=args.guidance,
        target_density=0.3,
        progress=False,
        overwrite=True,  # a timing run measures every prompt, never resumes stats left in --work
    )
    sync()
    calibrate_s = time.time() - start
    if not processes.is_main:
        return
    info = {
        **environment(),
        "diffusers": diffusers.__version__,
        "arch": args.arch,
        "processes": processes.count,
        "layout": result.stats.meta["layout"],
        "steps": args.steps,
        "measured_steps": result.stats.meta["measured_steps"],
        "prompts": args.prompts,
        "guidance": args.guidance,
        "query_blocks": result.stats.meta["plan"]["query_blocks"],
        "candidates": len(result.stats.candidates),
        "dense_run_s_per_prompt": dense_s,
        "dense_calls_s": dense_calls,
        "calibrate_s_total": calibrate_s,
        "calibrate_s_per_prompt": calibrate_s / args.prompts,
        "process_0_calls_s": calls,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "summary": result.choices["transformer"].summary,
    }
    if args.same_as:
        info["same_as_one_process"] = same_stats(work / "calibration" / "stats.safetensors", args.same_as)
    print(json.dumps(info, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
