"""Validation of an adapt run: fixed held-out samples, noise and noise levels, with cached teacher velocities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from nabla_convert.adapt.data import Conditioning, step_generator, take
from nabla_convert.adapt.losses import relative_error, velocity
from nabla_convert.adapt.settings import AdaptSettings
from nabla_convert.flow import add_noise, per_sample_mse, velocity_target
from nabla_convert.models.nabla import layer_densities, reset_densities


@dataclass
class ValidationSet:
    """Fixed held-out samples, noise and noise levels (spread over the range), with cached teacher velocities."""

    latents: torch.Tensor
    conditioning: Conditioning
    noise: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    teacher: torch.Tensor

    @classmethod
    def build(cls, dataset, heldout, settings, sampler, teacher, accelerator) -> ValidationSet:
        count = settings.validation_samples
        batch = dataset.batch([heldout[i % len(heldout)] for i in range(count)])
        noise = torch.randn(batch["latents"].shape, generator=step_generator(settings.seed, -3))
        sigmas, timesteps = sampler.at((torch.arange(count) + 0.5) / count)
        noisy = add_noise(batch["latents"], noise, sigmas)
        conditioning = dataset.conditioning(batch)
        outputs = []
        for chunk in range(0, count, settings.batch_size):
            part = slice(chunk, chunk + settings.batch_size)
            inputs = (
                *(t[part].to(accelerator.device) for t in (noisy, timesteps)),
                take(conditioning, part, accelerator.device),
            )
            with accelerator.autocast():
                prediction = teacher(*inputs)
            outputs.append(prediction.float().cpu())
        return cls(batch["latents"], conditioning, noise, sigmas, timesteps, torch.cat(outputs))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, settings: AdaptSettings, accelerator: Accelerator) -> dict[str, float]:
        """Student-vs-teacher relative error, held-out loss of the training objective, mean block density."""
        reset_densities(model)
        errors, losses = [], []
        noisy = add_noise(self.latents, self.noise, self.sigmas)
        for chunk in range(0, len(self.latents), settings.batch_size):
            part = slice(chunk, chunk + settings.batch_size)
            device = accelerator.device
            inputs = (*(t[part].to(device) for t in (noisy, self.timesteps)), take(self.conditioning, part, device))
            with accelerator.autocast():
                prediction = velocity(model, *inputs).float().cpu()
            flow = velocity_target(self.latents[part], self.noise[part])
            target = self.teacher[part] if settings.loss == "distill" else flow
            errors.append(relative_error(prediction, self.teacher[part]))
            losses.append(per_sample_mse(prediction, target))
        densities = layer_densities(model)
        return {
            "student_teacher_error": float(torch.cat(errors).mean()),
            "heldout_loss": float(torch.cat(losses).mean()),
            "density": sum(densities.values()) / max(len(densities), 1),
        }
