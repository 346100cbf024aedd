"""The flow-matching objective, defined once for the reference model's training, adapt and eval.

Conventions follow diffusers' FlowMatchEulerDiscreteScheduler and diffusers' flow-matching training scripts: the noisy sample at
noise level sigma is x_t = (1 - sigma) x_0 + sigma * noise, and the transformer predicts the velocity noise - x_0.
"""

from __future__ import annotations

import torch


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x_0 + sigma noise, one sigma per sample (sigmas (B,))."""
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents)
    return (1 - sigmas) * latents + sigmas * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer predicts at every noise level: noise - x_0."""
    return noise - latents


def weighted_mean(values: torch.Tensor, weight: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of `values` over `dim` (all dims when None) with `weight` broadcast to them, e.g. object pixels counted
    1 + W times (the reference model's flow-matching and VAE losses)."""
    weight = weight.float().expand_as(values)
    return (weight * values).sum(dim=dim) / weight.sum(dim=dim)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (B,), in float32; `weight` (broadcast to the samples) makes it a weighted mean."""
    error = (prediction.float() - target.float()).square()
    if weight is None:
        return error.flatten(1).mean(1)
    return weighted_mean(error, weight, dim=tuple(range(1, error.ndim)))
