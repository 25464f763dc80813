"""Evaluation: a trained detector's metrics and PNG report on labelled volumes, and the several-seed BMAD table."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from monai_ad.data.datalists import LESION_LABEL, load_datalist, roi_source
from monai_ad.detectors.base import AnomalyDetector
from monai_ad.errors import InputError
from monai_ad.io import atomic_path, write_json
from monai_ad.postprocess import axial_axis
from monai_ad.prediction import Predictor, VolumeResult, _predictor
from monai_ad.training import train
from monai_ad.transforms.array import HUWindow
from monai_ad.transforms.pipeline import IMAGE, ROI, LoadVolumed

LARGE_LESION_MM = 10.0  # lesions of at least this equivalent diameter are also counted on their own
FP_PER_SCAN = 1.0  # the lesion FROC is read at this many false regions per scan
# A predicted region counts as a hit only when at least this fraction of it lies in lesions: a region that
# covers half the liver and touches a lesion is a false region, not a detection.
MIN_REGION_OVERLAP = 0.05
COVERAGE_FPR = 0.05  # lesion coverage is read at the threshold 5 % of normal liver voxels reach
MIN_COVERAGE = 0.5  # ... and a lesion counts as detected there when half of it is covered
SMALL_LESION_MM = 10.0  # "small": under this equivalent diameter


def lesion_figures(
    heatmaps: Sequence[np.ndarray], lesions: Sequence[np.ndarray], rois: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]], min_region_mm3: float = 0.0,
) -> dict[str, Any]:
    """The lesion-level reading of scans' heatmaps, overall and by size (``metrics.SIZE_BINS_MM``).

    ``froc``: :func:`metrics.lesion_froc` at ``FP_PER_SCAN`` (regions below ``min_region_mm3`` do not count,
    a hit needs ``MIN_REGION_OVERLAP``); ``coverage``: :func:`metrics.lesion_coverage` at ``COVERAGE_FPR`` of
    normal liver voxels, detected from ``MIN_COVERAGE``; ``by_size``: per size class its ``n_lesions``,
    ``sensitivity`` (FROC), ``coverage`` and ``detected``; ``coverage_small``: the mean coverage of the lesions
    under ``SMALL_LESION_MM``.
    """
    from monai_ad import metrics

    froc = metrics.lesion_froc(heatmaps, lesions, rois, spacings, max_fp_per_scan=FP_PER_SCAN, min_diameter_mm=LARGE_LESION_MM,
                               min_region_mm3=min_region_mm3, min_region_overlap=MIN_REGION_OVERLAP)  # fmt: skip
    out: dict[str, Any] = {"froc": froc, "coverage": None, "coverage_small": None}
    out["by_size"] = {name: {"n_lesions": n, "sensitivity": froc["sensitivity_by_size"][name], "coverage": None, "detected": None}
                      for name, n in froc["n_lesions_by_size"].items()}  # fmt: skip
    if not froc["n_lesions"]:
        return out
    cover = metrics.lesion_coverage(heatmaps, lesions, rois, spacings, fpr=COVERAGE_FPR, min_coverage=MIN_COVERAGE)
    out["coverage"] = cover
    for name, figures in out["by_size"].items():
        figures.update(coverage=cover["coverage_by_size"][name], detected=cover["detected_by_size"][name])
    small = [c for d, c in cover["lesions"] if d < SMALL_LESION_MM]
    out["coverage_small"] = float(np.mean(small)) if small else None
    return out


def liver_box(liver: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The bounding box of a (non-empty) mask, ``margin`` voxels wider on each side."""
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in np.nonzero(liver))


