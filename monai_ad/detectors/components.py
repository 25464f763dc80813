"""Pieces shared by the feature-based detectors: patch embedding, coreset sampling, smoothing, pixel maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbedding(nn.Module):
    """Locally aware patch features from several backbone layers (PatchCore / SimpleNet, METHODS §0).

    Each layer map ``[B, C, h, w]`` is unfolded into 3×3 neighbourhoods (stride 1, padding 1); deeper grids
    are bilinearly resized to the first layer's grid (``align_corners=False``); each layer's flattened
    ``(C, 3, 3)`` patch is average-pooled to ``pre_dim`` (1-D adaptive pooling), the layers are stacked and
    pooled again to ``target_dim``. No learned projection.

    Returns ``[B, h·w, target_dim]`` and the grid size ``(h, w)``.
    """

    def __init__(self, pre_dim: int, target_dim: int, patch_size: int = 3):
        super().__init__()
        self.pre_dim, self.target_dim, self.patch_size = pre_dim, target_dim, patch_size

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = features[0].shape[-2:]
        pooled = []
        pad = (self.patch_size - 1) // 2
        for feature in features:
            b, c = feature.shape[:2]
            if feature.shape[-2:] != grid:
                feature = F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            # [B, C·k·k, h·w] in (C, kh, kw) order → [B·h·w, 1, C·k·k]
            patches = F.unfold(feature, kernel_size=self.patch_size, padding=pad, stride=1)
            patches = patches.transpose(1, 2).reshape(-1, 1, c * self.patch_size**2)
            pooled.append(F.adaptive_avg_pool1d(patches, self.pre_dim))
        stacked = torch.cat(pooled, dim=1).reshape(-1, 1, len(features) * self.pre_dim)
        out = F.adaptive_avg_pool1d(stacked, self.target_dim)
        return out.reshape(features[0].shape[0], grid[0] * grid[1], self.target_dim), (int(grid[0]), int(grid[1]))


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    projection_dim: int = 128,
    n_starts: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
    chunk: int = 1 << 20,
) -> torch.Tensor:
    """Indices of an approximate greedy k-center coreset (PatchCore's official variant).

    Features are projected to ``projection_dim`` by a random bias-free linear map; ``n_starts`` random points
    seed the anchor distances (each point's mean distance to them); then ``⌊ratio·N⌋`` times the farthest point
    is picked and every anchor distance becomes the minimum of itself and the distance to the new pick.
    """
    n = features.shape[0]
    k = max(1, int(math.floor(ratio * n)))
    if k >= n:
        return torch.arange(n)
    device = torch.device(device) if device is not None else features.device
    gen = torch.Generator().manual_seed(seed)
    dim = features.shape[1]
    projection = torch.randn(dim, projection_dim, generator=gen) / math.sqrt(dim) if projection_dim < dim else None
    projected = []
    for start in range(0, n, chunk):
        block = features[start : start + chunk].to(device, torch.float32)
        projected.append(block @ projection.to(device) if projection is not None else block)
    points = torch.cat(projected)
    norms = points.square().sum(1)
    starts = torch.randperm(n, generator=gen)[: min(n_starts, n)].to(device)
    # squared distances throughout: argmax and min are unchanged, and a matrix-vector product per pick reads
    # the points once (memory-bound on the CPU)
    anchor = torch.cdist(points, points[starts]).mean(dim=1).square_()
    picked = torch.empty(k, dtype=torch.long, device=device)
    for i in range(k):
        index = torch.argmax(anchor)
        picked[i] = index
        distance = torch.mv(points, points[index]).mul_(-2.0).add_(norms).add_(norms[index]).clamp_min_(0.0)
        torch.minimum(anchor, distance, out=anchor)
    return picked.cpu()


class GaussianBlur2d(nn.Module):
    """Separable Gaussian blur of ``[B, 1, H, W]`` maps on their device (reflect padding, truncate 4σ, as
    ``scipy.ndimage.gaussian_filter`` with ``mode="reflect"``)."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0):
        super().__init__()
        radius = int(truncate * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.radius
        k = self.kernel.to(x.dtype)
        # scipy's "reflect" repeats the edge sample (half-sample symmetric), which is torch's "symmetric"
        x = _symmetric_pad(x, r)
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        return F.conv2d(x, k.view(1, 1, -1, 1))


def _symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if r <= min(h, w):
        left, right = x[..., :, :r].flip(-1), x[..., :, w - r :].flip(-1)
        x = torch.cat([left, x, right], dim=-1)
        top, bottom = x[..., :r, :].flip(-2), x[..., h - r :, :].flip(-2)
        return torch.cat([top, x, bottom], dim=-2)
    return F.pad(x, (r, r, r, r), mode="replicate")


class PatchScoreMap(nn.Module):
    """Patch-score grid ``[B, h, w]`` → pixel map ``[B, H, W]``: bilinear upsampling, then Gaussian σ."""

    def __init__(self, image_size: int, sigma: float = 4.0):
        super().__init__()
        self.image_size = image_size
        self.blur = GaussianBlur2d(sigma) if sigma > 0 else nn.Identity()

    def forward(self, grid_scores: torch.Tensor) -> torch.Tensor:
        maps = F.interpolate(grid_scores[:, None].float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.blur(maps)[:, 0]


def roi_on_grid(roi: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
    """Which patches of an ``h×w`` grid overlap the ROI ``[B, 1, H, W]``: ``[B, h·w]`` bool."""
    if roi is None:
        return None
    return (F.adaptive_max_pool2d(roi.float(), grid) > 0).flatten(1)


def max_in_roi(scores: torch.Tensor, roi_grid: torch.Tensor | None) -> torch.Tensor:
    """Per-slice maximum of patch scores ``[B, N]`` over the patches in the ROI (all patches where none is)."""
    if roi_grid is None:
        return scores.amax(1)
    has_roi = roi_grid.any(1, keepdim=True)
    masked = torch.where(roi_grid | ~has_roi, scores, torch.full_like(scores, -torch.inf))
    return masked.amax(1)
