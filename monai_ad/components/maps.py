"""From scores to maps and back: patch grids to pixel maps, ROI-restricted slice scores.

- ``PatchScoreMap``: a patch-score grid → a pixel map (bilinear upsampling + Gaussian blur, as two matrix products).
- ``roi_on_grid`` / ``max_in_roi`` / ``max_in_roi_map`` / ``mean_in_roi`` / ``mean_in_roi_map``: slice scores from the
  patches or pixels inside the ROI.
- ``cosine_distance_map``: the teacher–student map of the distillation detectors (RD4AD, STFPM, MKD).
- ``square_windows``: a square of each slice at given positions (training crops and windows).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_ad.components.smoothing import _reflect_index, gaussian_kernel1d

MAP_MODES = ("sum", "multiply")


def upsample_blur_matrix(
    size_in: int, size_out: int, sigma: float = 4.0, truncate: float = 4.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[size_out, size_in]``: 1-D linear upsampling (``align_corners=False``, as ``F.interpolate``) followed by
    the Gaussian blur of ``gaussian_blur2d`` (reflect borders), as one matrix. Both steps are linear and
    separable, so ``M_h · grid · M_wᵀ`` equals bilinear upsampling of ``grid`` followed by the 2-D blur."""
    basis = torch.eye(size_in, dtype=torch.float64)[:, None, :]  # size_in signals of length size_in
    up = F.interpolate(basis, size=size_out, mode="linear", align_corners=False)[:, 0]  # [size_in, size_out]
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma, truncate).double()
        radius = (kernel.numel() - 1) // 2
        padded = up.index_select(1, _reflect_index(size_out, radius, up.device))
        up = F.conv1d(padded[:, None], kernel.view(1, 1, -1))[:, 0]
    return up.t().contiguous().to(device=device, dtype=torch.float32)


class PatchScoreMap(nn.Module):
    """Patch scores ``[B, h, w]`` → pixel map ``[B, image_size, image_size]``: bilinear upsampling
    (``align_corners=False``) then a Gaussian blur of ``sigma`` pixels (the PatchCore/SimpleNet anomaly map), as two
    matrix products; the per-axis matrices are cached per grid size and device."""

    def __init__(self, image_size: int, sigma: float = 4.0):
        super().__init__()
        self.image_size, self.sigma = int(image_size), float(sigma)
        self._matrices: dict[tuple, torch.Tensor] = {}

    def _matrix(self, size_in: int, device: torch.device) -> torch.Tensor:
        key = (size_in, str(device))
        if key not in self._matrices:
            self._matrices[key] = upsample_blur_matrix(size_in, self.image_size, self.sigma, device=device)
        return self._matrices[key]

    def forward(self, grid_scores: torch.Tensor) -> torch.Tensor:
        h, w = grid_scores.shape[-2:]
        rows, cols = self._matrix(h, grid_scores.device), self._matrix(w, grid_scores.device)
        return rows @ grid_scores.float() @ cols.t()

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, sigma={self.sigma}"


def roi_on_grid(roi: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
    """Which cells of an ``h×w`` patch grid overlap the ROI ``[B, 1, H, W]``: ``[B, h·w]`` bool (or None)."""
    if roi is None:
        return None
    return (F.adaptive_max_pool2d(roi.float(), grid) > 0).flatten(1)


def max_in_roi(scores: torch.Tensor, roi_grid: torch.Tensor | None) -> torch.Tensor:
    """Per-slice maximum of patch scores ``[B, N]`` over the patches in the ROI; a slice without any ROI
    patch falls back to all its patches."""
    if roi_grid is None:
        return scores.amax(1)
    keep = roi_grid | ~roi_grid.any(1, keepdim=True)
    return torch.where(keep, scores, torch.full_like(scores, -math.inf)).amax(1)


def max_in_roi_map(pixel: torch.Tensor, roi: torch.Tensor | None) -> torch.Tensor:
    """Per-slice maximum of pixel maps ``[B, H, W]`` inside the ROI ``[B, 1, H, W]`` (``max_in_roi`` on pixels:
    a slice without ROI pixels falls back to its whole map). The slice score of PaDiM and RD4AD."""
    return max_in_roi(pixel.flatten(1), None if roi is None else roi[:, 0].flatten(1) > 0)


def mean_in_roi(scores: torch.Tensor, roi_grid: torch.Tensor | None) -> torch.Tensor:
    """Per-slice mean of scores ``[B, N]`` over the patches in the ROI; a slice without any ROI patch falls back
    to all its patches (the mean twin of ``max_in_roi``)."""
    if roi_grid is None:
        return scores.mean(1)
    keep = (roi_grid | ~roi_grid.any(1, keepdim=True)).float()
    return (scores * keep).sum(1) / keep.sum(1)


def mean_in_roi_map(pixel: torch.Tensor, roi: torch.Tensor | None) -> torch.Tensor:
    """Per-slice mean of pixel maps ``[B, H, W]`` inside the ROI ``[B, 1, H, W]`` (``mean_in_roi`` on pixels: a
    slice without ROI pixels falls back to its whole map). DDAD's slice score."""
    return mean_in_roi(pixel.flatten(1), None if roi is None else roi[:, 0].flatten(1) > 0)


def cosine_distance_map(
    teacher_maps: Sequence[torch.Tensor],
    student_maps: Sequence[torch.Tensor],
    size: int,
    mode: str = "sum",
    align_corners: bool = False,
) -> torch.Tensor:
    """``[B, size, size]`` float32: per level 1 − the per-pixel cosine of teacher and student features (over
    channels), bilinearly upsampled and combined over levels by ``mode`` (``"sum"`` or ``"multiply"``).

    For channel-normalised features 1 − cos(t, s) = ½‖t̂ − ŝ‖², so this is also STFPM's per-level map."""
    if mode not in MAP_MODES:
        raise ValueError(f"mode must be one of {MAP_MODES}, got {mode!r}")
    combined = None
    for t, s in zip(teacher_maps, student_maps):
        distance = 1 - F.cosine_similarity(t.float(), s.float(), dim=1)  # [B, h, w]
        distance = F.interpolate(distance[:, None], size=(size, size), mode="bilinear", align_corners=align_corners)
        distance = distance[:, 0]
        if combined is None:
            combined = distance
        elif mode == "sum":
            combined = combined + distance
        else:
            combined = combined * distance
    return combined


def square_windows(image: torch.Tensor, top_left: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, size, size]``: the square of each slice ``[B, C, H, W]`` whose top-left pixel is ``top_left``
    ``[B, 2]`` (row, col; long, the whole square inside the slice)."""
    offsets = torch.arange(size, device=image.device)
    rows = (top_left[:, 0, None] + offsets)[:, None, :, None]
    cols = (top_left[:, 1, None] + offsets)[:, None, None, :]
    batch = torch.arange(image.shape[0], device=image.device)[:, None, None, None]
    channels = torch.arange(image.shape[1], device=image.device)[None, :, None, None]
    return image[batch, channels, rows, cols]
