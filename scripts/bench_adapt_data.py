"""Samples per second of adapt's data path at the Wan2.1-14B training-step shape (CPU: the data path is CPU work).

Writes a latent dataset of SHARDS shards (latents 16 x F x H x W and prompt_embeds L x 4096, float32, as adapt's
teacher rollouts or a prepared dataset hold them), then reads batches in the training loop's order (adapt's
deterministic per-step positions): `--mode rows` through LatentDataset.batch in the training process (every
version has it), `--mode loader` through adapt's DataLoader (worker processes, one open handle per shard).
`--step-ms` sleeps that long per batch as the GPU step would, so the wait for data shows what the step would wait.

    python scripts/bench_adapt_data.py --mode rows --out bench_data_rows.json
    python scripts/bench_adapt_data.py --mode loader --workers 2 --out bench_data_loader.json
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

from nabla_convert.adapt import LatentDataset, write_latent_shard
from nabla_convert.adapt.data import sample_positions


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
    parser.add_argument("--data", type=Path, help="reuse this dataset folder (written if missing)")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


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
        yield from training_loader(dataset, range(len(dataset)), 0, batches, range(args.batches), args.workers)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        if not any(folder.glob("*.safetensors")):
            write_dataset(folder, args)
        dataset = LatentDataset(folder)
        sample_bytes = sum(torch.Size(shape).numel() * 4 for shape in (dataset.latent_shape, dataset.text_shape))
        started, count, waits = time.perf_counter(), 0, []
        batches = batches_in_training_order(dataset, args)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            waits.append(time.perf_counter() - asked)
            count += len(batch["latents"])
            time.sleep(args.step_ms / 1000)
        seconds = time.perf_counter() - started
    result = {
        "mode": args.mode,
        "workers": args.workers if args.mode == "loader" else 0,
        "samples": count,
        "seconds": round(seconds, 3),
        "step_ms": args.step_ms,
        "first_batch_s": round(waits[0], 3),
        "samples_per_s": round(count / seconds, 2),
        "data_wait_ms_per_batch_after_first": round(1000 * sum(waits[1:]) / max(len(waits) - 1, 1), 1),
        "mb_per_sample": round(sample_bytes / 2**20, 1),
        "latent": args.latent,
        "text": args.text,
        "batch_size": args.batch_size,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
