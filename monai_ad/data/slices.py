"""The scored axial slices of several volumes, collected for fitting and calibrating a detector."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from monai_ad.data.datalists import LESION_LABEL, roi_source
from monai_ad.errors import InputError
from monai_ad.transforms.pipeline import IMAGE, ROI, PreprocessConfig, build_preprocessing, require_roi, run_pipeline

logger = logging.getLogger(__name__)


def collect_slices(
    items: Sequence[Mapping[str, Any]],
    config: PreprocessConfig,
    roi_labels: Sequence[int] | int | None = None,
    progress: bool = True,
    desc: str = "slices",
    lesions: bool = False,
    skip_unreadable: bool = False,
) -> dict[str, torch.Tensor]:
    """The scored axial slices of several volumes: ``{"image": [N,1,S,S] float16, "roi": [N,1,S,S] bool}``,
    with ``lesions``: also ``"lesion"`` ([N,1,S,S] bool, label ``LESION_LABEL`` of each item's ``label``) and
    ``"case"`` ([N] index of the item each slice comes from).

    Slices are kept in half precision (windowed intensities in [0, 1] lose nothing a detector sees).
    With ``skip_unreadable`` (a pile of unlabelled studies), a volume the pipeline refuses is logged with its
    one-line reason and left out instead of stopping the collection.
    """
    pipeline = build_preprocessing(config, roi_labels, mask_keys=["label"] if lesions else ())
    images, rois, lesion_masks, cases = [], [], [], []
    for index, item in enumerate(tqdm(items, desc=desc, disable=not progress, unit="volume")):
        inputs = {"label": item["label"]} if lesions else {}
        if lesions and not item.get("label"):
            raise InputError("a case has no 'label' to take lesion masks from", item.get(IMAGE))
        data = {IMAGE: item[IMAGE], ROI: roi_source(item), **inputs}
        try:
            require_roi(data, item[IMAGE])
            data = run_pipeline(pipeline, data)
        except InputError as exc:
            if not skip_unreadable:
                raise
            logger.warning("left out of the %s: %s", desc, exc)
            continue
        img, roi = data[IMAGE].as_tensor(), data[ROI].as_tensor() > 0
        keep = roi.flatten(0, 2).sum(0) >= config.min_roi_pixels
        images.append(img[..., keep].permute(3, 0, 1, 2).half())
        rois.append(roi[..., keep].permute(3, 0, 1, 2))
        if lesions:
            lesion_masks.append((data["label"].as_tensor() == LESION_LABEL)[..., keep].permute(3, 0, 1, 2))
            cases.append(torch.full((int(keep.sum()),), index))
    image = torch.cat(images) if images else torch.zeros(0)
    if image.shape[0] == 0:
        raise InputError("no slice of the given volumes contains enough of the liver ROI")
    out = {"image": image, "roi": torch.cat(rois)}
    if lesions:
        out.update({"lesion": torch.cat(lesion_masks), "case": torch.cat(cases)})
    return out


class SliceBatches:
    """Re-iterable batches over collected slices (float32 per batch), as ``AnomalyDetector.fit`` accepts."""

    def __init__(self, slices: Mapping[str, torch.Tensor], batch_size: int = 16, shuffle: bool = False, seed: int = 0):
        self.slices, self.batch_size, self.shuffle = slices, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.slices["image"].shape[0] // self.batch_size)

    def __iter__(self):
        n = self.slices["image"].shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {"image": self.slices["image"][idx].float(), "roi": self.slices["roi"][idx]}
