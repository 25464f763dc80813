"""Corrections that teach at once: a radiologist's erased false positive becomes normal memory of the detector.

When a ``final`` label is saved for a study, every trained detector with a memory of normal features
(``learns_from_corrections``: PatchCore, PaDiM, the fused detector through its PatchCore part) reads the study
again as it serves it; the voxels its label map marks that the saved label does not (the *erased* regions) go
through the model's own pre-processing to its slice grid, and ``remember_normal`` adds their features to the memory:
no retraining, and the next scan is read with the new memory (the infer task reloads a changed model file). Voxels
the saved label keeps as anomaly are never taught: feature positions within one cell of them are left out. Detectors
without a memory keep only the threshold selection of ``feedback_threshold``.

Versions: before each update the model file is copied to ``<model_dir>/versions/<model>/v0001.pt`` (numbered up);
``undo_memory_update`` puts the newest version back in one rename and removes it from the list, so repeated undos
walk back through the updates. Each update is recorded with the model (``thresholds["memory_feedback"]``: the
studies and label times taught, the features added), so a label already taught is not taught twice.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from filelock import FileLock
from monai.data import MetaTensor
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from monai_ad.detectors.base import AnomalyDetector
from monai_ad.errors import InputError
from monai_ad.training import resolve_device
from monai_ad.transforms.array import axial_slices
from monai_ad.transforms.pipeline import IMAGE, ROI, build_preprocessing, run_pipeline

from lib import studies as study_rules
from lib.datastore import atomic_copy
from lib.infers.anomaly import bundle_predictor

logger = logging.getLogger(__name__)

RECORD = "memory_feedback"
ERASED, KEPT = "erased", "kept"
VERSION_NAME = re.compile(r"^v(\d{4,})\.pt$")


# ----------------------------------------------------------------------------- versions
def versions_dir(model_path: str | os.PathLike) -> Path:
    model_path = Path(model_path)
    return model_path.parent / "versions" / model_path.stem


def model_versions(model_path: str | os.PathLike) -> list[Path]:
    """The kept versions of a model, oldest first."""
    folder = versions_dir(model_path)
    found = [(int(m.group(1)), p) for p in folder.glob("v*.pt") if (m := VERSION_NAME.match(p.name))] if folder.is_dir() else []
    return [p for _, p in sorted(found)]


def keep_version(model_path: str | os.PathLike, source: str | os.PathLike) -> Path:
    """Copy ``source`` (the model file served now) to the next numbered version of ``model_path``."""
    kept = model_versions(model_path)
    number = int(VERSION_NAME.match(kept[-1].name).group(1)) + 1 if kept else 1
    target = versions_dir(model_path) / f"v{number:04d}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_copy(source, target)
    return target


def _lock(model_path: str | os.PathLike) -> FileLock:
    """One memory update or undo of a model at a time (the server thread and a scoring process alike)."""
    return FileLock(str(Path(model_path).with_suffix(".memory.lock")))


def undo_memory_update(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """Put the newest kept version back as the model (atomically) and drop it from the versions; None when no
    version is kept."""
    with _lock(model_path):
        kept = model_versions(model_path)
        if not kept:
            return None
        atomic_copy(kept[-1], model_path)
        kept[-1].unlink()
    logger.info("memory update undone: %s restored from %s (%d earlier version(s) kept)", model_path, kept[-1].name, len(kept) - 1)
    return {"restored": kept[-1].name, "versions_left": len(kept) - 1}


# ----------------------------------------------------------------------------- what a correction teaches
def correction_slices(predictor, image: str, roi: str, erased: np.ndarray, kept: np.ndarray) -> dict[str, torch.Tensor] | None:
    """The slices of a study that hold erased voxels, on the model's slice grid: the image as the model was fitted
    on it (its stored pre-processing, through ``build_preprocessing``, the masks following the ROI through every
    spatial step), the ROI, the erased mask and the kept anomaly mask, each ``[N, C, S, S]``; None when no erased
    voxel reaches a scored slice."""
    data = run_pipeline(predictor.loading, {IMAGE: image, ROI: roi})
    reference = data[IMAGE]
    for key, mask in ((ERASED, erased), (KEPT, kept)):
        data[key] = MetaTensor(torch.as_tensor(mask[None].astype(np.uint8)), meta=dict(reference.meta))
    pipeline = build_preprocessing(predictor.config, predictor.roi_labels, mask_keys=[ERASED, KEPT], loading=False)
    data = run_pipeline(pipeline, data)
    slices = {key: axial_slices(torch.as_tensor(data[key].as_tensor())) for key in (IMAGE, ROI, ERASED, KEPT)}
    roi_pixels = (slices[ROI] > 0).flatten(1).sum(1)
    chosen = (slices[ERASED] > 0).flatten(1).any(1) & (roi_pixels >= predictor.config.min_roi_pixels)
    if not bool(chosen.any()):
        return None
    return {key: value[chosen] if key == IMAGE else value[chosen] > 0 for key, value in slices.items()}


def remember_corrections(
    name: str,
    bundle: str | os.PathLike,
    model_path: str | os.PathLike,
    cases: list[study_rules.Study],
    device: str | None = None,
    source_path: str | os.PathLike | None = None,
    roi_label: int | None = None,
) -> dict[str, Any] | None:
    """Teach the detector at ``source_path`` (default ``model_path``) the erased regions of the ``cases`` it has not
    been taught yet, keep the file it replaces as a version, and save it at ``model_path``. None for a detector
    without a memory; otherwise the update's record (``added`` 0 when nothing was new)."""
    with _lock(model_path):
        source = Path(source_path or model_path)
        loaded_stamp = _stamp(source)
        detector = AnomalyDetector.load(source, device=resolve_device(device))
        if not detector.learns_from_corrections:
            return None
        record = dict(detector.thresholds.get(RECORD) or {})
        taught = dict(record.get("taught") or {})
        pending = [c for c in cases if c.final and taught.get(c.image_id) != os.path.getmtime(c.final)]
        if not pending:
            return {**record, "added": 0}
        predictor = bundle_predictor(bundle, detector, {"roi_label": roi_label})  # the infer task's, as a request gets it
        added, studies = 0, []
        for case in pending:
            try:
                final = np.asarray(nib.load(case.final).dataobj) > 0
            except Exception as exc:  # torn by a crash, edited by hand: reported and left for the next save
                logger.warning("[%s] %s: label cannot be read (%s): not taught", name, case.image_id, type(exc).__name__)
                continue
            served = predictor(case.image, case.roi).label_map > 0  # what the model shows for this study now
            if final.shape != served.shape:
                logger.warning("[%s] %s: final label shape %s differs from the image %s: not taught", name, case.image_id, final.shape, served.shape)
                continue
            erased = served & ~final
            slices = correction_slices(predictor, case.image, case.roi, erased, final) if erased.any() else None
            count = 0 if slices is None else detector.remember_normal(slices[IMAGE], slices[ROI], slices[ERASED], avoid=slices[KEPT])
            taught[case.image_id] = os.path.getmtime(case.final)
            studies.append({"image": case.image_id, "erased_voxels": int(erased.sum()), "added": int(count)})
            added += count
            logger.info("[%s] %s: %d erased voxels taught as normal (%d features added to the memory)", name, case.image_id, int(erased.sum()), count)
        if not studies:
            return None
        history = list(record.get("updates") or [])
        if added:
            history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "added": added, "studies": [s["image"] for s in studies]})
        detector.thresholds = {**detector.thresholds, RECORD: {"taught": taught, "updates": history}}
        if _stamp(source) != loaded_stamp or (Path(model_path) != source and Path(model_path).is_file()):
            # replaced meanwhile (a training finished): teach the new model instead of overwriting it
            logger.info("[%s] the model changed during the memory update: teaching the new one", name)
            replaced = True
        else:
            replaced = False
            version = keep_version(model_path, source) if source.is_file() else None
            detector.save(model_path)
    if replaced:
        return remember_corrections(name, bundle, model_path, cases, device, model_path, roi_label)
    logger.info("[%s] memory update: %d features from %d corrected studies; previous model kept as %s", name, added, len(studies), version)
    return {"taught": taught, "updates": history, "added": added, "studies": studies, "version": str(version) if version else None}


