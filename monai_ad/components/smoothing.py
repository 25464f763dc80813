"""Gaussian smoothing on the device, one implementation for every map and every synthesis step.

- ``gaussian_kernel1d``: scipy.ndimage's 1-D weights.
- ``gaussian_blur2d`` / ``GaussianBlur2d``: ``scipy.ndimage.gaussian_filter`` (mode ``reflect``) over the last two axes.
- ``smooth_inside``: normalised convolution, a Gaussian that reads only pixels inside a mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, radius: int | None = None) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian weights (radius ``int(truncate·σ + 0.5)`` unless given), normalised, float32."""
    if radius is None:
        radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (kernel / kernel.sum()).float()


def _reflect_index(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of scipy's ``reflect`` (half-sample symmetric: ``d c b a | a b c d | d c b a``) extension,
    valid for any ``radius``, also larger than ``size``."""
    index = torch.arange(-radius, size + radius, device=device)
    period = 2 * size
    index = torch.remainder(index, period)
    return torch.where(index < size, index, period - 1 - index)


def gaussian_blur2d(
    x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0, kernel: torch.Tensor | None = None
) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)`` over the last two axes of
    ``x [..., H, W]``, as two 1-D convolutions on ``x``'s device (float32 in, float32 out)."""
    if sigma <= 0:
        return x
    if kernel is None:
        kernel = gaussian_kernel1d(sigma, truncate)
    kernel = kernel.to(device=x.device, dtype=torch.float32)
    radius = (kernel.numel() - 1) // 2
    shape = x.shape
    h, w = shape[-2:]
    y = x.reshape(-1, 1, h, w).float()
    y = y.index_select(3, _reflect_index(w, radius, y.device))
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    y = y.index_select(2, _reflect_index(h, radius, y.device))
    y = F.conv2d(y, kernel.view(1, 1, -1, 1))
    return y.reshape(shape)


class GaussianBlur2d(nn.Module):
    """Module form of ``gaussian_blur2d`` (σ in pixels; the kernel is a non-persistent buffer)."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0):
        super().__init__()
        self.sigma, self.truncate = float(sigma), float(truncate)
        kernel = gaussian_kernel1d(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_blur2d(x, self.sigma, self.truncate, self.kernel) if self.sigma > 0 else x

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, truncate={self.truncate}"


def smooth_inside(image: torch.Tensor, roi: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Gaussian smoothing of ``[B, 1, H, W]`` that uses only pixels inside ``roi`` (normalised convolution, zero
    outside the slice), with the 1-D ``kernel`` along both axes."""
    weight = roi.to(image.dtype)
    k = kernel.to(image.device, image.dtype)
    pad = len(k) // 2
    stacked = torch.cat([image * weight, weight], 1).reshape(-1, 1, *image.shape[-2:])  # [2B, 1, H, W]
    stacked = F.conv2d(F.pad(stacked, (0, 0, pad, pad), mode="constant"), k.view(1, 1, -1, 1))
    stacked = F.conv2d(F.pad(stacked, (pad, pad, 0, 0), mode="constant"), k.view(1, 1, 1, -1))
    stacked = stacked.reshape(image.shape[0], 2, *image.shape[-2:])
    return stacked[:, :1] / stacked[:, 1:].clamp_min(1e-6)
