"""NABLA transformer step on 1 GPU vs N GPUs under diffusers' context parallelism (Ulysses); writes JSON.

Launch one process per GPU; rank 0 first runs the model alone (the other ranks wait), then every
rank enables `ContextParallelConfig(ulysses_degree=N)` on the same model and runs it again:

    torchrun --nproc-per-node 2 scripts/bench_context_parallel.py --arch wan2.1-t2v-14b \\
        --resolution 1280x720 --frames 81 --threshold 0.1 --q-block 128 --out cp.json

Any family's preset (`--arch`, looked up in the registry: Wan, Kandinsky 5, HunyuanVideo, HunyuanVideo
1.5), random bf16 weights and the family's random inputs (the same on every rank), batch 1; `--layers`
keeps fewer blocks (HunyuanVideo: dual- and single-stream in the model's proportion). Reported: the median step
of each, the speedup, and how far the N-GPU output is from the one-GPU output, for NABLA and, as
the yardstick of bf16 rounding alone, for the same model with dense attention
(`nabla_disabled`). `--compile` compiles the blocks (diffusers' compile_repeated_blocks) for both runs; the
first call of each run compiles and is not timed. Without CUDA it runs on CPU with gloo (`--arch tiny-wan`, `tiny-kandinsky5`,
`tiny-hunyuan-video` or `tiny-hunyuan-video-1.5`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from nabla_convert import NablaConfig, apply_nabla, layer_densities, nabla_disabled, reset_densities
from nabla_convert.attention.parallel import cpu_counts_as_device
from nabla_convert.bench.measure import bf16_model, cuda_ms, environment, parse_resolution
from nabla_convert.io import atomic_write_text
from nabla_convert.models import families, family_for_arch, family_of
from nabla_convert.models.tiny import (
    tiny_hunyuan_video15_transformer,
    tiny_hunyuan_video_transformer,
    tiny_kandinsky5_transformer,
    tiny_transformer,
)

TINY = {  # CPU (gloo) checks of the script: tiny transformer of a family, built in code
    "tiny-wan": lambda layers: tiny_transformer(num_layers=layers or 2, heads=4, head_dim=16),
    "tiny-kandinsky5": lambda layers: tiny_kandinsky5_transformer(num_visual_blocks=layers or 2, heads=4),
    "tiny-hunyuan-video": lambda layers: tiny_hunyuan_video_transformer(num_single_layers=(layers or 3) - 1, heads=4),
    "tiny-hunyuan-video-1.5": lambda layers: tiny_hunyuan_video15_transformer(num_layers=layers or 2, heads=4),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    presets = [arch for family in families() for arch in family.archs]
    parser.add_argument("--arch", default="wan2.1-t2v-14b", choices=[*presets, *TINY])
    parser.add_argument("--layers", type=int, help="transformer blocks (default: the architecture's)")
    parser.add_argument("--resolution", default="1280x720", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--q-block", type=int, default=128)
    parser.add_argument("--kv-block", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help="compile_repeated_blocks(fullgraph=True) before both runs (inductor)"
    )
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(arch: str, layers: int | None, device: torch.device) -> torch.nn.Module:
    """The same random weights on every rank: seeded init, then rank 0's weights broadcast."""
    torch.manual_seed(0)
    with device:
        if arch in TINY:
            model = TINY[arch](layers)
        else:
            family = family_for_arch(arch)
            config = family.with_layers(family.archs[arch], layers) if layers else family.archs[arch]
            model = family.transformer_classes[0](**config)
    # bf16 as from_pretrained loads it, its fp32 modules kept (Kandinsky 5 needs them); float32 on CPU
    model = (bf16_model(model) if compute_dtype(device) == torch.bfloat16 else model.float()).eval()
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    return model


def distance(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far an N-GPU output is from the one-GPU output."""
    diff = (output.float() - reference.float()).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "relative_l2": float(diff.norm() / reference.float().norm()),
        "reference_std": float(reference.float().std()),
        "allclose_bf16": bool(torch.allclose(output.float(), reference.float(), rtol=1.6e-2, atol=1e-2)),
    }


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = build_model(args.arch, args.layers, device)
    family = family_of(model)
    grid = family.token_grid(parse_resolution(args.resolution), args.frames, family.patch_size(model.config))
    torch.manual_seed(1)
    inputs = family.random_inputs(model, grid, 1, device, compute_dtype(device))
    for tensor in inputs.values():  # rank 0's inputs everywhere
        for t in tensor if isinstance(tensor, list) else [tensor]:
            dist.broadcast(t, src=0)
    nabla = NablaConfig(threshold=args.threshold, q_block=args.q_block, kv_block=args.kv_block)
    apply_nabla(model, nabla)
    if args.compile:  # one graph per block class; enabling parallelism later recompiles it with the all-to-all inside
        model.compile_repeated_blocks(fullgraph=True)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).sample

    def dense_forward() -> torch.Tensor:
        with nabla_disabled(model):
            return forward()

    single: dict[str, Any] = {}
    if rank == 0:
        reset_densities(model)
        single = {"ms": cuda_ms(forward, args.reps), "output": forward()}
        single["density"] = statistics.fmean(layer_densities(model).values())
        single["dense_output"] = dense_forward()
    dist.barrier()

    with cpu_counts_as_device():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    reset_densities(model)
    dist.barrier()
    parallel_ms = cuda_ms(forward, args.reps)
    output = forward()
    density = statistics.fmean(layer_densities(model).values())
    dense_output = dense_forward()
    rank_ms, rank_density = [None] * world, [None] * world
    dist.all_gather_object(rank_ms, parallel_ms)
    dist.all_gather_object(rank_density, density)

    if rank == 0:
        layout = model._nabla_state.layout
        report = {
            "environment": {**environment(), "diffusers": diffusers.__version__, "gpus": world},
            "settings": {
                **{k: v for k, v in vars(args).items() if k != "out"},
                "token_grid": list(grid),
                "tokens": layout.num_tokens,
                "padded_tokens": layout.padded_len,
                "family": family.name,
                "layers": family.num_layers(model.config),
                "nabla": nabla.to_dict(),
            },
            "one_gpu_ms": single["ms"],
            "n_gpu_ms": max(rank_ms),
            "n_gpu_ms_per_rank": rank_ms,
            "speedup": single["ms"] / max(rank_ms),
            "density_one_gpu": single["density"],
            "density_per_rank": rank_density,
            "nabla_vs_one_gpu": distance(output, single["output"]),
            "dense_vs_one_gpu": distance(dense_output, single["dense_output"]),
        }
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
