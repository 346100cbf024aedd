"""NABLA transformer step on 1 GPU vs N GPUs under diffusers' context parallelism (Ulysses); writes JSON.

Launch one process per GPU; rank 0 first runs the model alone (the other ranks wait), then every
rank enables `ContextParallelConfig(ulysses_degree=N)` on the same model and runs it again:

    torchrun --nproc-per-node 2 scripts/bench_context_parallel.py --arch wan2.1-t2v-14b \\
        --resolution 1280x720 --frames 81 --threshold 0.1 --q-block 128 --out cp.json

Random bf16 weights (the same on every rank), batch 1, a 512-token text. Reported: the median step
of each, the speedup, and how far the N-GPU output is from the one-GPU output, for NABLA and, as
the yardstick of bf16 rounding alone, for the same model with dense attention
(`nabla_disabled`). Without CUDA it runs on CPU with gloo (`--arch tiny`), the way it is tested.
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
from diffusers import ContextParallelConfig, WanTransformer3DModel

from nabla_convert import NablaConfig, apply_nabla, layer_densities, nabla_disabled, reset_densities
from nabla_convert.attention.parallel import cpu_counts_as_device
from nabla_convert.bench.measure import cuda_ms, environment, parse_resolution
from nabla_convert.io import atomic_write_text
from nabla_convert.models.tiny import tiny_transformer
from nabla_convert.models.wan import WAN


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wan2.1-t2v-14b", choices=[*WAN.archs, "tiny"])
    parser.add_argument("--layers", type=int, help="transformer blocks (default: the architecture's)")
    parser.add_argument("--resolution", default="1280x720", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--q-block", type=int, default=128)
    parser.add_argument("--kv-block", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def build_model(arch: str, layers: int | None, device: torch.device) -> WanTransformer3DModel:
    """The same random weights on every rank: seeded init, then rank 0's weights broadcast."""
    torch.manual_seed(0)
    with device:
        if arch == "tiny":
            model = tiny_transformer(num_layers=layers or 2, heads=4, head_dim=16)
        else:
            model = WanTransformer3DModel(**{**WAN.archs[arch], "num_layers": layers or WAN.archs[arch]["num_layers"]})
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
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
    patch = model.config.patch_size
    grid = WAN.token_grid(parse_resolution(args.resolution), args.frames, patch)
    generator = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    latent = (1, model.config.in_channels, *(g * p for g, p in zip(grid, patch, strict=True)))
    hidden = torch.randn(latent, generator=generator).to(device, dtype)
    text = torch.randn(1, WAN.text_tokens, model.config.text_dim, generator=generator).to(device, dtype)
    timestep = torch.full((1,), 500, device=device)
    nabla = NablaConfig(threshold=args.threshold, q_block=args.q_block, kv_block=args.kv_block)
    apply_nabla(model, nabla)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(hidden, timestep, text, return_dict=False)[0]

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
                "layers": len(model.blocks),
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