@dataclass
class CaseMeasurement:
    """One labelled scan scored by a predictor and read against its label: what ``evaluate`` and the accuracy
    benchmark both measure from. Volumes are in the scan's array order; ``axis`` is its axial axis and ``scored``
    the axial slices that were scored (those with liver)."""

    result: VolumeResult
    lesion: np.ndarray
    liver: np.ndarray
    axis: int
    scored: list[int]
    spacing: tuple[float, ...]
    slice_labels: np.ndarray
    slice_scores: np.ndarray
    tp: int
    fp: int
    fn: int
    label_map_reading: dict[str, Any]  # ``metrics.detect_lesions`` on the label map as the user gets it
    seconds: float

    @property
    def case(self) -> str:
        return self.result.case

    def scored_slices(self, volume: np.ndarray) -> np.ndarray:
        """``volume``'s scored slices, axial axis first."""
        return np.moveaxis(volume, self.axis, 0)[self.scored]

    @functools.cached_property
    def box(self) -> tuple[slice, ...]:
        """The liver's bounding box, one voxel of margin (``liver_box``; the liver must not be empty)."""
        return liver_box(self.liver)

    def in_liver_box(self, volume: np.ndarray) -> np.ndarray:
        """``volume`` within the liver's bounding box, axial axis first."""
        return np.moveaxis(volume[self.box], self.axis, 0)

    @property
    def axial_spacing(self) -> tuple[float, ...]:
        """``spacing`` in the order of ``in_liver_box``'s axes."""
        return tuple(self.spacing[i] for i in [self.axis, *(j for j in range(3) if j != self.axis)])

    def normal_slices(self) -> tuple[int, int]:
        """Liver slices without lesion, and how many of them the label map marks."""
        along = lambda v: np.moveaxis(v, self.axis, 0).reshape(v.shape[self.axis], -1).any(1)  # noqa: E731
        liver_z, lesion_z = along(self.liver), along(self.lesion)
        normal = liver_z & ~lesion_z
        return int(normal.sum()), int((normal & along((self.result.label_map > 0) & self.liver)).sum())


def measure_case(
    predictor: Predictor,
    item: Mapping[str, Any],
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    timings: dict[str, float] | None = None,
) -> CaseMeasurement:
    """Score ``item`` (a datalist entry with ``image``, ``label`` and optionally ``roi``) with ``predictor`` and read
    the result against the label (lesion = ``LESION_LABEL``; liver = the predictor's reading of the ROI mask, else
    the label's non-zero voxels)."""
    from monai_ad import metrics

    if not item.get("label"):
        raise InputError(f"test case {item.get(IMAGE)} has no 'label' to evaluate against", datalist)
    start = time.perf_counter()
    result = predictor(item[IMAGE], roi_source(item), output_dir, keep_inputs=True, timings=timings)
    seconds = time.perf_counter() - start
    label = LoadVolumed(["label"], mask_keys=["label"])({"label": item["label"]})["label"].as_tensor()[0].numpy()
    if label.shape != result.heatmap.shape:
        raise InputError(f"label shape {label.shape} does not match image shape {result.heatmap.shape}", item["label"])
    lesion = label == LESION_LABEL
    liver = result.roi if item.get(ROI) else label > 0
    axis = axial_axis(result.affine)
    scored = [z for z, s in enumerate(result.summary["slice_scores"]) if s is not None]
    spacing = tuple(float(v) for v in np.linalg.norm(result.affine[:3, :3], axis=0))
    pred = result.label_map > 0
    along = np.moveaxis(lesion, axis, 0)[scored]
    return CaseMeasurement(
        result=result, lesion=lesion, liver=liver, axis=axis, scored=scored, spacing=spacing,
        slice_labels=along.reshape(len(scored), -1).any(1).astype(int),
        slice_scores=np.asarray([result.summary["slice_scores"][z] for z in scored], dtype=float),
        tp=int((pred & lesion).sum()), fp=int((pred & ~lesion).sum()), fn=int((~pred & lesion).sum()),
        label_map_reading=metrics.detect_lesions(pred, lesion, 0.5, roi=liver, spacing=spacing,
                                                 min_region_overlap=MIN_REGION_OVERLAP),
        seconds=seconds,
    )  # fmt: skip


