"""Image and latent similarity of B against A: PSNR and SSIM (gaussian window, valid region)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; infinite when the tensors are identical."""
    mse = float(torch.mean((reference.double() - test.double()) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (structural similarity, IEEE TIP 2004) of images (N, C, H, W): gaussian window, per channel, valid region only.

    Images smaller than the window use the largest odd window that fits, so tiny latents still count.
    """
    if reference.shape != test.shape or reference.dim() != 4:
        raise ValueError(f"ssim expects two (N, C, H, W) tensors of one shape, got {reference.shape} and {test.shape}")
    x, y = reference.double(), test.double()
    channels = x.shape[1]
    size = min(window, *x.shape[-2:])
    size -= 1 - size % 2
    kernel = gaussian_window(size, sigma)

    def blur(image: torch.Tensor) -> torch.Tensor:
        rows = F.conv2d(image, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, size), groups=channels)
        return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, size, 1), groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def compare_latents(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of latents (C, F, H, W), frame by frame, with A's value range as the peak."""
    data_range = float(a.max() - a.min())
    frames_a, frames_b = a.transpose(0, 1), b.transpose(0, 1)
    return psnr(frames_a, frames_b, data_range), ssim(frames_a, frames_b, data_range)


def compare_videos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of decoded videos (F, C, H, W) in [0, 1]."""
    return psnr(a, b, 1.0), ssim(a, b, 1.0)
