"""The reference model's flow-matching loss, shared by its training script and by held-out evaluation.

The objective is nabla_convert.flow's; the transformer is called at timestep 1000 * sigma, and latents are
normalised with the VAE config's latents_mean / latents_std exactly as WanPipeline undoes it before decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nabla_convert.flow import add_noise, per_sample_mse, velocity_target

HELDOUT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def normalise_latents(vae, videos: torch.Tensor) -> torch.Tensor:
    """VAE latents (posterior mode) of videos in [-1, 1], scaled the way WanPipeline expects its latents."""
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=videos.device).view(1, z_dim, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=videos.device).view(1, z_dim, 1, 1, 1)
    latents = vae.encode(videos.to(vae.dtype)).latent_dist.mode().float()
    return (latents - mean) / std


def latent_coverage(coverage: torch.Tensor, temporal: int = 4, spatial: int = 8) -> torch.Tensor:
    """Object coverage of pixels (B, T, H, W) on the VAE's latent grid, (B, 1, 1 + (T - 1) // temporal, H // spatial,
    W // spatial): the most covered pixel of each latent cell (frame 0 alone, then groups of `temporal` frames, as
    the causal VAE encodes them)."""
    rest = coverage[:, 1:].unflatten(1, (-1, temporal)).amax(dim=2)
    frames = torch.cat([coverage[:, :1], rest], dim=1)
    return F.max_pool2d(frames, spatial).unsqueeze(1)


def shifted_sigmas(uniform: torch.Tensor, shift: float) -> torch.Tensor:
    """Map values in (0, 1) to noise levels with the scheduler's timestep shift (more weight on high noise)."""
    return shift * uniform / (1 + (shift - 1) * uniform)


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    weight: torch.Tensor | None = None,
    velocity=None,
) -> torch.Tensor:
    """Per-sample mean squared error of the velocity prediction at noise levels `sigmas` (shape (B,)).

    `weight` (broadcast to the latents, e.g. (B, 1, T, H, W)) makes it a weighted mean per sample.
    `velocity(transformer, noisy, timesteps, prompt_embeds)` is the denoising call of the model's family
    (default: the Wan transformer's keyword call); it receives `prompt_embeds` as given.
    """
    dtype = getattr(transformer, "module", transformer).dtype  # the model, also inside a DistributedDataParallel
    noisy = add_noise(latents, noise, sigmas)
    if velocity is None:
        prediction = transformer(
            hidden_states=noisy.to(dtype),
            timestep=sigmas * 1000,
            encoder_hidden_states=prompt_embeds.to(dtype),
            return_dict=False,
        )[0]
    else:
        prediction = velocity(transformer, noisy.to(dtype), sigmas * 1000, prompt_embeds)
    return per_sample_mse(prediction, velocity_target(latents, noise), weight)


@torch.no_grad()
def heldout_loss(pipe, videos: torch.Tensor, prompts: list[str], seed: int = 0) -> float:
    """Mean flow-matching loss of pipe.transformer on the given clips at fixed noise levels and fixed noise.

    The same (videos, prompts, seed) give the same noise for every pipeline, so two models compare on equal terms.
    """
    device = pipe.transformer.device
    generator = torch.Generator("cpu").manual_seed(seed)
    losses = []
    for video, prompt in zip(videos, prompts, strict=True):
        latents = normalise_latents(pipe.vae, video[None].to(device))
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device)
        sigmas = torch.tensor(HELDOUT_SIGMAS, device=device)
        noise = torch.randn((len(sigmas), *latents.shape[1:]), generator=generator).to(device)
        batch = latents.expand(len(sigmas), -1, -1, -1, -1)
        losses.append(flow_matching_loss(pipe.transformer, batch, embeds.expand(len(sigmas), -1, -1), sigmas, noise))
    return torch.cat(losses).mean().item()
