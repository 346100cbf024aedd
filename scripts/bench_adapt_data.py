"""Samples per second of adapt's data path at the Wan2.1-14B training-step shape, with or without a real GPU step.

Writes a latent dataset of SHARDS shards (latents 16 x F x H x W and prompt_embeds L x 4096, float32, as adapt's
teacher rollouts or a prepared dataset hold them), then reads batches in the training loop's order (adapt's
deterministic per-step positions): `--mode rows` through LatentDataset.batch in the training process (every
version has it), `--mode loader` through adapt's DataLoader (worker processes, one open handle per shard).

What runs per batch, while the loop waits for the next one:
- nothing (default), or `--step-ms` of sleep standing in for the GPU step (it frees the CPU for the workers);
- `--gpu-step BLOCKS`: adapt's loop on the batch: noise drawn (adapt.data.sample_noise), the tensors moved to the
  device as adapt moves them (`.to(device)`, from pinned memory in loader mode on CUDA as adapt's DataLoader pins),
  then forward + backward of BLOCKS Wan blocks (diffusers' WanTransformer3DModel, random weights, bf16, gradient
  checkpointing as adapt's default) with the flow-matching loss (nabla_convert.flow), and float(loss) waiting for
  the GPU as adapt's step does. The model is diffusers' alone and the loss is the same in every version since the
  data path's change (7d30c24), so the same step runs against the package before and after it (the one on
  PYTHONPATH: the report names its path). One warm-up step on zeros runs before the clock starts.

    python scripts/bench_adapt_data.py --mode rows --out bench_data_rows.json
    python scripts/bench_adapt_data.py --mode loader --workers 2 --step-ms 500 --out bench_data_loader.json
    python scripts/bench_adapt_data.py --mode loader --workers 2 --gpu-step 4 --batches 10 --out gpu_loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import nabla_convert
from nabla_convert.adapt import LatentDataset, TimestepSampler, write_latent_shard
from nabla_convert.adapt.data import sample_noise, sample_positions
from nabla_convert.flow import add_noise, per_sample_mse, velocity_target


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("rows", "loader"), required=True)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (--mode loader)")
    parser.add_argument("--latent", default="21,60,104", help="latent frames,height,width (480p, 81 frames)")
    parser.add_argument("--text", default="512,4096", help="prompt_embeds tokens,dim (umT5-XXL)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows-per-shard", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="time the training step would take per batch (slept: it frees the CPU)",
    )
    parser.add_argument(
        "--gpu-step",
        type=int,
        default=0,
        metavar="BLOCKS",
        help="run adapt's training step per batch on BLOCKS Wan blocks (0: none, or --step-ms of sleep)",
    )
    parser.add_argument("--model-dims", default="40,128,13824", help="heads,head_dim,ffn_dim of the blocks (14B)")
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="as adapt's default"
    )
    parser.add_argument("--device", default="cuda", help="where --gpu-step runs (cpu: tiny dims, a code-path check)")
    parser.add_argument("--data", type=Path, help="reuse this dataset folder (written if missing)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.gpu_step and args.step_ms:
        parser.error("--gpu-step runs a real step: leave --step-ms out")
    if args.gpu_step and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--gpu-step needs a CUDA device and {args.device} is not available (--device cpu with tiny dims)")
    return args


def write_dataset(folder: Path, args: argparse.Namespace) -> None:
    latent, text = [int(v) for v in args.latent.split(",")], [int(v) for v in args.text.split(",")]
    generator = torch.Generator().manual_seed(0)
    for shard in range(args.shards):
        latents = torch.randn((args.rows_per_shard, 16, *latent), generator=generator)
        embeds = torch.randn((args.rows_per_shard, *text), generator=generator)
        write_latent_shard(folder / f"shard-{shard:05d}.safetensors", latents, embeds)


def batches_in_training_order(dataset: LatentDataset, args: argparse.Namespace):
    """What adapt's loop reads: batch k holds the samples at positions k * batch ... of the seeded epoch order."""
    if args.mode == "rows":
        for k in range(args.batches):
            yield dataset.batch(sample_positions(0, len(dataset), k * args.batch_size, args.batch_size))
    else:
        from nabla_convert.adapt.data import MicroBatches, training_loader

        batches = MicroBatches(args.batch_size)
        pin = bool(args.gpu_step) and torch.device(args.device).type == "cuda"  # adapt pins on CUDA
        yield from training_loader(
            dataset, range(len(dataset)), 0, batches, range(args.batches), args.workers, pin_memory=pin
        )


