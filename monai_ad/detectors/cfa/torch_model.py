"""CFA's network and formulas (Lee, Lee, Song, "CFA: Coupled-hypersphere-based Feature Adaptation for
Target-Oriented Anomaly Localization", IEEE Access 2022): the patch descriptor, the hypersphere loss and the score.

- ``patch_features``: each frozen level 3×3 average-pooled (stride 1), resized to the finest level's grid and
  concatenated over channels.
- ``PatchDescriptor``: a CoordConv 1×1 (Liu et al. 2018: two coordinate channels in [−1, 1] appended before the
  convolution) from the patch features to ``channels // gamma_d`` target-oriented features.
- ``squared_distances``: every position's squared Euclidean distance to every memory item.
- ``hypersphere_loss``: attraction of each feature to its ``nearest`` memory items (max(0, d − r²)) plus repulsion
  from the next ``hard_negatives`` items (max(0, r² − d − margin)), means, times 1000.
- ``softmin_nearest_score``: √d to the ``nearest`` items (the square root taken after choosing them, the same order),
  softmin-weighted: the nearest distance times its softmin weight.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOSS_SCALE = 1000.0  # the reference's factor on the summed loss terms


def patch_features(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, Σ C_l, h_0, w_0]``: each level average-pooled over 3×3 neighbours, bilinearly resized to level 0's grid."""
    grid = levels[0].shape[-2:]
    pooled = [F.avg_pool2d(level.float(), 3, 1, 1) for level in levels]
    resized = [p if p.shape[-2:] == grid else F.interpolate(p, size=grid, mode="bilinear", align_corners=False)
               for p in pooled]  # fmt: skip
    return torch.cat(resized, dim=1)


class PatchDescriptor(nn.Module):
    """CoordConv 1×1: ``[B, C, h, w]`` with x and y coordinate channels in [−1, 1] → ``[B, out_channels, h, w]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        ys = torch.linspace(-1, 1, height, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1, 1, width, device=features.device, dtype=features.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coordinates = torch.stack([grid_x, grid_y]).expand(batch, -1, -1, -1)
        return self.conv(torch.cat([features, coordinates], dim=1))


def squared_distances(features: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``[B, h·w, M]``: squared Euclidean distances of each position of ``features [B, D, h, w]`` to each row of
    ``memory [M, D]``, as ‖f‖² + ‖c‖² − 2 f·c (rounding may leave tiny negatives; the score clamps the few it
    reads). Without gradients the sums are added in place, so only the ``[B, h·w, M]`` product is allocated."""
    rows = features.flatten(2).transpose(1, 2).float()  # [B, h·w, D]
    memory = memory.float()
    cross = rows @ memory.t()
    if torch.is_grad_enabled() and (rows.requires_grad or memory.requires_grad):
        return rows.pow(2).sum(-1, keepdim=True) + memory.pow(2).sum(-1) - 2 * cross
    return cross.mul_(-2).add_(rows.pow(2).sum(-1, keepdim=True)).add_(memory.pow(2).sum(-1))


def hypersphere_loss(
    distances: torch.Tensor, nearest: int, hard_negatives: int, radius: float, margin: float = 0.1
) -> torch.Tensor:
    """The coupled-hypersphere loss of ``squared_distances`` ``[B, N, M]`` (module docstring)."""
    closest = distances.topk(min(nearest + hard_negatives, distances.shape[-1]), dim=-1, largest=False).values
    attraction = (closest[..., :nearest] - radius**2).clamp_min(0).mean()
    negatives = closest[..., nearest : nearest + hard_negatives]
    repulsion = (radius**2 - negatives - margin).clamp_min(0).mean() if negatives.numel() else closest.new_zeros(())
    return LOSS_SCALE * (attraction + repulsion)


def softmin_nearest_score(distances: torch.Tensor, nearest: int) -> torch.Tensor:
    """``[B, N]``: of the ``nearest`` smallest √distances per position, the nearest weighted by its softmin weight."""
    closest = distances.topk(min(nearest, distances.shape[-1]), dim=-1, largest=False).values.clamp_min(0).sqrt()
    return F.softmin(closest, dim=-1)[..., 0] * closest[..., 0]
