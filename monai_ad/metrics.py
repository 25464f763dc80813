"""Detection and localisation metrics for anomaly maps.

Slice level: AUROC, AUPRC (average precision), F1 / precision / recall at a threshold.
Pixel level: AUROC over all pixels or within an ROI, AUPRO (anomalib/BMAD variant, see :func:`aupro`), Dice /
precision / recall at a threshold.

Inputs are numpy arrays or torch tensors. Pixel-level inputs are stacks of 2-D slices ``[N, H, W]`` (a single
``[H, W]`` slice also works), or a list of such stacks when the in-plane size differs between cases; masks,
maps and ROI must then be lists of the same shapes.

A metric that is undefined for the data (one class only, no lesion region, 0/0) raises
:class:`UndefinedMetricError` (a ``ValueError``) from the metric functions, except the thresholded scores,
which return ``nan`` for a 0/0 ratio. :func:`evaluate_scores` turns both into ``None`` with the reason under
``notes``. Malformed input (shape mismatch, NaN scores) raises a plain ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

__all__ = [
    "UndefinedMetricError",
    "slice_auroc",
    "slice_auprc",
    "slice_scores_at",
    "slice_f1",
    "pixel_auroc",
    "label_regions",
    "pro_curve",
    "aupro",
    "dice",
    "precision_recall_f1",
    "segmentation_scores",
    "evaluate_scores",
]

# 8-connectivity inside each axial slice, no connection between slices: one ndimage.label call labels every
# slice of a stack with labels unique over the stack.
_SLICE_8 = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8[1] = True


class UndefinedMetricError(ValueError):
    """The metric is not defined for this data (e.g. only one class present)."""


# ----------------------------------------------------------------------------- input handling
def _array(x: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _scores(x: Any) -> np.ndarray:
    """Floating scores without a copy when they are already floating point."""
    x = _array(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x


def _slice_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = _array(labels).ravel() > 0, _scores(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} slice labels but {scores.size} slice scores")
    if np.isnan(scores).any():
        raise ValueError("slice scores contain NaN (pass only the slices that were scored)")
    return labels, scores


def _two_classes(labels: np.ndarray, what: str) -> None:
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or n_pos == labels.size:
        raise UndefinedMetricError(f"{what} needs both normal and abnormal samples ({n_pos} abnormal of {labels.size})")


def _is_sequence_of_arrays(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(hasattr(v, "shape") for v in x)


def _stacks(masks: Any, maps: Any, roi: Any = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Normalise pixel-level inputs to a list of ``(mask bool [N,H,W], map float [N,H,W], roi bool | None)``."""
    if _is_sequence_of_arrays(masks) or _is_sequence_of_arrays(maps):
        if not (isinstance(masks, (list, tuple)) and isinstance(maps, (list, tuple)) and len(masks) == len(maps)):
            raise ValueError("masks and maps must both be lists of the same length")
        if roi is not None and not (isinstance(roi, (list, tuple)) and len(roi) == len(masks)):
            raise ValueError("with lists of masks and maps, roi must be a list of the same length")
        rois = roi if roi is not None else [None] * len(masks)
        return [_stack(m, s, r) for m, s, r in zip(masks, maps, rois)]
    return [_stack(masks, maps, roi)]


