"""Where a radiologist's correction lands on a detector's feature grid (PatchCore, PaDiM and the fused detector's
feature part share it).

A correction is a pixel mask of normal tissue the model flagged (an erased false positive) on slices of the model's
own grid. A feature position takes it when at least half of its cell lies under the mask (the average of
``adaptive_avg_pool2d``, the pooling that ``roi_on_grid`` uses with a maximum); a slice whose mask covers no cell
that far gives its best-covered cell, so a small region still teaches something. Positions within one feature cell of
an ``avoid`` pixel (a lesion the saved label keeps) are left out, so a lesion's border is never taught as normal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monai_ad.components.maps import roi_on_grid
from monai_ad.errors import InputError

HALF_CELL = 0.5


def check_correction(detector, image: torch.Tensor, mask: torch.Tensor, avoid: torch.Tensor | None) -> None:
    """``InputError`` unless the detector is fitted and ``mask`` / ``avoid`` are ``[B, 1, H, W]`` beside ``image``."""
    if not detector.is_fitted:
        raise InputError(f"the {detector.name} detector is not fitted; train it before adding corrections")
    detector.check_slices(image)
    expected = (image.shape[0], 1, *image.shape[-2:])
    for name, value in (("mask", mask), ("avoid", avoid)):
        if value is not None and tuple(value.shape) != expected:
            raise InputError(f"{detector.name}: the correction {name} must be {list(expected)}, got {list(value.shape)}")


def correction_positions(
    mask: torch.Tensor, grid: tuple[int, int], roi: torch.Tensor | None = None, avoid: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, h·w]`` bool: the feature positions of an ``h×w`` grid that the pixel ``mask`` ``[B, 1, H, W]`` marks
    normal (see the module docstring), inside the ROI's cells and at least one cell away from ``avoid``."""
    coverage = F.adaptive_avg_pool2d(mask.float(), grid).flatten(1)  # [B, h·w]: share of each cell under the mask
    chosen = coverage >= HALF_CELL
    small = ~chosen.any(1) & (coverage > 0).any(1)
    if bool(small.any()):
        best = coverage.argmax(1)
        chosen[small, best[small]] = True
    roi_cells = roi_on_grid(roi, grid)
    if roi_cells is not None:
        chosen &= roi_cells
    if avoid is not None:
        near = F.max_pool2d(F.adaptive_max_pool2d(avoid.float(), grid), kernel_size=3, stride=1, padding=1)
        chosen &= ~(near.flatten(1) > 0)
    return chosen


def sub_cell_shifts(stride: int, *slices: torch.Tensor | None):
    """The slices (image, ROI, masks ``[B, C, H, W]``; None stays None) as they are and moved by half a feature cell
    down, right and both (edges repeated, nothing wraps): a structure falls on a strided feature grid at any
    sub-cell offset, so a correction remembered at these four offsets also covers where it lands on the next scan
    (measured on the test phantoms: the corrected structure's peak on a second scan about 10 % lower than with
    the one offset)."""
    half = max(1, int(stride) // 2)
    for dy, dx in ((0, 0), (half, 0), (0, half), (half, half)):
        if dy == dx == 0:
            yield slices
            continue
        moved = []
        for item in slices:
            if item is None:
                moved.append(None)
                continue
            padded = F.pad(item.float(), (dx, 0, dy, 0), mode="replicate")[..., : item.shape[-2], : item.shape[-1]]
            moved.append(padded.to(item.dtype))
        yield tuple(moved)
