"""Detection and localisation metrics for anomaly maps.

Slice level: AUROC, AUPRC (average precision), F1 / precision / recall at a threshold.
Pixel level: AUROC over all pixels or within an ROI, AUPRO (anomalib/BMAD variant, see :func:`aupro`), Dice /
precision / recall at a threshold.
Lesion level (3-D volumes): which ground-truth lesions a thresholded map finds and how many false regions it
marks (:func:`detect_lesions`); the FROC curve over thresholds and the sensitivity at a given number of false
regions per scan (:func:`lesion_froc`), both also by lesion size (:data:`SIZE_BINS_MM`); how much of each
lesion a map covers at a fixed voxel false-positive rate in normal liver (:func:`lesion_coverage`).

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
    "lesion_components",
    "detect_lesions",
    "lesion_froc",
    "match_regions",
    "lesion_coverage",
    "size_bin_names",
    "SIZE_BINS_MM",
]

# Lesion size classes by equivalent diameter (mm): < 5, 5–10, 10–20 and ≥ 20 mm. Lesions under 10 mm are the
# ones a reader misses most often, and the ones that patch features several millimetres wide blur away.
SIZE_BINS_MM: tuple[float, ...] = (5.0, 10.0, 20.0)

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


# ----------------------------------------------------------------------------- lesion level (3-D)
# 26-connectivity: voxels that share a face, an edge or a corner belong to one region
_FULL_3D = np.ones((3, 3, 3), dtype=bool)


def _volume3d(x: Any, what: str, dtype: Any = None) -> np.ndarray:
    x = _array(x, dtype)
    if x.ndim != 3:
        raise ValueError(f"{what} must be a 3-D volume, got shape {x.shape}")
    return x


def _voxel_mm3(spacing: Sequence[float] | None) -> float:
    if spacing is None:
        return 1.0
    spacing = [float(s) for s in spacing]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing}")
    return float(np.prod(spacing))


def size_bin_names(edges_mm: Sequence[float] = SIZE_BINS_MM) -> list[str]:
    """Names of the size classes that ``edges_mm`` cut: ``["<5 mm", "5-10 mm", "10-20 mm", ">=20 mm"]``."""
    edges = [float(e) for e in edges_mm]
    if not edges or edges != sorted(edges) or edges[0] <= 0:
        raise ValueError(f"size bin edges must be increasing positive diameters in mm, got {list(edges_mm)}")
    inner = [f"{a:g}-{b:g} mm" for a, b in zip(edges[:-1], edges[1:])]
    return [f"<{edges[0]:g} mm", *inner, f">={edges[-1]:g} mm"]


def _size_classes(diameters: np.ndarray, edges_mm: Sequence[float]) -> np.ndarray:
    """Each diameter's size class (0 for the smallest), the classes of :func:`size_bin_names`."""
    return np.digitize(np.asarray(diameters, dtype=np.float64), np.asarray(edges_mm, dtype=np.float64), right=False)