def evaluate(
    model: str | os.PathLike | AnomalyDetector | Predictor,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    key: str = "test",
    write_volumes: bool = True,
    montage_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Read every labelled case of the datalist, compute the metrics, write metrics JSON/CSV and the PNG report.

    ``model``: a ``Predictor``, or a model to build one from (``options``: its overrides by name). Each case's
    image and liver mask are read once, by the predictor; only the label is read here."""
    from monai_ad import metrics, report

    predictor = _predictor(model, options)
    items = load_datalist(datalist, key)
    out = Path(output_dir)
    window = HUWindow(predictor.config.window)
    slice_labels, slice_scores = [], []
    gt_slices, map_slices, roi_slices = [], [], []
    montage_pool, curves = [], []
    tp = fp = fn = 0
    lesions_found, lesions_large, false_regions = [], [], 0
    volumes: dict[str, list] = {"heat": [], "lesion": [], "liver": [], "spacing": []}  # liver boxes, for lesion figures
    for item in tqdm(items, desc="evaluation", disable=not progress, unit="volume"):
        case = measure_case(predictor, item, datalist, out / "volumes" if write_volumes else None)
        result = case.result
        heat, gt, roi = (case.scored_slices(v) for v in (result.heatmap, case.lesion, case.liver))
        pred = case.scored_slices(result.label_map > 0)
        image = case.scored_slices(window(torch.from_numpy(result.image)).numpy())
        gt_slices.append(gt), map_slices.append(heat), roi_slices.append(roi)
        slice_labels.append(case.slice_labels), slice_scores.append(case.slice_scores)
        if case.liver.any():
            for name, volume in (("heat", result.heatmap), ("lesion", case.lesion), ("liver", case.liver)):
                volumes[name].append(volume[case.box])
            volumes["spacing"].append(case.spacing)
        reading = case.label_map_reading
        lesions_found.append(reading["found"])
        lesions_large.append(reading["diameters_mm"] >= LARGE_LESION_MM)
        false_regions += reading["n_false_regions"]
        tp, fp, fn = tp + case.tp, fp + case.fp, fn + case.fn
        full_curve = np.full(len(result.summary["slice_scores"]), np.nan)
        full_curve[case.scored] = case.slice_scores
        full_labels = np.zeros(len(full_curve), dtype=int)
        full_labels[case.scored] = case.slice_labels
        curves.append(report.ScoreCurve(name=result.case, scores=full_curve, labels=full_labels))
        for i, z in enumerate(case.scored):
            montage_pool.append((case.slice_scores[i], result.case, z, image[i], heat[i], gt[i], pred[i]))
        montage_pool = sorted(montage_pool, key=lambda t: -t[0])[:montage_size]

    all_labels, all_scores = np.concatenate(slice_labels), np.concatenate(slice_scores)
    values = metrics.evaluate_scores(
        slice_labels=all_labels,
        slice_scores=all_scores,
        masks=gt_slices,  # per case: cases may differ in in-plane size
        maps=map_slices,
        roi=roi_slices,
        pixel_threshold=predictor.pixel_threshold,
        slice_threshold=predictor.slice_threshold,
    )
    values["dice_label_map"] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None
    found, large = np.concatenate(lesions_found), np.concatenate(lesions_large)
    values["lesion_sensitivity"] = float(found.mean()) if found.size else None
    values[f"lesion_sensitivity_{LARGE_LESION_MM:g}mm"] = float(found[large].mean()) if large.any() else None
    values["false_regions_per_scan"] = false_regions / len(items)
    values.update(_heatmap_lesion_values(volumes, predictor.min_lesion_mm3))
    values.update(
        {
            "detector": predictor.detector.name,
            "datalist": str(datalist),
            "section": key,
            "n_volumes": len(items),
            "thresholds": {"pixel": predictor.pixel_threshold, "slice": predictor.slice_threshold},
        }
    )
    montage = [
        report.MontageItem(image=img, heatmap=h, gt=g, pred=p, title=f"{case}  z={z}  score {s:.3g}")
        for s, case, z, img, h, g, p in montage_pool
    ]
    write_json(out / "metrics.json", values)
    write_metrics_csv(out / "metrics.csv", values)
    report.render_report(
        out / "report.png",
        montage=montage,
        curves=curves,
        roc=(all_labels, all_scores) if 0 < all_labels.sum() < len(all_labels) else None,
        slice_threshold=predictor.slice_threshold,
        title=f"{predictor.detector.name} on {Path(datalist).name} [{key}]",
    )
    values["files"] = {"metrics": str(out / "metrics.json"), "csv": str(out / "metrics.csv"), "report": str(out / "report.png")}
    return values


def _heatmap_lesion_values(volumes: dict[str, list], min_region_mm3: float) -> dict[str, Any]:
    """``evaluate``'s lesion figures read from the heatmaps (not the label map), by size."""
    if not volumes["heat"]:
        return {}
    figures = lesion_figures(volumes["heat"], volumes["lesion"], volumes["liver"], volumes["spacing"], min_region_mm3)
    return {
        f"lesion_froc_{FP_PER_SCAN:g}fp": figures["froc"]["sensitivity"],
        f"lesion_coverage_under_{SMALL_LESION_MM:g}mm": figures["coverage_small"],
        "lesions_by_size": figures["by_size"],
        "lesion_reading": {"fp_per_scan": FP_PER_SCAN, "coverage_fpr": COVERAGE_FPR, "min_coverage": MIN_COVERAGE,
                           "min_region_overlap": MIN_REGION_OVERLAP, "min_region_mm3": float(min_region_mm3)},
    }  # fmt: skip


def _flat(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in values.items():
        if isinstance(v, Mapping):
            rows += _flat(v, f"{prefix}{k}/")
        elif v is None or isinstance(v, (int, float, str)):
            rows.append((f"{prefix}{k}", v))
    return rows


def write_metrics_csv(path: str | os.PathLike, values: Mapping[str, Any]) -> None:
    """One ``metric,value`` row per number or text; nested figures as ``outer/inner`` (``lesions_by_size/<5 mm/coverage``)."""
    rows = [(k, v) for k, v in _flat(values) if k.split("/")[0] not in ("thresholds", "lesion_reading", "files")]
    with atomic_path(path) as tmp:
        tmp.write_text("metric,value\n" + "".join(f"{k},{'' if v is None else v}\n" for k, v in rows))


# ----------------------------------------------------------------------------- several seeds
BMAD_COLUMNS = (("slice_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "PRO"))


def benchmark(
    detector: str,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    hparams: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    roi_labels: Sequence[int] | int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate once per seed; report mean ± std (%) in BMAD's table form (image AUROC, pixel
    AUROC, PRO), with every run's metrics, as ``benchmark.json`` and ``benchmark.md``."""
    out = Path(output_dir)
    runs = []
    for seed in seeds:
        run_dir = out / f"seed_{seed}"
        model = train(
            detector, datalist, run_dir / "model.pt", hparams={**dict(hparams or {}), "seed": int(seed)},
            preprocessing=preprocessing, roi_labels=roi_labels, device=device, progress=progress,
        )  # fmt: skip
        values = evaluate(model, datalist, run_dir, write_volumes=False, progress=progress, roi_labels=roi_labels)
        runs.append({"seed": int(seed), **{k: values.get(k) for k, _ in BMAD_COLUMNS}})
    summary: dict[str, Any] = {"detector": detector, "datalist": str(datalist), "seeds": list(seeds), "runs": runs}
    row = [detector]
    for key, title in BMAD_COLUMNS:
        values = np.asarray([r[key] for r in runs if r[key] is not None], dtype=float) * 100.0
        mean, std = (float(values.mean()), float(values.std())) if values.size else (None, None)
        summary[key] = {"mean": mean, "std": std, "n": int(values.size)}
        row.append("n/a" if mean is None else f"{mean:.2f}±{std:.2f}")
    header = "| method | " + " | ".join(title for _, title in BMAD_COLUMNS) + " |"
    table = "\n".join([header, "|" + "---|" * (len(BMAD_COLUMNS) + 1), "| " + " | ".join(row) + " |"])
    summary["table"] = table
    write_json(out / "benchmark.json", summary)
    with atomic_path(out / "benchmark.md") as tmp:
        tmp.write_text(f"{table}\n\nMean ± std (%) over seeds {list(seeds)}; datalist {datalist}.\n")
    return summary
