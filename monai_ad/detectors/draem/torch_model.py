"""DRAEM's networks and loss: the reconstructive encoder–decoder, the discriminative U-Net and the focal loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3×3 convolutions, each followed by BatchNorm and ReLU (DRAEM's building block)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )  # fmt: skip


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear ×2 upsampling, then a 3×3 convolution with BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )  # fmt: skip


def level_widths(base: int, levels: int) -> list[int]:
    """``base · 2^l`` per level, capped at ``8 · base`` (DRAEM's b, 2b, 4b, 8b, 8b, …)."""
    return [base * min(2**level, 8) for level in range(levels)]


class Encoder(nn.Module):
    """``conv_block`` per level with 2×2 max pooling between levels; returns every level's output."""

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        channels = [in_channels, *widths]
        self.blocks = nn.ModuleList(conv_block(a, b) for a, b in zip(channels[:-1], channels[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x if index == 0 else F.max_pool2d(x, 2))
            outputs.append(x)
        return outputs


class ReconstructiveSubNetwork(nn.Module):
    """An encoder–decoder without skip connections (5 levels, widths b … 8b): the slice with the anomaly
    removed, as it was before synthesis; a linear output layer (no activation), as DRAEM's."""

    LEVELS = 5

    def __init__(self, channels: int = 1, base_width: int = 128):
        super().__init__()
        widths = level_widths(base_width, self.LEVELS)
        self.encoder = Encoder(channels, widths)
        self.decoder = nn.ModuleList(
            nn.Sequential(up_block(widths[level], widths[level]), conv_block(widths[level], widths[level - 1]))
            for level in range(self.LEVELS - 1, 0, -1)
        )
        self.output = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(x)[-1]
        for block in self.decoder:
            y = block(y)
        return self.output(y)


class DiscriminativeSubNetwork(nn.Module):
    """A U-Net (6 levels, widths b … 8b, skip connections) on the slice and its reconstruction stacked over
    channels; two output channels, background and anomaly logits."""

    LEVELS = 6

    def __init__(self, in_channels: int = 2, base_width: int = 64, out_channels: int = 2):
        super().__init__()
        widths = level_widths(base_width, self.LEVELS)
        self.encoder = Encoder(in_channels, widths)
        deepest_first = range(self.LEVELS - 1, 0, -1)
        self.up = nn.ModuleList(up_block(widths[level], widths[level - 1]) for level in deepest_first)
        self.merge = nn.ModuleList(conv_block(2 * widths[level - 1], widths[level - 1]) for level in deepest_first)
        self.output = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)
        y = skips[-1]
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            y = merge(torch.cat([up(y), skip], 1))
        return self.output(y)


class DraemModel(nn.Module):
    """Both sub-networks: ``forward(x)`` gives ``(reconstruction, anomaly logits [B, 2, H, W])``."""

    def __init__(self, channels: int = 1, reconstruction_width: int = 128, discriminator_width: int = 64):
        super().__init__()
        self.reconstructive = ReconstructiveSubNetwork(channels, reconstruction_width)
        self.discriminative = DiscriminativeSubNetwork(2 * channels, discriminator_width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.reconstructive(x)
        return reconstruction, self.discriminative(torch.cat([x, reconstruction], 1))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Mean over pixels of ``−(1 − p_t)^γ · log p_t``, ``p_t`` the softmax probability of the true class (``target``
    ``[B, 1, H, W]``, 1 = anomaly) — the focal loss of DRAEM's discriminative sub-network."""
    probability = torch.softmax(logits.float(), 1)
    true_class = target.long().clamp(0, logits.shape[1] - 1)
    p_true = probability.gather(1, true_class).clamp(eps, 1.0)
    return (-((1 - p_true) ** float(gamma)) * p_true.log()).mean()


class DraemLoss(nn.Module):
    """``L2(reconstruction, slice) + (1 − SSIM)(reconstruction, slice) + focal(logits, mask)``: the reconstruction
    is compared with the slice before synthesis (SSIM with an 11-pixel Gaussian window, σ = 1.5, on the ``[0, 1]``
    range, ``monai.losses.SSIMLoss``)."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = float(gamma)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=11, kernel_sigma=1.5)

    def forward(self, reconstruction: torch.Tensor, original: torch.Tensor, logits: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        reconstruction, original = reconstruction.float(), original.float()
        return (
            F.mse_loss(reconstruction, original) + self.ssim(reconstruction, original)
            + focal_loss(logits, mask, self.gamma)
        )  # fmt: skip
