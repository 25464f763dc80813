"""Slice-wise inference over a pre-processed volume, batched on the detector's device."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from monai_ad.detectors.base import AnomalyDetector
from monai_ad.postprocess import HEATMAP_CHANNEL, SLICE_SCORE_CHANNEL
from monai_ad.transforms.array import axial_slices, stack_axial_slices


class SliceAnomalyInferer(Inferer):
    """Run a detector over the axial slices of a pre-processed volume, in batches on its device.

    ``inferer(inputs, network)`` takes ``[B, 2, S, S, Z]`` (image and ROI channels, as the pre-processing
    gives them after ``ConcatItemsd``) and returns ``[B, 2, S, S, Z]``: channel 0 the pixel heatmap, channel 1
    each slice's score repeated over the slice (NaN for slices not scored), so one ``Invertd`` takes both back
    to the scan's geometry, where the slice channel indexes the scan's own axial slices.

    Only slices whose ROI covers at least ``min_roi_pixels`` pixels are scored; every other voxel (outside the
    ROI, or in unscored slices) gets the lowest score of the volume. Slices move to the device one batch at a
    time and results stay there. The output is on ``device`` (default: the detector's), so on a GPU the way
    back to the scan's geometry (``Invertd``, filling outside the liver) runs there too.
    """

    def __init__(self, batch_size: int = 32, min_roi_pixels: int = 16, device: str | torch.device | None = None):
        super().__init__()
        self.batch_size, self.min_roi_pixels = batch_size, min_roi_pixels
        self.device = None if device is None else torch.device(device)

    def score_volume(self, image: torch.Tensor, roi: torch.Tensor, detector: AnomalyDetector) -> torch.Tensor:
        """``[1, S, S, Z]`` image and ROI → ``[2, S, S, Z]`` (heatmap, slice scores), with the image's metadata."""
        slices, roi_slices = axial_slices(image), axial_slices(roi) > 0
        n = slices.shape[0]
        scored = torch.nonzero(roi_slices.flatten(1).sum(1) >= self.min_roi_pixels).flatten().tolist()
        device = detector.device
        pixel_maps, slice_scores = [], []
        for start in range(0, len(scored), self.batch_size):
            idx = scored[start : start + self.batch_size]
            scores = detector.score(torch.as_tensor(slices[idx]).float(), torch.as_tensor(roi_slices[idx]))
            pixel_maps.append(scores.pixel.float())
            slice_scores.append(scores.slice.float())
        out = torch.zeros((n, 2, *slices.shape[2:]), device=device)
        out[:, SLICE_SCORE_CHANNEL] = float("nan")
        if scored:
            index = torch.as_tensor(scored, device=device)
            maps = torch.cat(pixel_maps)
            roi_dev = torch.as_tensor(roi_slices[scored]).to(device)[:, 0]
            floor = maps[roi_dev].min() if bool(roi_dev.any()) else maps.min()
            out[:, HEATMAP_CHANNEL] = floor
            out[index, HEATMAP_CHANNEL] = torch.where(roi_dev, maps, floor)
            out[index, SLICE_SCORE_CHANNEL] = torch.cat(slice_scores)[:, None, None]
        volume = stack_axial_slices(out).to(self.device or device)
        if isinstance(image, MetaTensor):
            volume = MetaTensor(volume, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        return volume

    def __call__(self, inputs: torch.Tensor, network: AnomalyDetector, *args, **kwargs) -> torch.Tensor:
        return torch.stack([self.score_volume(item[0:1], item[1:2], network) for item in inputs])
