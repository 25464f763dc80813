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

    ``inferer(inputs, network)`` takes ``[B, C + 1, S, S, Z]`` (the image's C channels and the ROI, as the pre-processing
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
        """``[C, S, S, Z]`` image and ``[1, S, S, Z]`` ROI → ``[2, S, S, Z]`` (heatmap, slice scores), with the
        image's metadata."""
        in_roi = axial_slices(roi) > 0
        n = in_roi.shape[0]
        scored = torch.nonzero(in_roi.sum((1, 2, 3)) >= self.min_roi_pixels).flatten()
        device = detector.device
        out = torch.empty((n, 2, *in_roi.shape[2:]), device=device)
        out[:, SLICE_SCORE_CHANNEL] = float("nan")
        heatmap = out[:, HEATMAP_CHANNEL]
        if len(scored):
            images = axial_slices(image)[scored].float()  # one gather: the scored slices, contiguous
            masks = in_roi[scored].to(device)  # small (bool): on the device once, for scoring and the fill
            index = scored.to(device)
            floor_in_roi = floor_all = torch.tensor(float("inf"), device=device)
            for start in range(0, len(scored), self.batch_size):
                batch = slice(start, start + self.batch_size)
                scores = detector.score(images[batch], masks[batch])
                pixel, mask = scores.pixel.float(), masks[batch, 0]
                floor_in_roi = torch.minimum(floor_in_roi, torch.where(mask, pixel, float("inf")).amin())
                floor_all = torch.minimum(floor_all, pixel.amin())
                heatmap[index[batch]] = pixel
                out[index[batch], SLICE_SCORE_CHANNEL] = scores.slice.float()[:, None, None]
            outside = torch.ones(n, *in_roi.shape[2:], dtype=torch.bool, device=device)
            outside[index] = ~masks[:, 0]
            floor = torch.where(floor_in_roi.isfinite(), floor_in_roi, floor_all)  # no host sync
            heatmap.masked_fill_(outside, floor)  # outside the ROI and unscored slices: the lowest score in it
        else:
            heatmap.fill_(0.0)
        volume = stack_axial_slices(out).to(self.device or device)
        if isinstance(image, MetaTensor):
            volume = MetaTensor(volume, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        return volume

    def __call__(self, inputs: torch.Tensor, network: AnomalyDetector, *args, **kwargs) -> torch.Tensor:
        return torch.stack([self.score_volume(item[:-1], item[-1:], network) for item in inputs])
