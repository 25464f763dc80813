"""The plain density floor: how many HU each voxel's lightly smoothed density lies from the scan's liver level.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

from typing import Iterable

import torch

from monai_ad.components.smoothing import smooth_inside
from monai_ad.detectors.base import AnomalyDetector, SliceScores, constructor_arguments, register_detector
from monai_ad.detectors.intensity.detector import gaussian_kernel, pixel_mm, slice_medians
from monai_ad.errors import InputError


@register_detector("density")
class PlainDensity(AnomalyDetector):
    """``|HU - the scan's liver level|`` after a ``sigma_mm`` Gaussian (see the module docstring)."""

    default_preprocessing = {"outside_fill": "liver"}

    def __init__(self, image_size: int = 224, in_channels: int = 1, sigma_mm: float = 1.0,
                 pixel_mm: float | None = None, batch_size: int = 32):  # fmt: skip
        if not sigma_mm > 0:
            raise InputError(f"density: sigma_mm must be positive, got {sigma_mm}")
        if pixel_mm is not None and not pixel_mm > 0:
            raise InputError(f"density: pixel_mm must be positive, got {pixel_mm}")
        super().__init__(**constructor_arguments())

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        for batch in batches:  # nothing to learn; the slices are only checked
            self.check_slices(batch["image"])

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        roi = torch.ones_like(image[:, :1], dtype=torch.bool) if roi is None else roi
        low, high = (float(v) for v in self.preprocessing.get("window", (-160.0, 240.0)))
        middle = image.float()[:, image.shape[1] // 2 :][:, :1]
        kernel = gaussian_kernel(self.hparams["sigma_mm"] / pixel_mm(self.hparams["pixel_mm"], self.preprocessing,
                                                                     self.image_size))  # fmt: skip
        smoothed = smooth_inside(middle, roi, kernel)
        level = self.preprocessing.get("normalize_liver_hu", 110.0)
        centre = slice_medians(smoothed, roi) if level is None else (float(level) - low) / (high - low)
        pixel = torch.where(roi, (smoothed - centre).abs() * (high - low), 0.0)[:, 0]
        return SliceScores(pixel=pixel, slice=pixel.flatten(1).amax(1))
