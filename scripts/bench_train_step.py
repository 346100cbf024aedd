"""Training step time and peak memory, dense vs NABLA, for a Wan2.1-1.3B-shaped transformer (GPU).

One step = what `adapt` does for a full fine-tune: fp32 master weights, bf16 autocast, gradient
checkpointing, forward + backward of a velocity MSE, gradient clipping, AdamW step. Random weights;
the NABLA rows report the block density they ran at. Each variant runs in its own try block, so a
block size whose FlexAttention backward does not compile is recorded as an error, not a crash.

    python scripts/bench_train_step.py --layers 30 --out bench_train.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from nabla_convert import NablaConfig, apply_nabla, layer_densities, reset_densities
from nabla_convert.models import family_for_arch

WAN_1_3B = family_for_arch("wan2.1-t2v-1.3b").archs[
    "wan2.1-t2v-1.3b"
]  # the public checkpoint's config (the rest are diffusers defaults)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--latent", default="21,60,104", help="latent frames,height,width (480p 81 frames)")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.2])
    parser.add_argument("--blocks", nargs="+", default=["128x128", "64x64"], help="q x kv block sizes for NABLA")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def train_step(model, optimizer, inputs: dict[str, torch.Tensor], target: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        prediction = model(**inputs, return_dict=False)[0]
    loss = (prediction.float() - target).pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(name: str, model, inputs, target, args, extra: dict) -> dict:
    """Mean of `iters` synchronised steps after `warmup` steps (the first ones compile); peak memory over all."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.warmup):
        train_step(model, optimizer, inputs, target)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    if extra.get("nabla"):
        reset_densities(model)
    times = []
    for _ in range(args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, optimizer, inputs, target)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    record = {
        "variant": name,
        "step_ms": 1000 * sum(times) / len(times),
        "step_ms_each": [round(1000 * t, 1) for t in times],
        "warmup_s": round(warmup_s, 1),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        **extra,
    }
    if extra.get("nabla"):
        densities = layer_densities(model)
        record["density"] = sum(densities.values()) / len(densities)
    del optimizer
    return record


def main() -> None:
    args = parse_args()
    frames, height, width = (int(v) for v in args.latent.split(","))
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": args.layers}).cuda()
    model.enable_gradient_checkpointing()
    inputs = {
        "hidden_states": torch.randn(1, 16, frames, height, width, device="cuda"),
        "timestep": torch.tensor([500.0], device="cuda"),
        "encoder_hidden_states": torch.randn(1, args.text_len, 4096, device="cuda"),
    }
    target = torch.randn_like(inputs["hidden_states"])
    tokens = frames * (height // 2) * (width // 2)
    header = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "layers": args.layers,
        "tokens": tokens,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(header), flush=True)
    results = [header]
    variants = [("dense", None)] + [
        (f"nabla thr {thr} blocks {blocks}", (thr, blocks)) for blocks in args.blocks for thr in args.threshold
    ]
    for name, variant in variants:
        try:
            if variant is None:
                record = measure(name, model, inputs, target, args, {"nabla": False})
            else:
                thr, blocks = variant
                q_block, kv_block = (int(v) for v in blocks.split("x"))
                apply_nabla(model, NablaConfig(threshold=thr, q_block=q_block, kv_block=kv_block, backend="flex"))
                record = measure(name, model, inputs, target, args, {"nabla": True, "threshold": thr, "blocks": blocks})
        except Exception as err:  # recorded: which block sizes the flex backward supports is the finding
            record = {"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            traceback.print_exc()
        torch.cuda.empty_cache()
        print(json.dumps(record), flush=True)
        results.append(record)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
