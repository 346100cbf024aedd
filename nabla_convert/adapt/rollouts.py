"""Data-free distillation data: a latent dataset made by the dense teacher from prompts alone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from nabla_convert.adapt.data import TimestepSampler, step_generator, take, write_latent_shard
from nabla_convert.adapt.losses import DenseTeacher
from nabla_convert.adapt.settings import AdaptError, AdaptSettings
from nabla_convert.io import atomic_write_text, read_prompts
from nabla_convert.models import family_of


def teacher_rollouts(
    root: Path,
    teacher: DenseTeacher,
    settings: AdaptSettings,
    sampler: TimestepSampler,
    sample_shape: tuple[int, ...],
    accelerator: Accelerator,
    folder: Path,
    progress: bool = True,
) -> None:
    """A latent dataset made by the dense teacher: prompts encoded, then Euler steps from noise.

    Each process makes one contiguous share of the prompts into its own shard, so the dataset is the
    same for any process count; done.json marks completion, so a resumed run reuses it.
    """
    if (folder / "done.json").is_file():
        return
    if not settings.prompts:
        raise AdaptError("distillation without --data needs prompts to make teacher rollouts (--prompts FILE)")
    try:
        prompts = read_prompts(settings.prompts)
    except FileNotFoundError as err:
        raise AdaptError(str(err)) from None
    if len(prompts) < 2:
        raise AdaptError(f"{settings.prompts} needs at least 2 prompts (one is held out), found {len(prompts)}")
    if not (root / "text_encoder").is_dir():
        raise AdaptError(f"{root} has no text_encoder to encode prompts; pass a latent dataset with --data")
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(prompts) < world:
        raise AdaptError(
            f"{settings.prompts} has {len(prompts)} prompts for {world} processes; give each one at least one"
        )
    mine = range(len(prompts) * rank // world, len(prompts) * (rank + 1) // world)  # shards in prompt order
    family = family_of(teacher.student)
    encoder = family.load_text_encoder(root, device)
    embeds = family.encode_prompts(encoder, [prompts[i] for i in mine], settings.text_length)
    del encoder
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sampler.shift)
    latents = []
    for row, index in enumerate(
        tqdm(mine, desc="teacher rollouts", disable=not (progress and accelerator.is_local_main_process))
    ):
        x = torch.randn((1, *sample_shape), generator=step_generator(settings.seed, -2, index)).to(device)
        scheduler.set_timesteps(settings.rollout_steps, device=device)
        for t in scheduler.timesteps:
            with accelerator.autocast():
                v = teacher(x, t.expand(1), take(embeds, slice(row, row + 1)))
            x = scheduler.step(v.float(), t, x).prev_sample
        latents.append(x.cpu())
    write_latent_shard(folder / f"shard-{accelerator.process_index:05d}.safetensors", torch.cat(latents), embeds)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(folder / "done.json", json.dumps({"prompts": len(prompts)}) + "\n")
    accelerator.wait_for_everyone()
