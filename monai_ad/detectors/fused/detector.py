"""Density kept where features lose it: a feature detector's map fused with the intensity baseline.

Method, what follows the paper, the choices made here and why, and the schedules: ``README.md`` beside this module.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from monai_ad.detectors.base import (
    AnomalyDetector,
    ReiterableBatches,
    SliceScores,
    constructor_arguments,
    create_detector,
    register_detector,
)
from monai_ad.detectors.intensity.detector import (
    SINGLE_SCALE_DEFAULTS,
    IntensityDeviation,
    batch_roi,
    interpolate,
    slice_medians,
    strictly_increasing,
    tail_probabilities,
)
from monai_ad.errors import InputError

TABLE_SAMPLE = 2_000_000


@register_detector("fused")
class DensityFused(AnomalyDetector):
    """``detector``'s map (by registry name, with ``detector_hparams``) plus the intensity baseline's, both as
    rarities among normal liver (see the module docstring)."""

    # measured (benchmarks/RESULTS.md): the feature map gains from 2.5-D input and the liver's spread as the
    # unit, and the sum with them, on real CT with sparse and with heavy metastatic lesions
    default_preprocessing = {"outside_fill": "liver", "context_mm": 3.0, "normalize_liver_spread": 10.0}
    schedules = {"cpu": {"detector": "patchcore", "detector_hparams": {"coreset_ratio": 0.1}},
                 "quick": {"detector_hparams": {"coreset_ratio": 0.02}}}  # fmt: skip

    def __init__(
        self,
        image_size: int = 224,
        in_channels: int = 1,
        detector: str = "patchcore",
        detector_hparams: Mapping[str, Any] | None = None,
        intensity_hparams: Mapping[str, Any] | None = None,
        min_tail: float = 1e-4,
        self_referenced_features: bool = True,
        batch_size: int = 16,
    ):
        detector_hparams, intensity_hparams = dict(detector_hparams or {}), dict(intensity_hparams or {})
        super().__init__(**constructor_arguments())
        if detector in ("fused", "intensity"):
            raise InputError(f"fused: the feature detector cannot be {detector!r}")
        common = {"image_size": image_size, "in_channels": in_channels}
        self.feature = create_detector(detector, **{**detector_hparams, **common})
        self.density = IntensityDeviation(**{**intensity_hparams, **common})
        levels = tail_probabilities(min_tail)
        self.register_buffer("rarity", -torch.log10(levels).float())  # one-sided: a feature score is high or not
        self.register_buffer("feature_tail", torch.linspace(0, 1, len(levels)))  # score at each tail probability
        self.register_buffer("tabulated", torch.zeros((), dtype=torch.bool))

    @classmethod
    def saved_hparams(cls, hparams, state):
        if "density.centre" in state and state["density.centre"].dim() == 1:
            return {**hparams, "intensity_hparams": {**SINGLE_SCALE_DEFAULTS, **dict(hparams.get("intensity_hparams") or {})}}
        return hparams

    @property
    def unsaved_prefixes(self) -> tuple[str, ...]:  # the feature detector's frozen backbone is rebuilt, not saved
        return tuple("feature." + p for p in type(self.feature).unsaved_prefixes)

    @property
    def learns_from_corrections(self) -> bool:  # as its feature detector does
        return self.feature.learns_from_corrections

    def remember_normal(
        self, image: torch.Tensor, roi: torch.Tensor | None, mask: torch.Tensor, avoid: torch.Tensor | None = None
    ) -> int:
        """The feature detector's ``remember_normal``. The fusion's own calibration (the feature scores' tail table,
        the thresholds) is kept as it is and stays valid: added normal memory can only lower feature scores (a
        nearest-neighbour distance to a larger memory), and only near the corrected features, so the table still
        maps the rest of the normal liver as tabulated and a lowered score reads as more normal, never as less.
        The intensity map has no memory and is not changed."""
        if not self.feature.learns_from_corrections:
            return super().remember_normal(image, roi, mask, avoid)
        if not self.tabulated:
            raise InputError("fused: calibrate it on held-out normal slices before adding corrections")
        return self.feature.remember_normal(image, roi, mask, avoid)

    def _fit(self, batches: Iterable[dict[str, torch.Tensor]], progress: bool) -> None:
        for part in (self.feature, self.density):
            part.preprocessing = self.preprocessing
            part._fit(batches, progress)
            part._fitted.fill_(True)
        self.tabulated.fill_(False)  # the feature map's tail comes from the held-out slices of ``calibrate``

    @torch.no_grad()
    def calibrate(self, data: Any, quantile: float | None = None, batch_size: int = 16, **kwargs: Any) -> dict[str, Any]:
        data = ReiterableBatches(data, batch_size)  # read twice: the table, then the thresholds
        self.feature.preprocessing = self.preprocessing
        self._tabulate(data)
        return super().calibrate(data, quantile, batch_size, **kwargs)

    @torch.no_grad()
    def _tabulate(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """The feature map's upper tail among the liver pixels of ``batches``."""
        generator = torch.Generator().manual_seed(0)
        values = []
        for batch in batches:
            image = batch["image"].to(self.device, torch.float32)
            roi = batch_roi(batch, image)
            values.append(self._feature_map(image, roi)[roi[:, 0]].float().cpu())
        values = torch.cat(values) if values else torch.zeros(0)
        if values.numel() < 100:
            raise InputError("fused: too few normal liver pixels to tabulate the feature scores")
        if values.numel() > TABLE_SAMPLE:
            values = values[torch.randperm(values.numel(), generator=generator)[:TABLE_SAMPLE]]
        levels = tail_probabilities(float(self.hparams["min_tail"]))
        table = torch.quantile(values.double(), 1 - levels).float()
        self.feature_tail.copy_(strictly_increasing(table, step=1e-6 * max(float(table[-1] - table[0]), 1e-6)))
        self.tabulated.fill_(True)

    def _score(self, image: torch.Tensor, roi: torch.Tensor | None) -> SliceScores:
        if not self.tabulated:
            raise InputError("fused: calibrate it on held-out normal slices first (they set the feature scores' scale)")
        self.feature.preprocessing = self.density.preprocessing = self.preprocessing  # restored on the whole only
        feature = self._feature_map(image, roi)
        rarity = interpolate(feature.flatten(), self.feature_tail, self.rarity).view_as(feature).clamp_min(0.0)
        density = self.density._score(image, roi).pixel.float()
        pixel = log_beyond(rarity, float(self.rarity[-1])) + log_beyond(density, float(self.density.rarity[-1]))
        if roi is not None:
            pixel = torch.where(roi[:, 0], pixel, torch.zeros_like(pixel))
        return SliceScores(pixel=pixel, slice=pixel.flatten(1).amax(1))

    def _feature_map(self, image: torch.Tensor, roi: torch.Tensor | None) -> torch.Tensor:
        """The feature detector's map ``[B, H, W]``; self-referenced: minus each slice's liver median."""
        feature = self.feature._score(image, roi).pixel.float()
        if self.hparams["self_referenced_features"] and roi is not None:
            feature = feature - slice_medians(feature[:, None], roi)[:, 0]
        return feature

    def backbone_forward(self, image: torch.Tensor) -> Any:
        return self.feature.backbone_forward(image)


def log_beyond(rarity: torch.Tensor, top: float) -> torch.Tensor:
    """``rarity`` up to ``top`` (the tables' last level), and beyond it ``top + log(1 + excess)``."""
    return torch.where(rarity > top, top + torch.log1p((rarity - top).clamp_min(0.0)), rarity)
