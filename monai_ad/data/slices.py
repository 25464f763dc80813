"""The scored axial slices of several volumes, collected for fitting and calibrating a detector."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from monai_ad.data.datalists import LESION_LABEL, roi_source
from monai_ad.errors import InputError
from monai_ad.transforms.pipeline import IMAGE, ROI, SCAN_PROFILE, PreprocessConfig, build_preprocessing, require_roi, run_pipeline

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
    """The scored axial slices of several volumes: ``{"image": [N,1,S,S] float16, "roi": [N,1,S,S] bool,
    "case": [N] index of the item each slice comes from}``, ``"scan_profiles"`` (one ``ScanProfile`` per volume
    collected, in order), and with ``lesions`` also ``"lesion"`` ([N,1,S,S] bool, label ``LESION_LABEL`` of each
    item's ``label``).

    Slices are kept in half precision (windowed intensities in [0, 1] lose nothing a detector sees).
    With ``skip_unreadable`` (a pile of unlabelled studies), a volume the pipeline refuses is logged with its
    one-line reason and left out instead of stopping the collection.
    """
    pipeline = build_preprocessing(config, roi_labels, mask_keys=["label"] if lesions else ())
    images, rois, lesion_masks, cases, profiles = [], [], [], [], []
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
        cases.append(torch.full((int(keep.sum()),), index))
        if data.get(SCAN_PROFILE):
            profiles.append(data[SCAN_PROFILE])
        if lesions:
            lesion_masks.append((data["label"].as_tensor() == LESION_LABEL)[..., keep].permute(3, 0, 1, 2))
    image = torch.cat(images) if images else torch.zeros(0)
    if image.shape[0] == 0:
        raise InputError("no slice of the given volumes contains enough of the liver ROI")
    out = {"image": image, "roi": torch.cat(rois), "case": torch.cat(cases), "scan_profiles": profiles}
    if lesions:
        out["lesion"] = torch.cat(lesion_masks)
    return out


def concat_slices(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several ``collect_slices`` results as one: tensors stacked, each part's scans numbered after the last's."""
    out: dict[str, Any] = {k: torch.cat([p[k] for p in parts]) for k in ("image", "roi")}
    offsets, cases = 0, []
    for part in parts:
        case = part.get("case")
        if case is None:
            return out  # a part without scan indices: none for the whole
        cases.append(case + offsets)
        offsets += int(case.max()) + 1 if case.numel() else 0
    out["case"] = torch.cat(cases)
    out["scan_profiles"] = [profile for part in parts for profile in part.get("scan_profiles", [])]
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
            batch = {"image": self.slices["image"][idx].float(), "roi": self.slices["roi"][idx]}
            if self.slices.get("case") is not None:
                batch["case"] = self.slices["case"][idx]
            yield batch
