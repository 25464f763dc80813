"""The evaluation picture: the most abnormal slices with heatmaps and outlines, score curves, the ROC curve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from monai_ad.io import atomic_write  # noqa: E402

GT_COLOUR, PRED_COLOUR = "#00e5ff", "#ffd400"


@dataclass
class MontageItem:
    """One axial slice as stored in RAS+ (array axes x: towards the patient's right, y: towards anterior).

    It is shown radiologically: anterior up, the patient's right on the image's left.
    """

    image: np.ndarray  # windowed to [0, 1]
    heatmap: np.ndarray
    gt: np.ndarray | None
    pred: np.ndarray | None
    title: str


@dataclass
class ScoreCurve:
    name: str
    scores: np.ndarray  # per slice, NaN outside the ROI
    labels: np.ndarray | None  # per slice 0/1


def radiological(slice_xy: np.ndarray) -> np.ndarray:
    """(x, y) RAS+ slice → radiological display: rows anterior→posterior, columns the patient's right→left."""
    return np.asarray(slice_xy).T[::-1, ::-1]


def render_report(
    path: str | os.PathLike,
    montage: list[MontageItem],
    curves: list[ScoreCurve],
    roc: tuple[np.ndarray, np.ndarray] | None,
    slice_threshold: float | None,
    heat_range: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    cols = min(4, max(1, len(montage)))
    rows = int(np.ceil(len(montage) / cols)) if montage else 0
    fig = plt.figure(figsize=(16, 4.2 * rows + 4.6), dpi=100, constrained_layout=True)
    grid = fig.add_gridspec(rows + 1, 4, height_ratios=[4.2] * rows + [4.0])
    if heat_range is None and montage:
        values = np.concatenate([m.heatmap.ravel() for m in montage])
        heat_range = (float(np.percentile(values, 50)), float(values.max()))
    for i, item in enumerate(montage):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(radiological(item.image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        heat = np.ma.masked_less_equal(radiological(item.heatmap), heat_range[0])
        ax.imshow(heat, cmap="inferno", vmin=heat_range[0], vmax=heat_range[1], alpha=0.55, interpolation="bilinear")
        for mask, colour in ((item.gt, GT_COLOUR), (item.pred, PRED_COLOUR)):
            if mask is not None and np.any(mask):
                ax.contour(radiological(mask.astype(float)), levels=[0.5], colors=[colour], linewidths=1.2)
        ax.set_title(item.title, fontsize=10)
        ax.set_axis_off()
    if montage:
        handles = [Line2D([], [], color=GT_COLOUR, label="lesion (ground truth)"), Line2D([], [], color=PRED_COLOUR, label="predicted region")]
        fig.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.8)

    ax = fig.add_subplot(grid[rows, :3])
    offset = 0
    for curve in curves:
        z = np.arange(len(curve.scores)) + offset
        ax.plot(z, curve.scores, lw=1.2, label=curve.name if len(curves) <= 8 else None)
        if curve.labels is not None:
            for k in np.nonzero(np.asarray(curve.labels) > 0)[0]:
                ax.axvspan(z[k] - 0.5, z[k] + 0.5, color="tab:red", alpha=0.15, lw=0)
        offset += len(curve.scores) + 3
    if slice_threshold is not None:
        ax.axhline(slice_threshold, color="k", ls="--", lw=1, label="slice threshold")
    ax.set_xlabel("axial slice (cases side by side; red: slices with a lesion)")
    ax.set_ylabel("slice score")
    ax.set_title("per-slice anomaly score")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=4, loc="upper left")

    ax = fig.add_subplot(grid[rows, 3])
    if roc is not None:
        labels, scores = np.asarray(roc[0]), np.asarray(roc[1])
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {roc_auc_score(labels, scores):.3f}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC needs normal and\nabnormal slices", ha="center", va="center")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("slice-level ROC")
    ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=13)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