def _stack(mask: Any, score: Any, roi: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    mask, score = _array(mask), _scores(score)
    mask = mask if mask.dtype == bool else mask > 0
    if mask.shape != score.shape:
        raise ValueError(f"mask shape {mask.shape} differs from map shape {score.shape}")
    if mask.ndim == 2:
        mask, score = mask[None], score[None]
    if mask.ndim != 3:
        raise ValueError(f"pixel inputs must be [N, H, W] stacks of slices or [H, W] slices, got shape {mask.shape}")
    if roi is not None:
        roi = _array(roi)
        roi = roi if roi.dtype == bool else roi > 0
        roi = roi.reshape(mask.shape) if roi.size == mask.size else roi
        if roi.shape != mask.shape:
            raise ValueError(f"roi shape {roi.shape} differs from mask shape {mask.shape}")
    return mask, score, roi


def _check_no_nan(*arrays: np.ndarray) -> None:
    if any(np.isnan(a).any() for a in arrays):
        raise ValueError("anomaly maps contain NaN")


# ----------------------------------------------------------------------------- slice level
def slice_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of per-slice scores (labels: 1 = abnormal slice).

    Raises :class:`UndefinedMetricError` when only one class is present.
    """
    labels, scores = _slice_inputs(labels, scores)
    _two_classes(labels, "slice AUROC")
    return float(roc_auc_score(labels, scores))


def slice_auprc(labels: Any, scores: Any) -> float:
    """Average precision of the abnormal class (sklearn's step-wise area under the precision-recall curve).

    Raises :class:`UndefinedMetricError` when only one class is present.
    """
    labels, scores = _slice_inputs(labels, scores)
    _two_classes(labels, "slice AUPRC")
    return float(average_precision_score(labels, scores))


def precision_recall_f1(pred: Any, gt: Any) -> dict[str, float]:
    """Precision, recall and F1 (= Dice) of a boolean prediction; ``nan`` where a ratio is 0/0."""
    pred, gt = _array(pred) > 0, _array(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    return _ratios(tp, n_pred, n_gt)


def _ratios(tp: int, n_pred: int, n_gt: int) -> dict[str, float]:
    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {"precision": ratio(tp, n_pred), "recall": ratio(tp, n_gt), "f1": ratio(2 * tp, n_pred + n_gt)}


def slice_scores_at(labels: Any, scores: Any, threshold: float) -> dict[str, float]:
    """F1, precision and recall of the rule "slice is abnormal when score >= threshold"."""
    labels, scores = _slice_inputs(labels, scores)
    return precision_recall_f1(scores >= threshold, labels)


def slice_f1(labels: Any, scores: Any, threshold: float) -> float:
    """F1 of "slice is abnormal when score >= threshold"; ``nan`` with no abnormal slice and no detection."""
    return slice_scores_at(labels, scores, threshold)["f1"]


# ----------------------------------------------------------------------------- pixel level
def _auroc_from_scores(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Mann-Whitney form of the AUROC, ties counted one half (equal to sklearn's ``roc_auc_score``).

    Only the negatives are sorted (in place; the caller passes a copy), so memory stays at one copy of the
    scores rather than the several float64/int64 arrays of a full ROC curve.
    """
    negatives.sort()
    below = np.searchsorted(negatives, positives, side="left")
    not_above = np.searchsorted(negatives, positives, side="right")
    wins = below.sum(dtype=np.float64) + 0.5 * (not_above - below).sum(dtype=np.float64)
    return float(wins / (float(negatives.size) * float(positives.size)))


def pixel_auroc(masks: Any, maps: Any, roi: Any = None) -> float:
    """AUROC over all pixels, or only over the pixels inside ``roi`` (e.g. the liver) when given.

    Raises :class:`UndefinedMetricError` when the (ROI-restricted) pixels hold a single class.
    """
    negatives, positives = [], []
    for mask, score, region in _stacks(masks, maps, roi):
        if region is None:
            negatives.append(score[~mask])
            positives.append(score[mask])
        else:
            negatives.append(score[region & ~mask])
            positives.append(score[region & mask])
    neg = negatives[0] if len(negatives) == 1 else np.concatenate(negatives)
    pos = positives[0] if len(positives) == 1 else np.concatenate(positives)
    _check_no_nan(neg, pos)
    if neg.size == 0 or pos.size == 0:
        where = "inside the ROI " if roi is not None else ""
        raise UndefinedMetricError(
            f"pixel AUROC needs both normal and lesion pixels {where}({pos.size} lesion of {pos.size + neg.size})"
        )
    return _auroc_from_scores(neg, pos)


def label_regions(masks: Any) -> tuple[np.ndarray, int]:
    """8-connected components of each 2-D slice of a ``[N, H, W]`` mask; labels are unique over the stack.

    Returns ``(labels int32 [N, H, W], number of regions)``.
    """
    mask = _array(masks) > 0
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] or [H, W], got shape {mask.shape}")
    labels, n = ndimage.label(mask, structure=_SLICE_8)
    return labels, int(n)


def _pro_inputs(masks: Any, maps: Any, roi: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Background scores, lesion-pixel scores, lesion-pixel weights (1 / (region size * number of regions))."""
    negatives, positives, sizes = [], [], []
    n_regions = 0
    for mask, score, region in _stacks(masks, maps, roi):
        if region is not None:
            mask = mask & region
            negatives.append(score[region & ~mask])
        else:
            negatives.append(score[~mask])
        labels, n = ndimage.label(mask, structure=_SLICE_8)
        if n:
            ids = labels[mask]  # same (C) order as score[mask]
            positives.append(score[mask])
            sizes.append(np.bincount(ids)[ids])
        del labels
        n_regions += n
    if n_regions == 0:
        raise UndefinedMetricError("AUPRO needs at least one lesion region")
    neg = negatives[0] if len(negatives) == 1 else np.concatenate(negatives)
    if neg.size == 0:
        raise UndefinedMetricError("AUPRO needs normal (background) pixels")
    pos = np.concatenate(positives)
    _check_no_nan(neg, pos)
    weights = 1.0 / (np.concatenate(sizes).astype(np.float64) * n_regions)
    return neg, pos, weights, n_regions


def _pro_vertices(neg: np.ndarray, pos: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the exact region-averaged overlap-vs-FPR polyline from (0, 0) to (1, 1).

    All regions share one FPR axis (the FPR is over the background only), so averaging their piecewise-linear
    curves equals cumulating a per-pixel weight 1 / (region size * number of regions) down the score order.
    Between consecutive distinct lesion scores u_j only background pixels pass the threshold: the mean
    overlap stays at T_{j-1} while the FPR moves to a_j = #(bg > u_j) / n_bg; at u_j it reaches T_j while the
    FPR moves to b_j = #(bg >= u_j) / n_bg (a diagonal when background pixels tie with u_j).
    """
    neg.sort()
    order = np.argsort(-pos, kind="stable")
    pos, cum = pos[order], np.cumsum(weights[order])
    # runs of equal lesion scores in descending order
    ends = np.r_[np.nonzero(pos[1:] != pos[:-1])[0], pos.size - 1]
    thresholds = pos[ends]
    after = cum[ends]
    before = np.r_[0.0, after[:-1]]
    n_bg = float(neg.size)
    a = (neg.size - np.searchsorted(neg, thresholds, side="right")) / n_bg
    b = (neg.size - np.searchsorted(neg, thresholds, side="left")) / n_bg
    fpr = np.concatenate([[0.0], np.column_stack([a, b]).ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.column_stack([before, after]).ravel(), [after[-1]]])
    return fpr, np.minimum(pro, 1.0)


def _cut(fpr: np.ndarray, pro: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The polyline up to ``fpr = limit``, closed by a point linearly interpolated at the limit."""
    stop = int(np.searchsorted(fpr, limit, side="right"))  # first vertex beyond the limit
    if stop >= fpr.size:
        return fpr, pro
    x0, x1, y0, y1 = fpr[stop - 1], fpr[stop], pro[stop - 1], pro[stop]
    y = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    return np.r_[fpr[:stop], limit], np.r_[pro[:stop], y]


def pro_curve(masks: Any, maps: Any, fpr_limit: float = 1.0, roi: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve of :func:`aupro`: ``(fpr, mean overlap)`` vertices up to ``fpr_limit``."""
    _check_limit(fpr_limit)
    neg, pos, weights, _ = _pro_inputs(masks, maps, roi)
    return _cut(*_pro_vertices(neg, pos, weights), fpr_limit)


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, roi: Any = None) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit`` (anomalib/BMAD variant).

    - Regions: the 8-connected components of the ground truth in each 2-D slice of the ``[N, H, W]`` stack
      (a lesion cut by several slices counts once per slice; labels are unique over the whole set).
    - For each region, the ROC over (all background pixels of the set) ∪ (that region's pixels): the region's
      overlap (fraction of its pixels with score >= t, its TPR) against the FPR over *all* background pixels,
      as t runs over every distinct score; points joined linearly (ties give a diagonal segment).
    - The per-region curves are averaged with equal weight per region on a common FPR axis. Because every
      region's curve lives on the same FPR axis, the average is taken exactly at every breakpoint (the limit
      of an infinitely fine common grid) rather than on a fixed grid of resampled points.
    - The mean curve is cut at ``fpr_limit`` with linear interpolation at the limit; its trapezoid area is
      divided by ``fpr_limit``, so a perfect map scores 1 and a random one about ``fpr_limit / 2``.

    With ``roi`` (not part of the BMAD protocol) only pixels inside it count: the FPR is over the background
    inside the ROI and the regions are the components of ``masks & roi``. Without it, pixels outside the
    organ that carry the lowest score are easy true negatives and lift the value.

    Raises :class:`UndefinedMetricError` without a lesion region or without background pixels.
    """
    _check_limit(fpr_limit)
    neg, pos, weights, _ = _pro_inputs(masks, maps, roi)
    fpr, pro = _cut(*_pro_vertices(neg, pos, weights), fpr_limit)
    return float(auc(fpr, pro) / fpr_limit)


def dice(pred: Any, gt: Any) -> float:
    """Dice of two boolean masks (= voxel F1); ``nan`` when both are empty."""
    return precision_recall_f1(pred, gt)["f1"]


def segmentation_scores(masks: Any, maps: Any, threshold: float, roi: Any = None) -> dict[str, float]:
    """Voxel-level Dice (= F1), precision and recall of ``maps >= threshold`` against ``masks``.

    With ``roi`` the prediction is restricted to the ROI (as the pipeline's label maps are); lesion voxels
    outside the ROI stay in the ground truth and count as missed. A 0/0 ratio is ``nan``.
    """
    tp = n_pred = n_gt = 0
    for mask, score, region in _stacks(masks, maps, roi):
        pred = score >= threshold
        if region is not None:
            pred &= region
        tp += int(np.count_nonzero(pred & mask))
        n_pred += int(np.count_nonzero(pred))
        n_gt += int(np.count_nonzero(mask))
    out = _ratios(tp, n_pred, n_gt)
    return {"dice": out["f1"], "precision": out["precision"], "recall": out["recall"]}


# ----------------------------------------------------------------------------- everything at once
def evaluate_scores(
    slice_labels: Any,
    slice_scores: Any,
    masks: Any,
    maps: Any,
    roi: Any = None,
    pixel_threshold: float | None = None,
    slice_threshold: float | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """All metrics in one JSON-serialisable dict of plain floats / ints.

    Keys: ``slice_auroc``, ``slice_auprc``, ``pixel_auroc`` (all pixels), ``pixel_auroc_roi`` (inside ``roi``),
    ``aupro`` (up to ``fpr_limit``, BMAD protocol: all pixels), ``aupro_roi`` (only pixels inside ``roi``),
    ``dice``, ``pixel_precision``, ``pixel_recall`` (at ``pixel_threshold``, prediction restricted to ``roi``),
    ``slice_f1``, ``slice_precision``, ``slice_recall`` (at ``slice_threshold``), ``n_slices``,
    ``n_abnormal_slices``, ``n_regions``, ``aupro_fpr_limit``, ``notes``.
    Every metric key is always present; one that cannot be computed is ``None`` and ``notes[key]`` says why.
    """
    out: dict[str, Any] = {}
    notes: dict[str, str] = {}

    def attempt(keys: Sequence[str], fn, *args) -> None:
        try:
            values = fn(*args)
        except UndefinedMetricError as exc:
            values = [None] * len(keys)
            for key in keys:
                notes[key] = str(exc)
        values = values if isinstance(values, (list, tuple)) else [values]
        for key, value in zip(keys, values):
            if value is not None and not np.isfinite(value):
                notes[key] = f"{key} is undefined here (0/0: no positives predicted and/or none present)"
                value = None
            out[key] = None if value is None else float(value)

    attempt(["slice_auroc"], slice_auroc, slice_labels, slice_scores)
    attempt(["slice_auprc"], slice_auprc, slice_labels, slice_scores)
    attempt(["pixel_auroc"], pixel_auroc, masks, maps)
    if roi is None:
        out["pixel_auroc_roi"] = None
        notes["pixel_auroc_roi"] = "no ROI given"
    else:
        attempt(["pixel_auroc_roi"], pixel_auroc, masks, maps, roi)
    attempt(["aupro"], aupro, masks, maps, fpr_limit)
    if roi is None:
        out["aupro_roi"] = None
        notes["aupro_roi"] = "no ROI given"
    else:
        attempt(["aupro_roi"], aupro, masks, maps, fpr_limit, roi)

    seg_keys = ["dice", "pixel_precision", "pixel_recall"]
    if pixel_threshold is None:
        out.update(dict.fromkeys(seg_keys))
        notes.update(dict.fromkeys(seg_keys, "no pixel threshold given"))
    else:
        seg = segmentation_scores(masks, maps, pixel_threshold, roi)
        attempt(seg_keys, lambda: [seg["dice"], seg["precision"], seg["recall"]])

    slice_keys = ["slice_f1", "slice_precision", "slice_recall"]
    if slice_threshold is None:
        out.update(dict.fromkeys(slice_keys))
        notes.update(dict.fromkeys(slice_keys, "no slice threshold given"))
    else:
        at = slice_scores_at(slice_labels, slice_scores, slice_threshold)
        attempt(slice_keys, lambda: [at["f1"], at["precision"], at["recall"]])

    labels = _array(slice_labels).ravel() > 0
    out["n_slices"] = int(labels.size)
    out["n_abnormal_slices"] = int(np.count_nonzero(labels))
    out["n_regions"] = int(sum(label_regions(mask)[1] for mask, _, _ in _stacks(masks, maps)))
    out["aupro_fpr_limit"] = float(fpr_limit)
    out["notes"] = notes
    return out