def _stamp(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def served_model(config) -> str | None:
    """The model file a detector config serves: the last existing of its paths (the app's over the bundle's)."""
    return next((p for p in reversed(config.path) if Path(p).is_file()), None)


class FeedbackMemory(ScoringMethod):
    """``/scoring/feedback_memory``: teach every trained memory detector (``{"model": "<bundle>"}`` for one; ``{"image":
    "<id>"}`` for one study) the erased regions of the corrected studies not taught yet. The app also runs it when a
    ``final`` label is saved."""

    def __init__(self, detectors: dict[str, Any], roi_dir: str | None = None, roi_label: Any = None):
        super().__init__("Add the regions radiologists erased to the memory of the memory-bank detectors (no retraining)")
        self.detectors, self.roi_dir = detectors, roi_dir
        self.roi_label = None if roi_label in (None, "") else int(roi_label)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        wanted, image = request.get("model"), request.get("image")
        cases = [c for c in study_rules.corrected_studies(datastore, self.roi_dir) if not image or c.image_id == image]
        results = {}
        for name, config in self.detectors.items():
            source = served_model(config)
            if (wanted and name != wanted) or source is None or not cases:
                continue
            try:
                result = remember_corrections(
                    name, config.bundle, config.app_model, cases, request.get("device"), source_path=source, roi_label=self.roi_label
                )
            except InputError as exc:
                logger.warning("[%s] corrections not taught: %s", name, exc)
                continue
            if result is not None:
                results[name] = result
        return results


class UndoMemoryUpdate(ScoringMethod):
    """``/scoring/undo_memory_update`` with ``{"model": "<bundle>"}``: restore the model as it was before its last
    memory update."""

    def __init__(self, detectors: dict[str, Any]):
        super().__init__("Restore a detector's model as it was before its last memory update")
        self.detectors = detectors

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        name = request.get("model")
        if name not in self.detectors:  # also the run of every scoring method that follows a training: nothing undone
            logger.info("undo_memory_update names no served model (%r; models: %s): nothing undone", name, sorted(self.detectors))
            return {}
        restored = undo_memory_update(self.detectors[name].app_model)
        return {name: restored or {"restored": None, "versions_left": 0}}


class MemoryUpdates:
    """Runs ``FeedbackMemory`` for a study whose label was just saved, in one background thread (updates one after
    another, in the order the labels came), so the save answers at once and the server goes on serving meanwhile."""

    def __init__(self, method: FeedbackMemory):
        self.method = method
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-update")

    def label_saved(self, image_id: str, datastore: Datastore) -> dict[str, Any]:
        """Queue the memory update for ``image_id``: of the model its ``final`` label's info names (``{"model":
        "<bundle>"}``, the result it corrects), else of every memory detector."""
        try:
            model = (datastore.get_label_info(image_id, study_rules.FINAL_TAG) or {}).get("model")
        except Exception:  # no final label (another tag was saved) or a store without label info
            model = None
        model = model if model in self.method.detectors else None

        def run() -> None:
            try:
                self.method({"image": image_id, "model": model}, datastore)
            except Exception:  # logged with its cause; the label stays saved and the next save tries again
                logger.exception("memory update for %s failed", image_id)

        self.worker.submit(run)
        return {"memory_update": {"image": image_id, "models": [model] if model else "memory detectors"}}
