"""Detection and localisation metrics: slice AUROC/AUPRC, pixel AUROC (all pixels / in the ROI), AUPRO, Dice, F1.

Inputs are numpy arrays or torch tensors; pixel-level inputs are stacks of 2-D slices ``[N, H, W]``.
Values that cannot be computed (a single class present) come back as ``None`` from ``evaluate_scores`` with
the reason in ``notes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score


def _np(x: Any, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _two_classes(labels: np.ndarray, what: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"{what} needs both normal and abnormal samples (got {n_pos} abnormal of {labels.size})")


def slice_auroc(labels, scores) -> float:
    labels, scores = _np(labels, bool).ravel(), _np(scores, np.float64).ravel()
    _two_classes(labels, "slice AUROC")
    return float(roc_auc_score(labels, scores))


def slice_auprc(labels, scores) -> float:
    """Average precision (area under the precision-recall curve) of the abnormal class."""
    labels, scores = _np(labels, bool).ravel(), _np(scores, np.float64).ravel()
    _two_classes(labels, "slice AUPRC")
    return float(average_precision_score(labels, scores))


def pixel_auroc(masks, maps, roi=None) -> float:
    """AUROC over all pixels, or only the pixels inside ``roi`` (e.g. the liver) when given."""
    masks, maps = _np(masks, bool), _np(maps, np.float32)
    if roi is not None:
        keep = _np(roi, bool)
        masks, maps = masks[keep], maps[keep]
    masks, maps = masks.ravel(), maps.ravel()
    _two_classes(masks, "pixel AUROC")
    return float(roc_auc_score(masks, maps))


def aupro(masks, maps, fpr_limit: float = 0.3, num_points: int = 1000) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1] (anomalib/BMAD variant).

    Ground-truth regions are the 8-connected components of each 2-D slice (``[N, H, W]`` input). For every
    region, its overlap (the fraction of its pixels above the threshold) is traced against the false-positive
    rate over *all* normal pixels of the set; each curve is cut at ``fpr_limit`` (linear interpolation at the
    limit) and resampled on a common FPR grid; the curves are averaged with equal weight per region; the
    trapezoid area under the mean curve is divided by ``fpr_limit``.
    """
    masks, maps = _np(masks, bool), _np(maps, np.float32)
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    regions = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    eight = np.ones((3, 3), dtype=bool)
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=eight)
        regions[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region")
    background = ~masks
    n_background = int(background.sum())
    if n_background == 0:
        raise ValueError("AUPRO needs normal pixels")

    scores, ids = maps.ravel(), regions.ravel()
    order = np.argsort(-scores, kind="stable")
    s_sorted, id_sorted = scores[order], ids[order]
    # thresholds at distinct score values: index of the last element of each run of equal scores
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    fpr = np.cumsum(id_sorted == 0)[last] / n_background
    fpr = np.r_[0.0, fpr]
    grid = np.linspace(0.0, fpr_limit, num_points)
    sizes = np.bincount(ids, minlength=n_regions + 1)
    mean_overlap = np.zeros_like(grid)
    positions = np.nonzero(id_sorted > 0)[0]
    region_of = id_sorted[positions]
    for region in range(1, n_regions + 1):
        hits = positions[region_of == region]
        # number of this region's pixels at or above each threshold
        tpr = np.r_[0.0, np.searchsorted(hits, last, side="right") / sizes[region]]
        mean_overlap += np.interp(grid, fpr, tpr)
    mean_overlap /= n_regions
    return float(auc(grid, mean_overlap) / fpr_limit)


def segmentation_scores(masks, maps, threshold: float, roi=None) -> dict[str, float]:
    """Voxel-level Dice (= F1), precision and recall of ``maps >= threshold`` against ``masks``."""
    masks, pred = _np(masks, bool), _np(maps, np.float32) >= threshold
    if roi is not None:
        pred &= _np(roi, bool)
    tp = float((pred & masks).sum())
    fp = float((pred & ~masks).sum())
    fn = float((~pred & masks).sum())
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
    }


def slice_f1(labels, scores, threshold: float) -> float:
    labels = _np(labels, bool).ravel()
    pred = _np(scores, np.float64).ravel() >= threshold
    tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0


def evaluate_scores(
    slice_labels,
    slice_scores,
    masks,
    maps,
    roi=None,
    pixel_threshold: float | None = None,
    slice_threshold: float | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """All metrics in one JSON-serialisable dict (``None`` where not computable, reason in ``notes``)."""
    out: dict[str, Any] = {}
    notes: dict[str, str] = {}

    def attempt(name, fn, *args, **kwargs):
        try:
            out[name] = fn(*args, **kwargs)
        except ValueError as exc:
            out[name] = None
            notes[name] = str(exc)

    attempt("slice_auroc", slice_auroc, slice_labels, slice_scores)
    attempt("slice_auprc", slice_auprc, slice_labels, slice_scores)
    attempt("pixel_auroc", pixel_auroc, masks, maps)
    attempt("pixel_auroc_roi", pixel_auroc, masks, maps, roi) if roi is not None else None
    attempt("aupro", aupro, masks, maps, fpr_limit)
    if pixel_threshold is not None:
        seg = segmentation_scores(masks, maps, pixel_threshold, roi)
        out.update({"dice": seg["dice"], "pixel_precision": seg["precision"], "pixel_recall": seg["recall"]})
    if slice_threshold is not None:
        out["slice_f1"] = slice_f1(slice_labels, slice_scores, slice_threshold)
    labels = _np(slice_labels, bool)
    out.update(
        {
            "n_slices": int(labels.size),
            "n_abnormal_slices": int(labels.sum()),
            "n_regions": int(sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in _np(masks, bool))),
            "aupro_variant": f"anomalib/BMAD: per-region overlap vs FPR over all normal pixels, 8-connected 2-D regions, cut at FPR {fpr_limit}, normalised",
        }
    )
    out["notes"] = notes
    return out
