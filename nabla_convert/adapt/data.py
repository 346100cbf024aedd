"""Training data for `adapt`: latent datasets, deterministic batch order, noise and timestep sampling.

Latent dataset format (a folder of safetensors shards, any file name ending in .safetensors, read in
sorted order; every shard holds the same tensors with the same shapes except the first axis):
  latents        (N, C, F, H, W) float: video latents in the transformer's input space, i.e. the VAE
                 latent already normalised as the pipeline does ((z - latents_mean) / latents_std);
  prompt_embeds  (N, L, text_dim) float: text embeddings as the family's encode_prompts returns them
                 (padded with zeros to L tokens, L = max_sequence_length);
  any further conditioning tensor of the family (N, ...), by the name its encode_prompts gives it: e.g.
                 pooled_prompt_embeds (a pooled text embedding), text masks, HunyuanVideo 1.5's ByT5 prompt_embeds_2.
Latents are in the layout the family's pipeline denoises (channels-first or channels-last: ModelFamily.sample_shape).
Shard metadata {"format": "nabla-convert-latents", "version": "1"} marks them. `write_latent_shard`
writes one; adapt.rollouts.teacher_rollouts makes one from the dense teacher alone (no videos needed).

Every random draw of a training step comes from generators seeded by (seed, step, micro-batch,
process), and the sample order is a per-epoch permutation seeded by (seed, epoch). So the data
position and noise are functions of the step: a resumed run draws exactly what an uninterrupted one
would, whatever happened to global RNG state in between.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors import safe_open
from safetensors.torch import save_file

from nabla_convert.errors import NablaError
from nabla_convert.io import atomic_write, open_safetensors

SHARD_METADATA = {"format": "nabla-convert-latents", "version": "1"}
TENSOR_NAMES = ("latents", "prompt_embeds")  # always present; families may add conditioning tensors
Conditioning = torch.Tensor | dict[str, torch.Tensor]  # prompt_embeds alone, or every conditioning tensor by name
NUM_TRAIN_TIMESTEPS = 1000


class DataError(NablaError, ValueError):
    """A latent dataset that cannot be used, with a message that says why."""


def as_tensors(conditioning: Conditioning) -> dict[str, torch.Tensor]:
    return conditioning if isinstance(conditioning, dict) else {"prompt_embeds": conditioning}


def take(conditioning: Conditioning, rows: slice | Sequence[int], device: torch.device | str | None = None):
    """The given rows of a conditioning (tensor or dict of tensors), on `device`."""
    if isinstance(conditioning, dict):
        return {name: tensor[rows].to(device) for name, tensor in conditioning.items()}
    return conditioning[rows].to(device)


def write_latent_shard(path: str | os.PathLike, latents: torch.Tensor, conditioning: Conditioning) -> Path:
    """Write one shard of the latent dataset format atomically (tmp file, then rename)."""
    tensors = {"latents": latents, **as_tensors(conditioning)}
    embeds = tensors.get("prompt_embeds")
    if latents.ndim != 5 or embeds is None or embeds.ndim != 3 or {len(t) for t in tensors.values()} != {len(latents)}:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise DataError(f"need latents (5-D) and prompt_embeds (N, L, D), every tensor with the same N, got {shapes}")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=SHARD_METADATA))


class LatentDataset(torch.utils.data.Dataset):
    """The samples of a latent dataset folder (or one shard file), read row by row from disk.

    Each process (the training process, every DataLoader worker) opens each shard once, on its first row.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        shards = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not shards or not shards[0].is_file():
            raise DataError(f"no latent shards (*.safetensors) found at {path}")
        self.rows: list[tuple[Path, int]] = []
        shapes: dict[str, tuple[int, ...]] = {}
        with safe_open(shards[0], framework="pt") as f:
            self.names = tuple(sorted(f.keys(), key=lambda name: (name not in TENSOR_NAMES, name)))
        for shard in shards:
            with open_safetensors(shard, "latent shard") as f:
                missing = set(TENSOR_NAMES) - set(f.keys())
                if missing:
                    raise DataError(f"{shard} lacks tensors {sorted(missing)} (a latent shard holds {TENSOR_NAMES})")
                if set(f.keys()) != set(self.names):
                    raise DataError(f"{shard} holds tensors {sorted(f.keys())}, earlier shards {sorted(self.names)}")
                sizes = {name: tuple(f.get_slice(name).get_shape()) for name in self.names}
            if len({size[0] for size in sizes.values()}) != 1 or len(sizes["latents"]) != 5:
                raise DataError(f"{shard}: tensors {sizes} do not pair up (5-D latents, the same N for all)")
            for name, size in sizes.items():
                if shapes.setdefault(name, size[1:]) != size[1:]:
                    raise DataError(f"{shard}: {name} has per-sample shape {size[1:]}, earlier shards {shapes[name]}")
            self.rows += [(shard, i) for i in range(sizes["latents"][0])]
        self.latent_shape = shapes["latents"]
        self.text_shape = shapes["prompt_embeds"]
        self._handles: dict[Path, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, row = self.rows[index]
        handle = self._open(shard)
        return {name: handle.get_slice(name)[row : row + 1][0] for name in self.names}

    def _open(self, shard: Path) -> Any:
        """This process's handle of `shard` (a forked worker opens its own, never its parent's)."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(shard, framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker opens its own handles
        return {**self.__dict__, "_handles": {}}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        items = [self[i] for i in indices]
        return {name: torch.stack([item[name] for item in items]) for name in self.names}

    def conditioning(self, batch: dict[str, torch.Tensor]) -> Conditioning:
        """What the family's denoising call takes: prompt_embeds alone, or every conditioning tensor by name."""
        rest = {name: tensor for name, tensor in batch.items() if name != "latents"}
        return rest["prompt_embeds"] if len(rest) == 1 else rest


def split_heldout(size: int, fraction: float) -> tuple[list[int], list[int]]:
    """Train and held-out indices: the last `fraction` of the samples (at least one) are held out."""
    if size < 2:
        raise DataError(f"need at least 2 samples (one for training, one held out), got {size}")
    heldout = min(size - 1, max(1, round(size * fraction)))
    return list(range(size - heldout)), list(range(size - heldout, size))


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from (seed, parts): the randomness of one micro-batch of one process."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


@cache
def _epoch_permutation(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    return tuple(torch.randperm(size, generator=step_generator(seed, -1, epoch)).tolist())


def sample_positions(seed: int, size: int, first: int, count: int) -> list[int]:
    """Positions (into the training index list) of global samples first..first+count, epoch after epoch."""
    return [_epoch_permutation(seed, k // size, size)[k % size] for k in range(first, first + count)]


@dataclass(frozen=True)
class MicroBatches:
    """Where each micro-batch of one process starts among the run's samples: global sample numbers run over steps,
    then micro-steps, then processes, so N processes with batch b read what one process with batch N * b reads."""

    batch_size: int
    grad_accum: int = 1
    world: int = 1
    rank: int = 0

    def first(self, step: int, micro: int) -> int:
        return ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size


class StepBatches(torch.utils.data.Sampler):
    """Dataset indices of every micro-batch one process reads in `steps`, in the training loop's order."""

    def __init__(self, train: Sequence[int], seed: int, batches: MicroBatches, steps: range) -> None:
        self.train, self.seed, self.batches, self.steps = train, seed, batches, steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps:
            for micro in range(self.batches.grad_accum):
                first = self.batches.first(step, micro)
                positions = sample_positions(self.seed, len(self.train), first, self.batches.batch_size)
                yield [self.train[p] for p in positions]

    def __len__(self) -> int:
        return len(self.steps) * self.batches.grad_accum


def training_loader(
    dataset: LatentDataset,
    train: Sequence[int],
    seed: int,
    batches: MicroBatches,
    steps: range,
    workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """The micro-batches of `steps` for one process, read ahead by `workers` processes (0: in this one)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StepBatches(train, seed, batches, steps),
        num_workers=workers,
        pin_memory=pin_memory,
    )


@dataclass
class TimestepSampler:
    """Flow-matching noise levels drawn as in diffusers' SD3 training scripts.

    u ~ compute_density_for_timestep_sampling(scheme); index = u * 1000 (u near 0 = pure noise);
    sigma and timestep are read from a FlowMatchEulerDiscreteScheduler with the model's shift.
    `sigma_range` restricts the draw to the indices whose sigma lies inside it (one expert of a
    two-expert model covers only high or only low noise).
    """

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 3.0
    sigma_range: tuple[float, float] = (0.0, 1.0)
    scheduler: FlowMatchEulerDiscreteScheduler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=self.shift)
        low, high = self.sigma_range
        sigmas = self.scheduler.sigmas
        self._first = int((sigmas > high).sum())
        self._end = int((sigmas >= low).sum())
        if self._end <= self._first:
            raise DataError(f"sigma_range {self.sigma_range} holds none of the training noise levels")

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, timesteps), each (batch_size,) float32."""
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme,
            batch_size,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        return self.at(u)

    def at(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, timesteps) at quantiles u in [0, 1) of the allowed training noise levels."""
        indices = (self._first + u * (self._end - self._first)).long().clamp(self._first, self._end - 1)
        return self.scheduler.sigmas[indices].float(), self.scheduler.timesteps[indices].float()


def sample_noise(
    seed: int, first: int, shape: torch.Size, sampler: TimestepSampler
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, sigmas, timesteps) of the samples numbered first, first + 1, ... of the run.

    Each sample draws from its own generator keyed by its global number, so N processes with batch b
    draw exactly what one process with batch N * b draws: the run does not depend on the GPU count.
    """
    generators = [step_generator(seed, first + i) for i in range(shape[0])]
    noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])
    sigmas, timesteps = (torch.cat(t) for t in zip(*(sampler.sample(1, g) for g in generators), strict=True))
    return noise, sigmas, timesteps