def _mean_by_class(values: np.ndarray, classes: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    return {name: (float(values[classes == i].mean()) if (classes == i).any() else None) for i, name in enumerate(names)}


def lesion_components(lesion: Any, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """The 3-D (26-connected) components of a lesion mask.

    Returns ``(labels int32, number of lesions, equivalent diameters in mm)``: the diameter of the sphere with
    each component's volume, ``(6 V / pi) ** (1/3)``, with ``V`` from ``spacing`` (mm; voxels when omitted).
    """
    mask = _volume3d(lesion, "lesion mask") > 0
    labels, n = ndimage.label(mask, structure=_FULL_3D)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    diameters = np.cbrt(6.0 * counts * _voxel_mm3(spacing) / np.pi)
    return labels.astype(np.int32, copy=False), int(n), diameters


def match_regions(
    predicted: np.ndarray,
    lesion_labels: np.ndarray,
    n_lesions: int,
    voxel_mm3: float,
    min_region_mm3: float = 0.0,
    min_region_overlap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The predicted regions of a boolean map against labelled lesions, as :func:`detect_lesions` reads them.

    Returns ``(regions, kept, true, match)``: the regions' labels (3-D, 26-connected) and, per region label
    (index 0 is the background), whether it is kept (at least ``min_region_mm3``), whether it is a hit, and the
    lesion (1-based) it overlaps most (0: none). Every kept region that is not a hit is a false region.
    """
    regions, m = ndimage.label(predicted, structure=_FULL_3D)
    size = np.bincount(regions.ravel(), minlength=m + 1)
    kept = size * voxel_mm3 >= min_region_mm3  # regions below the size limit are dropped, not counted
    kept[0] = False
    true, match = np.zeros(m + 1, dtype=bool), np.zeros(m + 1, dtype=np.int64)
    if n_lesions and m:
        # voxels shared by each (region, lesion) pair; each region is matched to the lesion it overlaps most
        inside = lesion_labels > 0
        pairs = regions[inside].astype(np.int64) * (n_lesions + 1) + lesion_labels[inside]
        shared = np.bincount(pairs, minlength=(m + 1) * (n_lesions + 1)).reshape(m + 1, n_lesions + 1)[:, 1:]
        overlap = shared.max(1)
        true = kept & (overlap > 0) & (overlap >= min_region_overlap * size)
        match = np.where(overlap > 0, shared.argmax(1) + 1, 0)
    return regions, kept, true, match


def _regions_vs_lesions(
    predicted: np.ndarray,
    lesion_labels: np.ndarray,
    n_lesions: int,
    voxel_mm3: float,
    min_region_mm3: float,
    min_region_overlap: float,
) -> tuple[np.ndarray, int, int]:
    """``(found [n_lesions] bool, number of predicted regions, number of false regions)`` of a boolean map."""
    _, kept, true, match = match_regions(predicted, lesion_labels, n_lesions, voxel_mm3, min_region_mm3, min_region_overlap)
    found = np.zeros(n_lesions, dtype=bool)
    found[match[true] - 1] = True
    n_regions = int(kept.sum())
    return found, n_regions, n_regions - int(true.sum())


def _kth_highest(scores: np.ndarray, labels: np.ndarray, n: int, k: int) -> np.ndarray:
    """Each labelled component's ``k``-th highest score (its lowest when it has fewer than ``k`` voxels)."""
    out = np.full(n, -np.inf)
    if n == 0:
        return out
    inside = labels > 0
    order = np.lexsort((-scores[inside], labels[inside]))  # by component, highest score first
    ranked_labels, ranked = labels[inside][order], scores[inside][order]
    starts = np.searchsorted(ranked_labels, np.arange(1, n + 1))
    ends = np.searchsorted(ranked_labels, np.arange(1, n + 1), side="right")
    for j, (a, b) in enumerate(zip(starts, ends)):
        if b > a:
            out[j] = ranked[min(a + k, b) - 1]
    return out


def detect_lesions(
    heatmap: Any,
    lesion: Any,
    threshold: float,
    roi: Any = None,
    spacing: Sequence[float] | None = None,
    min_region_mm3: float = 0.0,
    min_region_overlap: float = 0.0,
) -> dict[str, Any]:
    """Lesion-level reading of one scan at one threshold.

    Predicted regions: the 3-D (26-connected) components of ``heatmap >= threshold`` inside ``roi`` (e.g. the
    liver), those smaller than ``min_region_mm3`` dropped. Ground-truth lesions: the 3-D components of
    ``lesion``. Each predicted region is matched to the lesion it overlaps most (one region finds at most one
    lesion, as one mark on a film points at one lesion); it is *true* when that overlap is at least
    ``min_region_overlap`` of its own volume (0: any overlap), and then that lesion is *found*; every other
    region is a *false region*.

    Returns ``found`` (bool per lesion, in :func:`lesion_components` order), ``diameters_mm`` (equivalent
    diameters), ``n_lesions``, ``n_found``, ``n_regions``, ``n_false_regions``.
    """
    heat = _volume3d(heatmap, "heatmap")
    labels, n, diameters = lesion_components(lesion, spacing)
    if labels.shape != heat.shape:
        raise ValueError(f"lesion mask shape {labels.shape} differs from heatmap shape {heat.shape}")
    predicted = heat >= threshold
    if roi is not None:
        region = _volume3d(roi, "roi") > 0
        if region.shape != heat.shape:
            raise ValueError(f"roi shape {region.shape} differs from heatmap shape {heat.shape}")
        predicted &= region
    _check_no_nan(heat)
    found, n_regions, n_false = _regions_vs_lesions(
        predicted, labels, n, _voxel_mm3(spacing), min_region_mm3, min_region_overlap
    )
    return {
        "found": found,
        "diameters_mm": diameters,
        "n_lesions": n,
        "n_found": int(found.sum()),
        "n_regions": n_regions,
        "n_false_regions": n_false,
    }


def lesion_froc(
    heatmaps: Sequence[Any],
    lesions: Sequence[Any],
    rois: Sequence[Any] | None = None,
    spacings: Sequence[Sequence[float] | None] | None = None,
    max_fp_per_scan: float = 1.0,
    min_diameter_mm: float = 10.0,
    min_region_mm3: float = 0.0,
    min_region_overlap: float = 0.0,
    size_bins_mm: Sequence[float] = SIZE_BINS_MM,
) -> dict[str, Any]:
    """FROC over scans: lesion sensitivity against false regions per scan as the threshold sweeps.

    One entry per scan in each list (3-D volumes; scans without lesions count for false regions). Regions,
    lesions, hits and false regions as in :func:`detect_lesions`. The thresholds swept are where a lesion can
    start to count as found: its highest score inside the ROI, and, when regions below ``min_region_mm3`` are
    dropped, its k-th highest (k voxels make the smallest region kept; at its peak alone a lesion is one voxel),
    plus one above every score; at each the
    sensitivity (found / all lesions), the sensitivity for lesions of equivalent diameter ≥ ``min_diameter_mm``,
    and the mean number of false regions per scan are computed.

    Returns ``curve`` (a list of ``{"threshold", "fp_per_scan", "sensitivity", "sensitivity_large"}``, highest
    threshold first), ``sensitivity`` / ``sensitivity_large`` (the best at ``fp_per_scan <= max_fp_per_scan``,
    each maximised on its own), ``threshold`` / ``threshold_large`` (where), ``n_scans``, ``n_lesions``,
    ``n_lesions_large``, and the settings. A sensitivity over no lesions is ``None``. By size
    (``size_bins_mm``, the classes of :func:`size_bin_names`): each curve point's ``sensitivity_by_size``, and
    ``sensitivity_by_size`` / ``n_lesions_by_size``, the best sensitivity of each class at ``max_fp_per_scan``
    (maximised per class, as ``sensitivity_large`` is) and its number of lesions.
    """
    names = size_bin_names(size_bins_mm)
    heatmaps, lesions = list(heatmaps), list(lesions)
    n_scans = len(heatmaps)
    if n_scans == 0 or len(lesions) != n_scans:
        raise ValueError(f"need one lesion mask per heatmap, got {len(lesions)} and {n_scans}")
    rois = [None] * n_scans if rois is None else list(rois)
    spacings = [None] * n_scans if spacings is None else list(spacings)
    if len(rois) != n_scans or len(spacings) != n_scans:
        raise ValueError("rois and spacings need one entry per scan")
    scans = []
    peaks, large, steps, classes = [], [], [], []
    for heat, lesion, roi, spacing in zip(heatmaps, lesions, rois, spacings):
        heat = _volume3d(heat, "heatmap")
        _check_no_nan(heat)
        labels, n, diameters = lesion_components(lesion, spacing)
        if labels.shape != heat.shape:
            raise ValueError(f"lesion mask shape {labels.shape} differs from heatmap shape {heat.shape}")
        region = None if roi is None else _volume3d(roi, "roi") > 0
        if region is not None and region.shape != heat.shape:
            raise ValueError(f"roi shape {region.shape} differs from heatmap shape {heat.shape}")
        scored = heat if region is None else np.where(region, heat, -np.inf)
        peak = ndimage.maximum(scored, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
        peaks.append(np.asarray(peak, dtype=np.float64).reshape(-1))
        voxel = _voxel_mm3(spacing)
        smallest = max(1, int(np.ceil(min_region_mm3 / voxel - 1e-9)))
        if smallest > 1:
            steps.append(_kth_highest(scored, labels, n, smallest))
        large.append(diameters >= min_diameter_mm)
        classes.append(_size_classes(diameters, size_bins_mm))
        scans.append((heat, labels, n, region, voxel))
    all_peaks, all_large, all_classes = np.concatenate(peaks), np.concatenate(large), np.concatenate(classes)
    n_lesions, n_large = int(all_peaks.size), int(all_large.sum())
    top = max((float(np.max(h)) for h, *_ in scans), default=0.0)
    candidates = np.concatenate([all_peaks, *steps])
    thresholds = np.unique(candidates[np.isfinite(candidates)])[::-1]
    thresholds = np.r_[np.nextafter(top, np.inf), thresholds]

    curve = []
    for t in thresholds:
        found_all, n_false = [], 0
        for heat, labels, n, region, voxel in scans:
            predicted = heat >= t
            if region is not None:
                predicted &= region
            found, _, false = _regions_vs_lesions(predicted, labels, n, voxel, min_region_mm3, min_region_overlap)
            found_all.append(found)
            n_false += false
        found = np.concatenate(found_all)
        curve.append({
            "threshold": float(t),
            "fp_per_scan": n_false / n_scans,
            "sensitivity": float(found.mean()) if n_lesions else None,
            "sensitivity_large": float(found[all_large].mean()) if n_large else None,
            "sensitivity_by_size": _mean_by_class(found, all_classes, names),
        })  # fmt: skip

    def best(read) -> tuple[float | None, float | None]:
        ok = [p for p in curve if p["fp_per_scan"] <= max_fp_per_scan and read(p) is not None]
        if not ok:  # no lesion of this kind (the first point, above every score, has no region at all)
            return None, None
        point = max(ok, key=lambda p: (read(p), p["threshold"]))
        return read(point), point["threshold"]

    sensitivity, threshold = best(lambda p: p["sensitivity"])
    sensitivity_large, threshold_large = best(lambda p: p["sensitivity_large"])
    by_size = {name: best(lambda p, name=name: p["sensitivity_by_size"][name])[0] for name in names}
    return {
        "sensitivity_by_size": by_size,
        "n_lesions_by_size": {name: int((all_classes == i).sum()) for i, name in enumerate(names)},
        "size_bins_mm": [float(e) for e in size_bins_mm],
        "sensitivity": sensitivity,
        "threshold": threshold,
        "sensitivity_large": sensitivity_large,
        "threshold_large": threshold_large,
        "curve": curve,
        "n_scans": n_scans,
        "n_lesions": n_lesions,
        "n_lesions_large": n_large,
        "max_fp_per_scan": float(max_fp_per_scan),
        "min_diameter_mm": float(min_diameter_mm),
        "min_region_mm3": float(min_region_mm3),
        "min_region_overlap": float(min_region_overlap),
    }


def lesion_coverage(
    heatmaps: Sequence[Any],
    lesions: Sequence[Any],
    rois: Sequence[Any],
    spacings: Sequence[Sequence[float] | None] | None = None,
    fpr: float = 0.05,
    min_coverage: float = 0.5,
    size_bins_mm: Sequence[float] = SIZE_BINS_MM,
) -> dict[str, Any]:
    """How much of each lesion a map covers at a fixed voxel false-positive rate, by lesion size.

    The threshold is the one that ``fpr`` of the normal liver voxels (``roi`` and not lesion, pooled over all
    scans) reach. A lesion's *coverage* is the share of its voxels inside the ROI at or above it; a lesion is
    *detected* when its coverage is at least ``min_coverage``. Unlike the FROC this reading does not depend on
    how regions merge: a lesion beside another, or in a liver half full of tumour, is read by its own voxels.

    Returns ``threshold``, ``fpr``, ``min_coverage``, per size class (:func:`size_bin_names`)
    ``coverage_by_size`` (mean coverage), ``detected_by_size`` (share detected) and ``n_lesions_by_size``, the
    same over all lesions (``coverage``, ``detected``, ``n_lesions``), and ``lesions``: ``(equivalent diameter
    mm, coverage)`` per lesion, in scan order.
    """
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    heatmaps, lesions, rois = list(heatmaps), list(lesions), list(rois)
    n_scans = len(heatmaps)
    if n_scans == 0 or len(lesions) != n_scans or len(rois) != n_scans:
        raise ValueError(f"need one lesion mask and one roi per heatmap, got {len(lesions)}, {len(rois)} and {n_scans}")
    spacings = [None] * n_scans if spacings is None else list(spacings)
    scans, normal = [], []
    for heat, lesion, roi, spacing in zip(heatmaps, lesions, rois, spacings):
        heat = _volume3d(heat, "heatmap")
        _check_no_nan(heat)
        region = _volume3d(roi, "roi") > 0
        labels, n, diameters = lesion_components(lesion, spacing)
        if labels.shape != heat.shape or region.shape != heat.shape:
            raise ValueError(f"heatmap {heat.shape}, lesion mask {labels.shape} and roi {region.shape} differ in shape")
        labels = np.where(region, labels, 0)
        normal.append(heat[region & (labels == 0)])
        scans.append((heat, labels, n, diameters))
    normal_values = np.concatenate(normal)
    if normal_values.size == 0:
        raise UndefinedMetricError("no normal voxel in the ROI to set the false-positive rate on")
    threshold = float(np.quantile(normal_values, 1.0 - fpr))
    coverage, diameters = [], []
    for heat, labels, n, diam in scans:
        if n == 0:
            continue
        inside = labels > 0
        total = np.bincount(labels[inside], minlength=n + 1)[1:]
        above = np.bincount(labels[inside], weights=(heat[inside] >= threshold).astype(np.float64), minlength=n + 1)[1:]
        kept = total > 0  # a lesion wholly outside the ROI is not scored here
        coverage.append(above[kept] / total[kept])
        diameters.append(diam[kept])
    coverage_all = np.concatenate(coverage) if coverage else np.zeros(0)
    diameters_all = np.concatenate(diameters) if diameters else np.zeros(0)
    names = size_bin_names(size_bins_mm)
    classes = _size_classes(diameters_all, size_bins_mm)
    detected = (coverage_all >= min_coverage).astype(np.float64)
    return {
        "threshold": threshold,
        "fpr": float(fpr),
        "min_coverage": float(min_coverage),
        "coverage": float(coverage_all.mean()) if coverage_all.size else None,
        "detected": float(detected.mean()) if detected.size else None,
        "n_lesions": int(coverage_all.size),
        "coverage_by_size": _mean_by_class(coverage_all, classes, names),
        "detected_by_size": _mean_by_class(detected, classes, names),
        "n_lesions_by_size": {name: int((classes == i).sum()) for i, name in enumerate(names)},
        "size_bins_mm": [float(e) for e in size_bins_mm],
        "lesions": [(float(d), float(c)) for d, c in zip(diameters_all, coverage_all)],
    }
