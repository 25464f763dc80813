"""Choose a detector's operating (pixel) threshold on the cases radiologists corrected.

This is the weakly-supervised threshold selection of the deep perceptual autoencoder paper (Shvetsova et al.:
take the threshold that maximises Dice on a handful of labelled images), made interactive: the labelled images
are the studies with a ``final`` label in the datastore, which grow as radiologists correct and save segments.

Choices the paper leaves open: Dice is pooled over all corrected cases (sum of overlaps over sum of sizes), so
a corrected normal study (empty ``final``) counts its false positives; the search runs over every distinct
heatmap value inside the liver ROI (exact, by sorting); the chosen threshold is kept only when the label maps it
gives (after the connected-component size filter) score at least as well as the current one. Before/after
figures are logged, returned, and stored with the model (``thresholds["feedback"]``); the model is saved to the
app's model path, where the infer task picks it up.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from monai_ad.detectors.base import AnomalyDetector
from monai_ad.postprocess import label_lesions
from monai_ad.training import resolve_device

from lib import studies as study_rules
from lib.infers.anomaly import bundle_predictor

logger = logging.getLogger(__name__)


def best_dice_threshold(scores: np.ndarray, truth: np.ndarray, missed: int = 0) -> tuple[float, float]:
    """The threshold ``t`` (predict ``scores >= t``) with the highest pooled Dice, and that Dice.

    ``missed``: positive voxels that no threshold can reach (outside the ROI), counted as false negatives.
    """
    scores, truth = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(truth, dtype=bool).ravel()
    positives = int(truth.sum()) + int(missed)
    if scores.size == 0 or positives == 0:
        return float(np.max(scores)) + 1.0 if scores.size else float("inf"), 1.0 if positives == 0 else 0.0
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    true_pos = np.cumsum(sorted_truth)
    # only where the next score is lower is "the top k voxels" a threshold
    last_of_value = np.append(sorted_scores[1:] < sorted_scores[:-1], True)
    k = np.arange(1, scores.size + 1)[last_of_value]
    dice = 2.0 * true_pos[last_of_value] / (k + positives)
    best = int(np.argmax(dice))
    return float(sorted_scores[last_of_value][best]), float(dice[best])


def pooled_label_dice(label_maps: list[np.ndarray], truths: list[np.ndarray]) -> float | None:
    overlap = sum(int(np.logical_and(p > 0, t).sum()) for p, t in zip(label_maps, truths))
    total = sum(int((p > 0).sum()) + int(t.sum()) for p, t in zip(label_maps, truths))
    return 2.0 * overlap / total if total else None


def select_threshold(
    name: str,
    bundle: str | os.PathLike,
    model_path: str | os.PathLike,
    datastore: Datastore,
    roi_dir: str | None = None,
    device: str | None = None,
    source_path: str | os.PathLike | None = None,
    roi_label: int | None = None,
) -> dict[str, Any] | None:
    """Pick the pixel threshold maximising Dice on the corrected studies; save it with the model at
    ``model_path`` (read from ``source_path`` when given, e.g. the bundle's own model). None when no study is
    corrected."""
    cases = study_rules.corrected_studies(datastore, roi_dir)
    if not cases:
        logger.info("[%s] no corrected studies ('final' labels with a liver ROI): threshold unchanged", name)
        return None
    source = Path(source_path or model_path)
    signature = {case.image_id: os.path.getmtime(case.final) for case in cases}
    stored = _stored_feedback(source)
    if stored and stored.get("signature") == signature:
        logger.info("[%s] threshold already selected on these %d corrected studies: unchanged", name, len(cases))
        return stored
    detector = AnomalyDetector.load(source, device=resolve_device(device))
    predictor = bundle_predictor(bundle, detector, {"roi_label": roi_label})  # the infer task's, as a request gets it
    heatmaps, truths, rois, affines, used = [], [], [], [], []
    for case in cases:
        try:  # a label that cannot be read (torn by a crash, edited by hand) is reported and skipped
            truth = np.asarray(nib.load(case.final).dataobj) > 0
        except Exception as exc:
            logger.warning("[%s] %s: label cannot be read (%s): skipped", name, case.image_id, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            continue
        result = predictor(case.image, case.roi, keep_inputs=True)  # an ROI off the image's grid is an InputError
        if truth.shape != result.heatmap.shape:
            logger.warning("[%s] %s: final label shape %s differs from the image %s: skipped", name, case.image_id, truth.shape, result.heatmap.shape)
            continue
        heatmaps.append(result.heatmap), truths.append(truth), rois.append(result.roi), affines.append(result.affine)
        used.append(case.image_id)
        logger.info("[%s] scored corrected study %s (%d anomaly voxels)", name, case.image_id, int(truth.sum()))
    if not used:
        return None
    inside = np.concatenate([h[r] for h, r in zip(heatmaps, rois)])
    truth_inside = np.concatenate([t[r] for t, r in zip(truths, rois)])
    missed = sum(int(np.logical_and(t, ~r).sum()) for t, r in zip(truths, rois))
    candidate, voxel_dice = best_dice_threshold(inside, truth_inside, missed)

    min_mm3 = float(predictor.min_lesion_mm3)

    def label_dice(threshold: float) -> float | None:
        maps = [label_lesions(h, a, threshold, min_mm3)[0] for h, a in zip(heatmaps, affines)]
        return pooled_label_dice(maps, truths)

    before_threshold = float(predictor.pixel_threshold)
    before, after = label_dice(before_threshold), label_dice(candidate)
    keep_new = after is not None and (before is None or after >= before)
    chosen = candidate if keep_new else before_threshold
    thresholds = dict(detector.thresholds)
    thresholds.setdefault("pixel_calibrated", thresholds.get("pixel"))
    feedback = {
        "cases": used,
        "n_cases": len(used),
        "threshold_before": before_threshold,
        "threshold_after": chosen,
        "dice_before": before,
        "dice_after": after if keep_new else before,
        "dice_candidate": after,
        "voxel_dice_in_roi": voxel_dice,
        "changed": keep_new and chosen != before_threshold,
        "signature": signature,
        "selected": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    thresholds.update({"pixel": chosen, "pixel_method": "max pooled Dice on corrected studies", "feedback": feedback})
    detector.thresholds = thresholds
    detector.save(model_path)
    logger.info(
        "[%s] operating threshold on %d corrected studies: %.6g -> %.6g; Dice %s -> %s",
        name, len(used), before_threshold, chosen, _fmt(before), _fmt(feedback["dice_after"]),
    )  # fmt: skip
    return feedback


def _stored_feedback(model_path: Path) -> dict[str, Any] | None:
    """The feedback record saved with a model, read without building the detector."""
    try:
        payload = torch.load(model_path, map_location="cpu", weights_only=True)
        return dict(payload.get("thresholds", {}).get("feedback") or {}) or None
    except Exception:
        return None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class FeedbackThreshold(ScoringMethod):
    """``/scoring/feedback_threshold``: re-select every trained detector's threshold on the corrected studies
    (``{"model": "<bundle>"}`` for one)."""

    def __init__(self, detectors: dict[str, Any], roi_dir: str | None = None, roi_label: Any = None):
        super().__init__("Choose each detector's threshold to maximise Dice on the studies with a 'final' label")
        self.detectors, self.roi_dir = detectors, roi_dir
        self.roi_label = None if roi_label in (None, "") else int(roi_label)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        wanted = request.get("model")
        results = {}
        for name, config in self.detectors.items():
            if wanted and name != wanted:
                continue
            source = next((p for p in reversed(config.path) if Path(p).is_file()), None)
            if source is None:
                logger.info("[%s] not trained yet: skipped", name)
                continue
            results[name] = select_threshold(
                name, config.bundle, config.app_model, datastore, self.roi_dir, request.get("device"), source_path=source,
                roi_label=self.roi_label,
            )
        return results
