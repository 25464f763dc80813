"""Prediction: one trained detector reading CT volumes, the same way for every entry point.

``Predictor`` is built from a model alone (its saved pre-processing, its thresholds, ``min_roi_pixels``) with
overrides passed by name. The command line (``infer``), the bundles (``inference.json``'s ``predictor``), the
MONAI Label app's infer task and its feedback-threshold task all build one, so a volume gets the same heatmap
and label map whichever way it comes in.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from monai_ad import distributed
from monai_ad.calibration import operating_point
from monai_ad.data.datalists import case_name
from monai_ad.detectors.base import AnomalyDetector
from monai_ad.errors import InputError
from monai_ad.inferers import SliceAnomalyInferer
from monai_ad.io import atomic_paths, save_nifti
from monai_ad.postprocess import MIN_LESION_MM3
from monai_ad.training import resolve_device
from monai_ad.transforms.pipeline import (
    IMAGE,
    PRED,
    ROI,
    ROI_SOURCE,
    PreprocessConfig,
    build_labelling,
    build_loading,
    build_preprocessing,
    build_reassembly,
    require_roi,
    run_pipeline,
)

SOURCE = "source"  # the paths a volume was read from, carried to its summary
SCAN = "scan"  # the image as read, kept for callers that look at it beside the maps (``keep_inputs``)


@dataclass
class VolumeResult:
    """A detector's reading of one volume, in the scan's own geometry."""

    case: str
    heatmap: np.ndarray  # float32, the input image's shape
    label_map: np.ndarray  # uint8, 1 = anomaly
    affine: np.ndarray
    summary: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    image: np.ndarray | None = None  # with ``keep_inputs``: the image as read (float32, HU), the input's shape
    roi: np.ndarray | None = None  # with ``keep_inputs``: the liver mask the maps were read in (bool), the input's shape


class Predictor:
    """Everything needed to read volumes with one trained detector (built once, used for many volumes).

    ``model``: a detector or the path of a saved one (loaded on ``device``). Its stored pre-processing and
    thresholds apply unless overridden: ``pixel_threshold`` / ``slice_threshold`` (a pixel threshold set by hand
    also outlines regions at itself; the model's own outlines at its calibrated ``extent`` threshold),
    ``min_lesion_mm3`` (smallest region kept), ``roi_labels`` (the liver's value(s) in the ROI; default any
    non-zero voxel), ``batch_size`` (slices per scoring batch). ``false_alarm_rate`` instead sets both thresholds
    for a target share of normal scans that raise an alarm, from the model's conformal calibration
    (``monai_ad.calibration.operating_point``: the guarantee is stated in each summary's ``operating_point``).
    Every summary carries the study score, conformal p-values (study, slice, region) when the model has a
    conformal calibration, and warnings when the scan is unlike the model's normals (``monai_ad.calibration``).

    The stages are separate chains, in the order a volume goes through them: ``loading`` (read the files),
    ``preprocessing`` (to square axial slices, image and ROI as channels), ``inferer`` (score the slices),
    ``reassembly`` (back to the scan's geometry) and ``labelling`` (label map and summary).
    ``pre_transforms()`` / ``post_transforms()`` give them as the transform lists MONAI Label and a bundle's
    ``preprocessing`` / ``postprocessing`` ids take.
    """

    def __init__(
        self,
        model: AnomalyDetector | str | os.PathLike,
        roi_labels: Sequence[int] | int | None = None,
        pixel_threshold: float | None = None,
        slice_threshold: float | None = None,
        min_lesion_mm3: float = MIN_LESION_MM3,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        false_alarm_rate: float | None = None,
    ):
        if not isinstance(model, AnomalyDetector):
            model = AnomalyDetector.load(model, device=resolve_device(None if device is None else str(device)))
        self.detector = model
        self.config = PreprocessConfig.from_dict(model.preprocessing or {"image_size": model.image_size})
        thresholds = model.thresholds or {}
        self.operating_point = None
        if false_alarm_rate is not None:
            if pixel_threshold is not None or slice_threshold is not None:
                raise InputError("give either a false-alarm rate or thresholds, not both")
            if not (thresholds.get("conformal") or {}).get("study"):
                raise InputError("the model has no conformal calibration (retrain it with this version): a false-alarm "
                                 "rate cannot be set; give thresholds instead")  # fmt: skip
            self.operating_point = operating_point(thresholds["conformal"], false_alarm_rate)
            pixel_threshold, slice_threshold = self.operating_point["pixel"], self.operating_point["slice"]
        self.pixel_threshold = pixel_threshold if pixel_threshold is not None else thresholds.get("pixel")
        self.slice_threshold = slice_threshold if slice_threshold is not None else thresholds.get("slice")
        if self.pixel_threshold is None or self.slice_threshold is None:
            raise InputError("the model has no stored thresholds: give a pixel and a slice threshold")
        # a pixel threshold set by hand outlines regions at itself; the model's own, at its calibrated extent
        self.extent_threshold = thresholds.get("extent") if pixel_threshold is None or self.operating_point else None
        self.min_lesion_mm3, self.roi_labels = min_lesion_mm3, roi_labels
        self.loading = build_loading()
        self.preprocessing = build_preprocessing(self.config, roi_labels, concat=True, loading=False)
        self.inferer = SliceAnomalyInferer(batch_size=batch_size, min_roi_pixels=self.config.min_roi_pixels)
        self.reassembly = build_reassembly(self.preprocessing)
        self.labelling = build_labelling(self.pixel_threshold, self.slice_threshold, min_lesion_mm3, self.extent_threshold,
                                         thresholds.get("conformal"), thresholds.get("normal_profiles") or ())  # fmt: skip

    def pre_transforms(self) -> list:
        """Loading and pre-processing as one list of dictionary transforms (paths in, detector input out)."""
        return [*self.loading.transforms, *self.preprocessing.transforms]

    def post_transforms(self) -> list:
        """Reassembly and labelling as one list of dictionary transforms (``pred`` in, maps and summary out)."""
        return [*self.reassembly.transforms, *self.labelling.transforms]

    def score(self, data: dict[str, Any]) -> dict[str, Any]:
        """The inference stage: the detector's reading of a pre-processed volume, as ``data["pred"]``."""
        data[PRED] = self.inferer(data[IMAGE][None], self.detector)[0]
        return data

    def __call__(
        self,
        image: Any,
        roi: Any,
        output_dir: str | os.PathLike | None = None,
        name: str | None = None,
        timings: dict[str, float] | None = None,
        keep_inputs: bool = False,
    ) -> VolumeResult:
        """Read one volume; with ``timings`` given, the seconds spent in each stage are added to it; with
        ``keep_inputs``, the result also holds the image as read and the liver mask (``image``, ``roi``)."""
        return self.finish(self.prepare(image, roi, timings, keep_inputs), output_dir, name, timings)

    def prepare(self, image: Any, roi: Any, timings: dict[str, float] | None = None, keep_inputs: bool = False) -> dict[str, Any]:
        """Load and pre-process one volume (the CPU part, which a prefetching thread can run ahead)."""
        data = {IMAGE: image, ROI: roi}
        require_roi(data, image)
        with stage_timer(timings, "load"):
            data = run_pipeline(self.loading, data)
        scan = data[IMAGE].as_tensor()[0].clone().numpy() if keep_inputs else None
        with stage_timer(timings, "preprocess"):
            data = run_pipeline(self.preprocessing, data)
        data[SOURCE] = {"image": str(image), "roi": str(roi)}
        if keep_inputs:
            data[SCAN] = scan
        return data

    def finish(
        self,
        data: dict[str, Any],
        output_dir: str | os.PathLike | None = None,
        name: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> VolumeResult:
        """Score a pre-processed volume, take the maps back to the scan's geometry, optionally write them."""
        source, scan = data.pop(SOURCE), data.pop(SCAN, None)
        with stage_timer(timings, "inference", self.detector.device):
            data = self.score(data)
        with stage_timer(timings, "reassembly"):
            data = self.reassembly(data)
        with stage_timer(timings, "label_map"):
            data = self.labelling(data)
        name = name or case_name(source["image"])
        summary = {
            "case": name,
            **source,
            "detector": self.detector.name,
            **data["anomaly_summary"],
            "calibration": calibration_record(self.detector.thresholds),
        }
        if self.operating_point is not None:
            summary["operating_point"] = self.operating_point
        heatmap = data["heatmap"]
        result = VolumeResult(
            name,
            heatmap.as_tensor()[0].numpy(),
            data[PRED].as_tensor()[0].numpy().astype(np.uint8, copy=False),
            np.asarray(heatmap.affine, dtype=np.float64),
            summary,
        )
        if scan is not None:
            liver = data[ROI_SOURCE]
            liver = liver.as_tensor() if isinstance(liver, MetaTensor) else torch.as_tensor(liver)
            result.image, result.roi = scan, (liver[0] > 0).cpu().numpy()
        if output_dir is not None:
            with stage_timer(timings, "write"):
                result.files = write_outputs(result, output_dir)
        return result


def calibration_record(thresholds: dict[str, Any] | None) -> dict[str, Any]:
    """A model's thresholds as a summary states them: the calibration scans' figures counted, not listed."""
    record = {k: v for k, v in (thresholds or {}).items() if k not in ("conformal", "normal_profiles")}
    if (thresholds or {}).get("conformal"):
        record["conformal_scans"] = int(thresholds["conformal"].get("n_scans") or len(thresholds["conformal"]["study"]))
    if (thresholds or {}).get("normal_profiles"):
        record["normal_profiles"] = len(thresholds["normal_profiles"])
    return record


@contextlib.contextmanager
def stage_timer(timings: dict[str, float] | None, stage: str, device: torch.device | None = None):
    """Add the wall-clock seconds of the block to ``timings[stage]`` (CUDA work is waited for first)."""
    if timings is None:
        yield
        return
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def write_outputs(result: VolumeResult, output_dir: str | os.PathLike) -> dict[str, str]:
    """Heatmap and label map as NIfTI in the input's geometry, and the JSON summary; all or nothing. The label
    map's name ends in ``-label`` so that 3D Slicer loads it as a label map (its volume loader keys on the words
    "label" / "seg" in a file's base name)."""
    out = Path(output_dir)
    files = {
        "heatmap": out / f"{result.case}_heatmap.nii.gz",
        "label_map": out / f"{result.case}_anomaly-label.nii.gz",
        "summary": out / f"{result.case}_summary.json",
    }
    summary = {**result.summary, "files": {k: str(v) for k, v in files.items()}}
    with atomic_paths(files) as tmp:  # the summary last: present only with both volumes of the same run
        with ThreadPoolExecutor(max_workers=2) as pool:  # compression releases the GIL: both volumes at once
            writes = [pool.submit(save_nifti, result.heatmap, result.affine, tmp["heatmap"]),
                      pool.submit(save_nifti, result.label_map, result.affine, tmp["label_map"], "label")]  # fmt: skip
            tmp["summary"].write_text(json.dumps(summary, indent=2) + "\n")
            for write in writes:
                write.result()
    result.summary = summary
    return {k: str(v) for k, v in files.items()}


def infer(
    model: str | os.PathLike | AnomalyDetector | Predictor,
    images: Sequence[Any],
    rois: Sequence[Any],
    output_dir: str | os.PathLike,
    progress: bool = True,
    prefetch: bool = True,
    on_result: Callable[[VolumeResult], None] | None = None,
    **options: Any,
) -> list[VolumeResult]:
    """Read many volumes and write each one's outputs as soon as it is done.

    ``model``: a ``Predictor``, or a model to build one from (``options``: its overrides by name). Volumes
    stream: while one is scored, the next is loaded and pre-processed in a background thread, and only the
    summaries are kept (the returned results carry no arrays). Under torch.distributed (torchrun) each process
    reads its share of the volumes and the returned list holds this process's results. ``on_result`` is called
    with each result while it still holds its arrays (and the image and liver mask as read: ``keep_inputs``).
    """
    predictor = _predictor(model, options)
    prepare = functools.partial(predictor.prepare, keep_inputs=on_result is not None)
    cases = distributed.shard(list(zip(images, rois)))
    results = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i, (image, roi) in enumerate(tqdm(cases, desc="inference", disable=not progress, unit="volume")):
            data = pending.result() if pending is not None else prepare(image, roi)
            pending = pool.submit(prepare, *cases[i + 1]) if prefetch and i + 1 < len(cases) else None
            result = predictor.finish(data, output_dir, name=case_name(image))
            if on_result is not None:
                on_result(result)
            result.heatmap = result.label_map = result.image = result.roi = None
            results.append(result)
    return results


def _predictor(model: str | os.PathLike | AnomalyDetector | Predictor, options: dict[str, Any]) -> Predictor:
    """``model`` itself when it is a predictor (then no overrides), else the predictor built from it."""
    if not isinstance(model, Predictor):
        return Predictor(model, **options)
    if options:
        raise TypeError(f"a Predictor is given: its settings cannot be overridden here ({', '.join(options)})")
    return model