class TrainingStep:
    """adapt's per-batch work after the read: noise, the copy to the device, forward + backward, the wait for it."""

    def __init__(self, dataset: LatentDataset, args: argparse.Namespace) -> None:
        from diffusers import WanTransformer3DModel

        heads, head_dim, ffn = (int(v) for v in args.model_dims.split(","))
        channels = dataset.latent_shape[0]
        self.device = torch.device(args.device)
        with self.device:  # random init on the device: seconds for billions of weights, not minutes on the CPU
            model = WanTransformer3DModel(
                num_attention_heads=heads,
                attention_head_dim=head_dim,
                in_channels=channels,
                out_channels=channels,
                text_dim=dataset.text_shape[-1],
                ffn_dim=ffn,
                num_layers=args.gpu_step,
            )
        # as from_pretrained(torch_dtype=bf16) loads adapt's student; bench.measure.bf16_model does the same, but the
        # "before" package (7d30c24^) this script also runs against does not have it
        keep = model._keep_in_fp32_modules or []
        for name, parameter in model.named_parameters():
            fp32 = any(module in name.split(".") for module in keep)
            parameter.data = parameter.data.to(torch.float32 if fp32 else torch.bfloat16)
        self.model = model.train()
        if args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.sampler = TimestepSampler()
        self.seconds = {"noise": 0.0, "copy": 0.0, "step": 0.0}

    def __call__(self, batch: dict[str, torch.Tensor], first: int) -> float:
        """One step on `batch` (the samples numbered first, first + 1, ...); its loss, once the device is done."""
        started = time.perf_counter()
        noise, sigmas, timesteps = sample_noise(0, first, batch["latents"].shape, self.sampler)
        drawn = time.perf_counter()
        latents, noise, embeds, sigmas, timesteps = (
            t.to(self.device) for t in (batch["latents"], noise, batch["prompt_embeds"], sigmas, timesteps)
        )
        copied = time.perf_counter()
        noisy = add_noise(latents, noise, sigmas)
        prediction = self.model(noisy.to(torch.bfloat16), timesteps, embeds.to(torch.bfloat16), return_dict=False)[0]
        loss = per_sample_mse(prediction, velocity_target(latents, noise)).mean()
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        value = float(loss.detach())  # waits for the device, as adapt's float(loss) of every step does
        for name, seconds in zip(
            self.seconds, (drawn - started, copied - drawn, time.perf_counter() - copied), strict=True
        ):
            self.seconds[name] += seconds
        return value

    def warm_up(self, dataset: LatentDataset, batch_size: int) -> None:
        """One step on zeros (kernel choice, allocator), left out of the timings."""
        shapes = {"latents": dataset.latent_shape, "prompt_embeds": dataset.text_shape}
        self({name: torch.zeros((batch_size, *shape)) for name, shape in shapes.items()}, 0)
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def machine(device: torch.device | None) -> str:
    described = f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    if device is not None and device.type == "cuda":
        described += f", {torch.cuda.get_device_name(device)}"
    return described


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        if not any(folder.glob("*.safetensors")):
            write_dataset(folder, args)
        dataset = LatentDataset(folder)
        sample_bytes = sum(torch.Size(shape).numel() * 4 for shape in (dataset.latent_shape, dataset.text_shape))
        step = TrainingStep(dataset, args) if args.gpu_step else None
        if step:
            step.warm_up(dataset, args.batch_size)
        started, count, waits, ends = time.perf_counter(), 0, [], []
        batches = batches_in_training_order(dataset, args)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            waits.append(time.perf_counter() - asked)
            if step:
                step(batch, count)
            else:
                time.sleep(args.step_ms / 1000)
            count += len(batch["latents"])
            ends.append(time.perf_counter())
        seconds = time.perf_counter() - started
    steady = len(ends) > 1  # the rate once the first batch is in and stepped (workers started)
    result = {
        "mode": args.mode,
        "workers": args.workers if args.mode == "loader" else 0,
        "samples": count,
        "seconds": round(seconds, 3),
        "step_ms": args.step_ms,
        "first_batch_s": round(waits[0], 3),
        "samples_per_s": round(count / seconds, 3),
        "samples_per_s_after_first": round((count - args.batch_size) / (ends[-1] - ends[0]), 3) if steady else None,
        "data_wait_ms_per_batch_after_first": round(1000 * sum(waits[1:]) / max(len(waits) - 1, 1), 1),
        "mb_per_sample": round(sample_bytes / 2**20, 1),
        "latent": args.latent,
        "text": args.text,
        "batch_size": args.batch_size,
        "package": str(Path(nabla_convert.__file__).parent),
        "machine": machine(step.device if step else None),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    if step:
        result["gpu_step"] = {
            "blocks": args.gpu_step,
            "model_dims": args.model_dims,
            "parameters": step.parameters,
            "gradient_checkpointing": args.gradient_checkpointing,
            "device": str(step.device),
            "pinned": args.mode == "loader" and step.device.type == "cuda",
            **{f"{name}_ms_per_batch": round(1000 * s / len(waits), 1) for name, s in step.seconds.items()},
        }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
