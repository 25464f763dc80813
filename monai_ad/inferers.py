"""Slice-wise inference over a pre-processed volume, batched on the detector's device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from monai_ad.detectors.base import AnomalyDetector
from monai_ad.transforms.array import axial_slices, stack_axial_slices


@dataclass
class VolumeScores:
    """``heatmap [1, X, Y, Z]`` with the input's meta and transform trace (ready for ``Invertd``);
    ``slice_scores [Z]`` (NaN where the slice was not scored); ``scored [Z]`` bool."""

    heatmap: torch.Tensor
    slice_scores: torch.Tensor
    scored: torch.Tensor


class SliceAnomalyInferer(Inferer):
    """Run a detector over the axial slices of ``[1, S, S, Z]`` image/ROI volumes in batches.

    Only slices whose ROI covers at least ``min_roi_pixels`` pixels are scored; every other voxel (outside the
    ROI, or in unscored slices) gets the lowest score of the volume, so reassembled heatmaps rank them last.
    Slices move to the detector's device one batch at a time and results stay there until the end.

    As a MONAI ``Inferer``, ``inferer(inputs, network)`` takes ``[B, 2, S, S, Z]`` (image and ROI channels,
    e.g. from ``ConcatItemsd``) and returns the heatmaps ``[B, 1, S, S, Z]``.
    """

    def __init__(self, batch_size: int = 32, min_roi_pixels: int = 16):
        super().__init__()
        self.batch_size, self.min_roi_pixels = batch_size, min_roi_pixels

    def score_volume(self, image: torch.Tensor, roi: torch.Tensor, detector: AnomalyDetector) -> VolumeScores:
        slices, roi_slices = axial_slices(image), axial_slices(roi) > 0
        n = slices.shape[0]
        scored = roi_slices.flatten(1).sum(1) >= self.min_roi_pixels
        index = torch.nonzero(scored).flatten().tolist()
        device = detector.device
        pixel_maps, slice_scores = [], []
        for start in range(0, len(index), self.batch_size):
            idx = index[start : start + self.batch_size]
            scores = detector.score(torch.as_tensor(slices[idx]).float(), torch.as_tensor(roi_slices[idx]))
            pixel_maps.append(scores.pixel.float())
            slice_scores.append(scores.slice.float())
        heat = torch.zeros((n, 1, *slices.shape[2:]), device=device)
        slice_out = torch.full((n,), float("nan"), device=device)
        if index:
            idx_t = torch.as_tensor(index, device=device)
            maps = torch.cat(pixel_maps)[:, None]
            roi_dev = torch.as_tensor(roi_slices[index]).to(device)
            floor = maps[roi_dev].min() if bool(roi_dev.any()) else maps.min()
            heat.fill_(floor)
            heat[idx_t] = torch.where(roi_dev, maps, floor)
            slice_out[idx_t] = torch.cat(slice_scores)
        heat = stack_axial_slices(heat).cpu()
        if isinstance(image, MetaTensor):
            heat = MetaTensor(heat, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        return VolumeScores(heat, slice_out.cpu(), scored.cpu())

    def __call__(self, inputs: torch.Tensor, network: AnomalyDetector, *args, **kwargs) -> torch.Tensor:
        heatmaps = [self.score_volume(item[0:1], item[1:2], network).heatmap for item in inputs]
        return torch.stack(heatmaps)
