"""The evaluation picture: the most abnormal slices with heatmaps and outlines, per-slice score curves, the ROC.

Slices are shown in the radiological convention: anterior at the top, the patient's right on the image's left
(a normal liver appears on the left of the picture). Arrays are given as stored, in the axis order of a
RAS-oriented volume by default: axis 0 = x, increasing towards the patient's Right; axis 1 = y, increasing
towards Anterior (nibabel / MONAI ``RAS`` axis codes). Other in-plane orientations are given with
``MontageItem.axcodes`` (e.g. ``("L", "P")`` for a slice of an LPS-ordered DICOM volume).

Rendering uses matplotlib's Agg canvas directly (no pyplot state, no display); the PNG is written atomically.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from sklearn.metrics import roc_auc_score, roc_curve

from monai_ad.io import atomic_write

__all__ = ["MontageItem", "ScoreCurve", "radiological", "select_most_abnormal", "render_report", "render_montage", "montage_png"]

GT_COLOUR = "#00e5ff"  # cyan, solid
PRED_COLOUR = "#7dff4f"  # light green, dashed
HEAT_CMAP = "inferno"
HEAT_MAX_ALPHA = 0.7
ABNORMAL_SHADE = "#d62728"
WIDTH_IN, DPI = 16.0, 100


@dataclass
class MontageItem:
    """One slice for the montage; all arrays 2-D, same shape, as stored (see the module docstring).

    ``roi`` (optional, e.g. the liver) only sets the zoom of the tile. ``axcodes`` names where array axes 0
    and 1 point (default RAS: ``("R", "A")``).
    """

    image: np.ndarray  # windowed to [0, 1]
    heatmap: np.ndarray  # anomaly scores
    gt: np.ndarray | None  # ground-truth lesion mask, drawn as an outline
    pred: np.ndarray | None  # predicted label map, drawn as an outline
    title: str  # e.g. "case_003  z=41  score 1.83"
    roi: np.ndarray | None = None
    axcodes: tuple[str, str] = ("R", "A")


@dataclass
class ScoreCurve:
    name: str  # case id
    scores: np.ndarray  # per-slice scores, NaN for slices outside the ROI
    labels: np.ndarray | None  # per-slice 0/1 ground truth (abnormal slices shaded), or None


def radiological(slice_2d: Any, axcodes: Sequence[str] = ("R", "A")) -> np.ndarray:
    """A stored 2-D axial slice → display rows anterior→posterior, columns patient right→left.

    ``axcodes``: the direction array axes 0 and 1 increase towards (one of R/L, one of A/P).
    """
    array = np.asarray(slice_2d)
    codes = tuple(str(c).upper()[:1] for c in axcodes)
    if array.ndim != 2:
        raise ValueError(f"a montage slice must be 2-D, got shape {array.shape}")
    lr = [i for i, c in enumerate(codes) if c in ("L", "R")]
    ap = [i for i, c in enumerate(codes) if c in ("A", "P")]
    if len(codes) != 2 or len(lr) != 1 or len(ap) != 1:
        raise ValueError(f"axial slice axes must be one of R/L and one of A/P, got axcodes {axcodes}")
    display = array if ap[0] == 0 else array.T  # rows along A/P, columns along R/L
    if codes[ap[0]] == "A":
        display = display[::-1, :]
    if codes[lr[0]] == "R":
        display = display[:, ::-1]
    return display


def select_most_abnormal(
    slice_scores: Iterable[Sequence[Any]], k: int = 8, max_per_case: int | None = None, min_gap: int = 0
) -> list[tuple[Any, ...]]:
    """The ``k`` highest-scoring slices from ``(case_id, z, score, *payload)`` tuples, best first.

    ``max_per_case`` caps the slices taken from one case; ``min_gap`` skips slices closer than that in z to
    one already taken from the same case (so the montage is not one lesion seen in eight neighbouring
    slices). Slices with a missing or NaN score are ignored. Extra tuple elements are passed through.
    """
    candidates = [tuple(t) for t in slice_scores if t[2] is not None and np.isfinite(t[2])]
    candidates.sort(key=lambda t: -float(t[2]))
    chosen: list[tuple[Any, ...]] = []
    taken: dict[Any, list[int]] = {}
    for item in candidates:
        if len(chosen) >= k:
            break
        case, z = item[0], int(item[1])
        previous = taken.setdefault(case, [])
        if max_per_case is not None and len(previous) >= max_per_case:
            continue
        if any(abs(z - p) < min_gap for p in previous):
            continue
        previous.append(z)
        chosen.append(item)
    return chosen


# ----------------------------------------------------------------------------- montage
def _default_heat_range(montage: Sequence[MontageItem]) -> tuple[float, float]:
    """Lower end: the 75th percentile of the shown slices' scored pixels; upper end: the highest score."""
    inside = []
    for item in montage:
        heat = np.asarray(item.heatmap, dtype=np.float64)
        finite = heat[np.isfinite(heat)]
        if finite.size == 0:
            continue
        # pixels outside the ROI carry the volume's lowest score: leave them out of the percentile
        if item.roi is None:
            scored = finite[finite > finite.min()]
        else:
            scored = heat[(np.asarray(item.roi) > 0) & np.isfinite(heat)]
        inside.append(scored if scored.size else finite)
    if not inside:
        return 0.0, 1.0
    values = np.concatenate(inside)
    lo, hi = float(np.percentile(values, 75)), float(values.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _crop_box(item: MontageItem, shape: tuple[int, int], margin: float = 0.12) -> tuple[slice, slice]:
    """A square box (display coordinates) around the ROI and the outlines, with a margin."""
    parts = []
    if item.roi is not None:
        parts.append(radiological(item.roi, item.axcodes) > 0)
    else:
        heat = radiological(item.heatmap, item.axcodes)
        finite = np.isfinite(heat)
        if finite.any():
            parts.append(finite & (heat > np.nanmin(heat)))
    for mask in (item.gt, item.pred):
        if mask is not None:
            parts.append(radiological(mask, item.axcodes) > 0)
    if not parts:
        return slice(None), slice(None)
    keep = np.logical_or.reduce(parts)
    if not keep.any() or keep.mean() > 0.6:
        return slice(None), slice(None)
    rows, cols = np.nonzero(keep.any(1))[0], np.nonzero(keep.any(0))[0]
    centre = ((rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0)
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    side = int(min(max(side * (1 + 2 * margin), 32), max(shape)))
    out = []
    for c, n in zip(centre, shape):
        start = int(round(c - side / 2.0))
        start = min(max(start, 0), max(n - side, 0))
        out.append(slice(start, min(start + side, n)))
    return out[0], out[1]


def _heat_rgba(heat: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Colour-mapped heatmap: invisible at and below ``lo``, alpha ramping up over the lower third of the range."""
    level = np.clip((heat - lo) / (hi - lo), 0.0, 1.0)
    rgba = colormaps[HEAT_CMAP](level)
    ramp = np.clip(level / 0.35, 0.0, 1.0)
    rgba[..., 3] = np.where(np.isfinite(heat), HEAT_MAX_ALPHA * ramp, 0.0)
    return rgba


def _validate(item: MontageItem) -> None:
    shape = np.shape(item.image)
    if len(shape) != 2:
        raise ValueError(f"montage item {item.title!r}: image must be 2-D, got shape {shape}")
    for name in ("heatmap", "gt", "pred", "roi"):
        value = getattr(item, name)
        if value is not None and np.shape(value) != shape:
            raise ValueError(
                f"montage item {item.title!r}: {name} shape {np.shape(value)} differs from image shape {shape}"
            )


def _draw_tile(ax, item: MontageItem, heat_range: tuple[float, float], crop: bool) -> None:
    image = radiological(item.image, item.axcodes)
    box = _crop_box(item, image.shape) if crop else (slice(None), slice(None))
    ax.imshow(image[box], cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear")
    heat = radiological(np.asarray(item.heatmap, dtype=np.float64), item.axcodes)[box]
    ax.imshow(_heat_rgba(heat, *heat_range), interpolation="bilinear")
    for mask, colour, style, width in ((item.gt, GT_COLOUR, "solid", 2.0), (item.pred, PRED_COLOUR, "dashed", 1.4)):
        if mask is None:
            continue
        shown = (radiological(mask, item.axcodes) > 0)[box].astype(np.float32)
        if shown.any():
            ax.contour(shown, levels=[0.5], colors=[colour], linewidths=width, linestyles=style)
    ax.set_title(item.title, fontsize=11, pad=4)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _draw_montage(subfig, montage: Sequence[MontageItem], heat_range, crop: bool,
                  heading: str = "most abnormal slices (radiological view: anterior up, patient's right on the left)") -> None:
    cols = _montage_columns(len(montage))
    rows = math.ceil(len(montage) / cols)
    axes = subfig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[len(montage) :]:
        ax.set_axis_off()
    for ax, item in zip(axes.ravel(), montage):
        _draw_tile(ax, item, heat_range, crop)
    mappable = ScalarMappable(norm=Normalize(*heat_range), cmap=HEAT_CMAP)
    bar = subfig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.6 if rows > 1 else 0.85, aspect=30, pad=0.01)
    bar.set_label(f"anomaly score (overlay hidden below {heat_range[0]:.3g})", fontsize=10)
    bar.ax.tick_params(labelsize=9)
    handles = [Line2D([], [], color=PRED_COLOUR, lw=2, ls="--", label="predicted anomaly")]
    if any(item.gt is not None for item in montage):  # an unlabelled scan has no ground truth to name
        handles.insert(0, Line2D([], [], color=GT_COLOUR, lw=2, label="lesion (ground truth)"))
    subfig.legend(handles=handles, loc="outside upper right", ncols=len(handles), fontsize=10, frameon=False)
    subfig.suptitle(
        heading,
        fontsize=12,
        x=0.01,
        ha="left",
    )


def _montage_columns(n: int) -> int:
    if n <= 5:
        return max(n, 1)
    if n <= 8:
        return 4
    return 5 if n <= 10 else 6


# ----------------------------------------------------------------------------- curves and ROC
def _draw_curves(ax, curves: Sequence[ScoreCurve], slice_threshold: float | None) -> None:
    if not curves:
        ax.text(0.5, 0.5, "no per-slice scores", ha="center", va="center", fontsize=12, color="0.4")
        ax.set_axis_off()
        return
    gap = max(3, int(0.03 * sum(np.isfinite(np.asarray(c.scores, dtype=np.float64)).sum() for c in curves)))
    offset, centres, any_labels = 0, [], False
    colours = colormaps["tab10"].colors
    for i, curve in enumerate(curves):
        scores = np.asarray(curve.scores, dtype=np.float64).ravel()
        labels = None if curve.labels is None else np.asarray(curve.labels).ravel() > 0
        if labels is not None and labels.shape != scores.shape:
            raise ValueError(f"curve {curve.name!r}: {labels.size} labels for {scores.size} scores")
        # only the stretch of slices that were scored (the liver), so blocks are not mostly empty
        scored = np.nonzero(np.isfinite(scores))[0]
        span = slice(scored[0], scored[-1] + 1) if scored.size else slice(0, 0)
        scores = scores[span]
        labels = None if labels is None else labels[span]
        z = np.arange(scores.size) + offset
        ax.plot(z, scores, lw=1.4, color=colours[i % len(colours)], marker="." if scores.size < 80 else None, ms=4)
        if labels is not None and labels.any():
            any_labels = True
            edges = np.diff(np.r_[0, labels.astype(np.int8), 0])
            for start, stop in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]):
                ax.axvspan(z[start] - 0.5, z[stop - 1] + 0.5, color=ABNORMAL_SHADE, alpha=0.15, lw=0)
        centres.append(offset + (scores.size - 1) / 2.0)
        if i:
            ax.axvline(offset - gap / 2.0, color="0.85", lw=0.8)
        offset += scores.size + gap
    ax.set_xlim(-1, offset - gap)
    handles = []
    if slice_threshold is not None:
        ax.axhline(slice_threshold, color="black", ls="--", lw=1.2)
        handles.append(Line2D([], [], color="black", ls="--", lw=1.2, label=f"slice threshold {slice_threshold:.3g}"))
    if any_labels:
        handles.append(Patch(color=ABNORMAL_SHADE, alpha=0.25, label="slices with a lesion"))
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=10, framealpha=0.9)
    if len(curves) <= 40:
        ax.set_xticks(centres)
        names = [c.name for c in curves]
        rotate = len(curves) > 8 or max(len(n) for n in names) * len(curves) > 120
        ax.set_xticklabels(names, fontsize=9, rotation=45 if rotate else 0, ha="right" if rotate else "center")
        ax.set_xlabel("scored axial slices in stored order, one block per case", fontsize=10)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"axial slices of {len(curves)} cases, side by side", fontsize=10)
    ax.set_ylabel("slice anomaly score", fontsize=11)
    ax.set_title("per-slice anomaly score", fontsize=12)
    ax.tick_params(labelsize=9)
    ax.grid(axis="y", color="0.92")


def _draw_roc(ax, roc: tuple[Any, Any] | None, slice_threshold: float | None) -> None:
    message = None
    if roc is None:
        message = "no slice-level ROC\n(no labelled normal and abnormal slices)"
    else:
        labels, scores = np.asarray(roc[0]).ravel() > 0, np.asarray(roc[1], dtype=np.float64).ravel()
        if labels.shape != scores.shape:
            raise ValueError(f"ROC: {labels.size} labels for {scores.size} scores")
        keep = np.isfinite(scores)
        labels, scores = labels[keep], scores[keep]
        if labels.all() or not labels.any():
            message = "no slice-level ROC\n(needs normal and abnormal slices)"
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.9, ls=":")
    if message is None:
        fpr, tpr, _ = roc_curve(labels, scores)
        summary = f"AUROC {roc_auc_score(labels, scores):.3f}  (n={labels.size}, {int(labels.sum())} abnormal)"
        ax.plot(fpr, tpr, lw=2.2, color="tab:blue", label=summary)
        if slice_threshold is not None:
            predicted = scores >= slice_threshold
            op_tpr, op_fpr = predicted[labels].mean(), predicted[~labels].mean()
            operating = f"at threshold: TPR {op_tpr:.2f}, FPR {op_fpr:.2f}"
            ax.plot([op_fpr], [op_tpr], "o", color="black", ms=7, label=operating)
        ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    else:
        box = {"facecolor": "white", "edgecolor": "none"}
        ax.text(0.5, 0.55, message, ha="center", va="center", fontsize=11, color="0.4", bbox=box)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-positive rate (normal slices)", fontsize=10)
    ax.set_ylabel("true-positive rate (abnormal slices)", fontsize=10)
    ax.set_title("slice-level ROC", fontsize=12)
    ax.tick_params(labelsize=9)
    ax.grid(color="0.92")


# ----------------------------------------------------------------------------- the picture
def render_report(
    path: str | os.PathLike,
    montage: list[MontageItem],
    curves: list[ScoreCurve],
    roc: tuple[np.ndarray, np.ndarray] | None,
    slice_threshold: float | None,
    heat_range: tuple[float, float] | None = None,
    title: str = "",
    crop: bool = True,
) -> Path:
    """Write one PNG (1600 px wide): the montage, the per-slice score curves and the slice-level ROC.

    - ``montage``: slices in the order to show (e.g. from :func:`select_most_abnormal`); CT in gray, the
      heatmap over it in ``inferno``, transparent at and below ``heat_range[0]`` and fading in over the
      lower third of the range; ground truth outlined solid cyan, prediction dashed green. With ``crop``
      each tile is zoomed to its ROI (``MontageItem.roi``, else the pixels scoring above the slice's
      minimum, i.e. the scored region) plus the outlines.
    - ``heat_range``: colour scale of the heatmap; default (75th percentile of the shown slices' scored pixels,
      their maximum). Passing the pixel threshold as the lower end shows only what would be flagged.
    - ``curves``: per-case slice scores side by side, lesion slices shaded, ``slice_threshold`` dashed.
    - ``roc``: ``(labels, scores)`` per slice (NaN scores dropped); the curve from
      ``sklearn.metrics.roc_curve`` with its AUROC, and the operating point at ``slice_threshold``.

    Any part may be empty / ``None``. The file appears complete or not at all (nothing is left at ``path``
    when rendering fails).
    """
    for item in montage:
        _validate(item)
    if heat_range is None:
        heat_range = _default_heat_range(montage)
    lo, hi = float(heat_range[0]), float(heat_range[1])
    if not hi > lo:
        hi = lo + 1e-6
    cols = _montage_columns(len(montage))
    rows = math.ceil(len(montage) / cols) if montage else 0
    tile_in = (WIDTH_IN - 1.4) / cols if montage else 0.0
    montage_h = rows * (min(tile_in, 4.6) + 0.45) + 0.6 if montage else 0.0
    bottom_h = 4.6
    title_h = 0.5 if title else 0.0
    fig = Figure(figsize=(WIDTH_IN, montage_h + bottom_h + title_h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(h_pad=0.08, w_pad=0.08)
    if title:
        fig.suptitle(title, fontsize=15, fontweight="bold")
    if montage:
        top, bottom = fig.subfigures(2, 1, height_ratios=[montage_h, bottom_h])
        _draw_montage(top, montage, (lo, hi), crop)
    else:
        bottom = fig
    curve_ax, roc_ax = bottom.subplots(1, 2, gridspec_kw={"width_ratios": [3.0, 1.0]})
    _draw_curves(curve_ax, curves, slice_threshold)
    _draw_roc(roc_ax, roc, slice_threshold)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, facecolor="white"))


def _montage_figure(montage: list[MontageItem], heat_range: tuple[float, float] | None, title: str, crop: bool, width_in: float) -> Figure:
    if not montage:
        raise ValueError("a montage needs at least one slice")
    for item in montage:
        _validate(item)
    lo, hi = (float(v) for v in (heat_range or _default_heat_range(montage)))
    cols = _montage_columns(len(montage))
    rows = math.ceil(len(montage) / cols)
    tile_in = (width_in - 1.4) / cols
    height = rows * (min(tile_in, 4.6) + 0.45) + 0.6 + (0.5 if title else 0.0)
    fig = Figure(figsize=(width_in, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=15 if width_in >= 10 else 11, fontweight="bold")
    narrow = {} if width_in >= 10 else {"heading": "radiological view"}  # the full heading would not fit
    _draw_montage(fig.subfigures(1, 1), montage, (lo, hi if hi > lo else lo + 1e-6), crop, **narrow)
    return fig


def render_montage(
    path: str | os.PathLike,
    montage: list[MontageItem],
    heat_range: tuple[float, float] | None = None,
    title: str = "",
    crop: bool = True,
    width_in: float = WIDTH_IN,
) -> Path:
    """Write the montage alone as a PNG (``width_in`` × 100 px wide), drawn as :func:`render_report` draws it:
    the picture of a scan without labels (no curves against ground truth, no ROC). Written atomically."""
    fig = _montage_figure(montage, heat_range, title, crop, width_in)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, facecolor="white"))


def montage_png(
    montage: list[MontageItem], heat_range: tuple[float, float] | None = None, title: str = "", crop: bool = True, width_in: float = 6.0
) -> bytes:
    """The montage of :func:`render_montage` as PNG bytes (e.g. to embed in an HTML page)."""
    buffer = io.BytesIO()
    _montage_figure(montage, heat_range, title, crop, width_in).savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()
