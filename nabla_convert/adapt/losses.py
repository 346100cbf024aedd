"""Adaptation losses: distillation from the dense teacher, and flow matching on latents.

The teacher is the same base weights with dense attention. With LoRA the student's own frozen base
serves (adapters disabled, `nabla_disabled`), so it costs no memory; a full fine-tune keeps a frozen
dense copy (the family's stock transformer class on the same folder: raster order, dense attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from nabla_convert.flow import per_sample_mse, velocity_target
from nabla_convert.models import family_of
from nabla_convert.models.nabla import nabla_disabled

LossKind = Literal["distill", "flow"]
LOSSES = ("distill", "flow")


def velocity(
    model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor
) -> torch.Tensor:
    """The transformer's flow-matching velocity prediction (noise - x_0) at `timesteps` (its family's denoising call).

    `model` may be wrapped for distributed training (DDP's `.module`); the call goes through the wrapper.
    """
    return family_of(getattr(model, "module", model)).velocity(model, noisy, timesteps, prompt_embeds)


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run a peft-adapted diffusers model on its base weights alone inside the block."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


class DenseTeacher:
    """Dense velocity of the base weights, without gradients.

    `frozen` is a separate dense model (full fine-tune); None means the student itself with its
    LoRA adapters disabled and NABLA off (the base weights are untouched by training).
    """

    def __init__(self, student: torch.nn.Module, frozen: torch.nn.Module | None = None) -> None:
        self.student = student
        self.frozen = frozen

    @torch.no_grad()
    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            return velocity(self.frozen, noisy, timesteps, prompt_embeds)
        with adapters_disabled(self.student), nabla_disabled(self.student):
            return velocity(self.student, noisy, timesteps, prompt_embeds)


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting_scheme: str
) -> torch.Tensor:
    """Mean over the batch of the SD3-weighted per-sample MSE (weights from compute_loss_weighting_for_sd3)."""
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas=sigmas).to(prediction.device)
    return (weighting.float() * per_sample_mse(prediction, target)).mean()


def loss_target(
    kind: LossKind,
    teacher: DenseTeacher,
    latents: torch.Tensor,
    noise: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
) -> torch.Tensor:
    """What the student's velocity is pulled to: the dense teacher's (distill) or noise - x_0 (flow)."""
    if kind == "distill":
        return teacher(noisy, timesteps, prompt_embeds)
    if kind == "flow":
        return velocity_target(latents, noise)
    raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def relative_error(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample ||prediction - reference||^2 / ||reference||^2, float32 (B,)."""
    diff = (prediction.float() - reference.float()).pow(2).flatten(1).sum(1)
    return diff / reference.float().pow(2).flatten(1).sum(1).clamp(min=1e-12)
