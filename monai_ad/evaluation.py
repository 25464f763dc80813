"""Evaluation: a trained detector's metrics and PNG report on labelled volumes, and the several-seed BMAD table."""

from __future__ import annotations

import os
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
from monai_ad.prediction import Predictor, _predictor
from monai_ad.training import train
from monai_ad.transforms.array import HUWindow
from monai_ad.transforms.pipeline import IMAGE, ROI, LoadVolumed

LARGE_LESION_MM = 10.0  # lesions of at least this equivalent diameter are also counted on their own


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
    loader = LoadVolumed(["label"], mask_keys=["label"])
    window = HUWindow(predictor.config.window)
    slice_labels, slice_scores, slice_ids = [], [], []
    gt_slices, map_slices, roi_slices = [], [], []
    montage_pool, curves = [], []
    tp = fp = fn = 0
    lesions_found, lesions_large, false_regions = [], [], 0
    for item in tqdm(items, desc="evaluation", disable=not progress, unit="volume"):
        if not item.get("label"):
            raise InputError(f"test case {item.get(IMAGE)} has no 'label' to evaluate against", datalist)
        result = predictor(item[IMAGE], roi_source(item), out / "volumes" if write_volumes else None, keep_inputs=True)
        label = loader({"label": item["label"]})["label"].as_tensor()[0].numpy()
        if label.shape != result.heatmap.shape:
            raise InputError(f"label shape {label.shape} does not match image shape {result.heatmap.shape}", item["label"])
        lesion = label == LESION_LABEL
        if item.get(ROI):
            liver = result.roi  # the predictor's own reading of the mask, its liver label(s) selected
        else:
            liver = label > 0
        axis = axial_axis(result.affine)
        scored = [z for z, s in enumerate(result.summary["slice_scores"]) if s is not None]
        heat = np.moveaxis(result.heatmap, axis, 0)[scored]
        gt = np.moveaxis(lesion, axis, 0)[scored]
        roi = np.moveaxis(liver, axis, 0)[scored]
        pred = np.moveaxis(result.label_map > 0, axis, 0)[scored]
        image = window(torch.from_numpy(result.image)).numpy()
        image = np.moveaxis(image, axis, 0)[scored]
        scores = np.asarray([result.summary["slice_scores"][z] for z in scored], dtype=float)
        labels = gt.reshape(len(scored), -1).any(1).astype(int)
        gt_slices.append(gt), map_slices.append(heat), roi_slices.append(roi)
        slice_labels.append(labels), slice_scores.append(scores)
        slice_ids += [(result.case, z) for z in scored]
        reading = metrics.detect_lesions(
            result.label_map, lesion, threshold=1, roi=liver, spacing=np.linalg.norm(result.affine[:3, :3], axis=0)
        )  # the label map's regions: thresholded and cleaned as the user gets them
        lesions_found.append(reading["found"])
        lesions_large.append(reading["diameters_mm"] >= LARGE_LESION_MM)
        false_regions += reading["n_false_regions"]
        tp += int((pred & gt).sum())
        fp += int((pred & ~gt).sum())
        fn += int((~pred & gt).sum())
        full_curve = np.full(len(result.summary["slice_scores"]), np.nan)
        full_curve[scored] = scores
        full_labels = np.zeros(len(full_curve), dtype=int)
        full_labels[scored] = labels
        curves.append(report.ScoreCurve(name=result.case, scores=full_curve, labels=full_labels))
        for i, z in enumerate(scored):
            montage_pool.append((scores[i], result.case, z, image[i], heat[i], gt[i], pred[i]))
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


def write_metrics_csv(path: str | os.PathLike, values: Mapping[str, Any]) -> None:
    rows = [(k, v) for k, v in values.items() if v is None or isinstance(v, (int, float, str))]
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
