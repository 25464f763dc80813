"""Weakly-supervised hyper-parameter selection (Shvetsova et al.; docs/methods.md#hyper-parameter-selection), for
any detector.

For every candidate of a grid, ``folds``-fold cross-validation over patients: in each fold a different
``validation_fraction`` (20 %) of the training-normal patients is held out as validation normals, the detector is
fitted on the other normals, and scored on the validation normals plus a small set of validation anomalies of
ONE type only (the paper's "confined variability": one lesion kind, or cases the user lists). The criterion is
the slice-level ROC AUC (a slice is abnormal when it holds lesion voxels; only slices in the liver count), as
``monai-ad evaluate`` computes it; the candidate with the highest mean over folds wins (the first in grid order
on a tie).

Where the paper leaves a choice: validation normals of the folds are disjoint while there are enough patients
(otherwise they wrap around); the validation anomalies are split across folds by patient when there are at
least ``folds`` of them, else every fold uses all of them; thresholds of each fold's model are calibrated on
its validation normals (they do not enter the AUC). The grid is the caller's; ``DEFAULT_GRIDS`` holds ours
(the paper's search space is not public).

Outputs (each written atomically, all at the end): ``selection.json`` (every candidate with its per-fold AUCs,
the chosen one), ``selection.csv`` (one row per candidate) and ``config.json`` (``monai-ad train --config``).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from monai_ad.data.datalists import LESION_LABEL, load_datalist, roi_source
from monai_ad.data.slices import collect_slices, concat_slices
from monai_ad.errors import InputError
from monai_ad.io import atomic_path, write_json
from monai_ad.postprocess import axial_axis
from monai_ad.prediction import Predictor
from monai_ad.training import detector_for, detector_preprocessing, fit_and_calibrate, resolve_device
from monai_ad.transforms.pipeline import IMAGE, LoadVolumed, PreprocessConfig

logger = logging.getLogger(__name__)

DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "dpa": {"latent_dim": [16, 64], "feature_layer": ["relu3_2", "relu4_2"]},
}


# ----------------------------------------------------------------------------- data
def patient_of(item: Mapping[str, Any]) -> str:
    """A case's patient: its ``patient`` (or ``patient_id``) entry, else its ``case_id``, else its image."""
    for key in ("patient", "patient_id", "case_id"):
        if item.get(key) not in (None, ""):
            return str(item[key])
    return str(item[IMAGE])


def lesion_kinds(item: Mapping[str, Any]) -> set[str]:
    return {str(lesion.get("kind")) for lesion in item.get("lesions") or [] if isinstance(lesion, Mapping)}


def one_kind_anomalies(
    items: Sequence[Mapping[str, Any]], lesion_kind: str | None, source: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """The labelled abnormal cases to validate on, all of one lesion kind.

    Cases that describe their lesions (``lesions: [{"kind": ...}]``, as the phantom's datalist) are kept when
    every lesion is of ``lesion_kind``; without ``lesion_kind`` they must all share one kind. Cases without such
    a description are the user's own list and are taken as they are; cases marked ``abnormal: false`` are
    dropped.
    """
    items = [dict(item) for item in items if item.get("label") and item.get("abnormal", True) is not False]
    if not items:
        raise InputError("no labelled anomaly cases (items with a 'label') to validate on", source)
    described = [item for item in items if lesion_kinds(item)]
    if lesion_kind is not None:
        items = [item for item in described if lesion_kinds(item) == {lesion_kind}]
        if not items:
            found = sorted(set().union(*(lesion_kinds(i) for i in described))) if described else []
            raise InputError(f"no anomaly case has only {lesion_kind!r} lesions (kinds present: {found})", source)
    elif described:
        kinds = set().union(*(lesion_kinds(i) for i in described))
        if len(kinds) > 1:
            raise InputError(
                f"the anomaly cases hold lesions of {len(kinds)} kinds ({', '.join(sorted(kinds))}); validation "
                "anomalies must be of one type: choose one lesion kind", source
            )  # fmt: skip
    return items


def write_phantom_anomalies(
    out_dir: str | os.PathLike, lesion_kind: str, n_cases: int = 3, preset: str = "tiny", seed: int = 1000
) -> list[dict[str, Any]]:
    """``n_cases`` abnormal phantom volumes, each with a single lesion of ``lesion_kind``, written under
    ``out_dir``; returns their datalist items (paths absolute)."""
    from monai_ad.data.phantom import LESION_KINDS, make_phantom, save_case

    if lesion_kind not in LESION_KINDS:
        raise InputError(f"unknown phantom lesion kind {lesion_kind!r}; choose from {', '.join(LESION_KINDS)}")
    if n_cases < 1:
        raise InputError("the number of phantom anomaly cases must be at least 1")
    out = Path(out_dir)
    items: list[dict[str, Any]] = []
    for attempt in range(200 * n_cases):
        case_seed = int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
        case = make_phantom(case_seed, True, preset, n_lesions=1)
        if [lesion["kind"] for lesion in case.lesions] != [lesion_kind]:
            continue  # the phantom draws a lesion's kind at random: keep only cases of the wanted one
        case_id = f"anomaly_{lesion_kind}_{len(items):03d}"
        image, label = out / "imagesTr" / f"{case_id}.nii.gz", out / "labelsTr" / f"{case_id}.nii.gz"
        save_case(case, image, label)
        items.append({"image": str(image), "label": str(label), "case_id": case_id, "abnormal": True,
                      "seed": case_seed, "lesions": case.lesions})  # fmt: skip
        if len(items) == n_cases:
            return items
    raise InputError(f"could not draw {n_cases} phantom cases with a {lesion_kind} lesion")


def fold_splits(
    normals: Sequence[Mapping[str, Any]],
    anomalies: Sequence[Mapping[str, Any]],
    folds: int = 3,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, list[dict[str, Any]]]]:
    """Per fold ``{"train", "validation", "anomalies"}`` item lists, split by patient (see the module docstring)."""
    if folds < 1:
        raise InputError(f"folds must be at least 1, got {folds}")
    if not 0 < validation_fraction < 1:
        raise InputError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
    rng = np.random.default_rng(seed)

    def by_patient(items):
        groups: dict[str, list] = {}
        for item in items:
            groups.setdefault(patient_of(item), []).append(dict(item))
        names = sorted(groups)
        return [groups[names[i]] for i in rng.permutation(len(names))]

    normal_patients, anomaly_patients = by_patient(normals), by_patient(anomalies)
    n = len(normal_patients)
    if n < 2:
        raise InputError(f"cross-validation needs at least 2 training-normal patients, got {n}")
    n_val = min(n - 1, max(1, int(round(validation_fraction * n))))
    splits = []
    for fold in range(folds):
        held = {(fold * n_val + i) % n for i in range(n_val)}
        if len(anomaly_patients) >= folds:
            fold_anomalies = [p for i, p in enumerate(anomaly_patients) if i % folds == fold]
        else:
            fold_anomalies = anomaly_patients
        splits.append(
            {
                "train": [c for i, p in enumerate(normal_patients) if i not in held for c in p],
                "validation": [c for i, p in enumerate(normal_patients) if i in held for c in p],
                "anomalies": [c for p in fold_anomalies for c in p],
            }
        )
    return splits


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    if not grid:
        raise InputError("the hyper-parameter grid is empty")
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise InputError(f"grid entry {key!r} must be a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


# ----------------------------------------------------------------------------- scoring
class _SliceCache:
    """Pre-processed liver slices per (image size, case), so candidates and folds share them."""

    def __init__(self, detector: str, preprocessing: Mapping[str, Any] | None, roi_labels):
        self.detector, self.preprocessing, self.roi_labels = detector, dict(preprocessing or {}), roi_labels
        self._slices: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def config(self, image_size: int | None = None) -> PreprocessConfig:
        """The settings ``train`` would fit the detector with: the given ones over the detector's defaults."""
        return detector_preprocessing(self.detector, self.preprocessing, image_size)

    def slices(self, items: Sequence[Mapping[str, Any]], image_size: int) -> dict[str, torch.Tensor]:
        parts = []
        for item in items:
            key = (int(image_size), str(item[IMAGE]))
            if key not in self._slices:
                config = self.config(image_size)
                self._slices[key] = collect_slices([item], config, self.roi_labels, progress=False)
            parts.append(self._slices[key])
        return concat_slices(parts)


def _volume_slice_scores(predictor: Predictor, item: Mapping[str, Any], abnormal: bool):
    """Slice scores and labels (1 = holds lesion voxels) of one volume's liver slices, in its own geometry."""
    result = predictor(item[IMAGE], roi_source(item))
    scored = [z for z, s in enumerate(result.summary["slice_scores"]) if s is not None]
    scores = np.asarray([result.summary["slice_scores"][z] for z in scored], dtype=float)
    if not abnormal:
        return scores, np.zeros(len(scored), dtype=int)
    label = LoadVolumed(["label"], mask_keys=["label"])({"label": item["label"]})["label"].as_tensor()[0].numpy()
    if label.shape != result.heatmap.shape:
        raise InputError(f"label shape {label.shape} does not match image shape {result.heatmap.shape}", item["label"])
    lesion = np.moveaxis(label == LESION_LABEL, axial_axis(result.affine), 0)[scored]
    return scores, lesion.reshape(len(scored), -1).any(1).astype(int)


def validation_auroc(
    detector, split: Mapping[str, list], cache: _SliceCache, roi_labels, quantile: float = 0.99
) -> float:
    """Fit ``detector`` on the split's training normals and return its slice AUROC on validation normals +
    validation anomalies."""
    size = detector.image_size
    valid = cache.slices(split["validation"], size)
    fit_and_calibrate(detector, cache.slices(split["train"], size), valid, cache.config(size), quantile, progress=False)
    predictor = Predictor(detector, roi_labels=roi_labels)
    scores, labels = [], []
    for items, abnormal in ((split["validation"], False), (split["anomalies"], True)):
        for item in items:
            s, y = _volume_slice_scores(predictor, item, abnormal)
            scores.append(s)
            labels.append(y)
    all_labels = np.concatenate(labels)
    if all_labels.min() == all_labels.max():
        raise InputError("the validation anomalies of a fold hold no slice with lesion voxels in the liver")
    return float(roc_auc_score(all_labels, np.concatenate(scores)))


# ----------------------------------------------------------------------------- selection
def select_hyperparameters(
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    detector: str = "dpa",
    grid: Mapping[str, Sequence[Any]] | None = None,
    base_hparams: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    anomalies: Sequence[Mapping[str, Any]] | None = None,
    anomaly_section: str | None = None,
    lesion_kind: str | None = None,
    folds: int = 3,
    validation_fraction: float = 0.2,
    roi_labels: Sequence[int] | int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate every grid candidate, write the report and the chosen config; returns the report.

    Training normals come from the datalist's ``training`` section. Validation anomalies: ``anomalies`` (items
    with ``image``, ``label`` and optionally ``roi``), else the datalist's ``anomaly_section`` (default
    ``validation_labelled``), filtered to one lesion kind (``one_kind_anomalies``).
    """
    grid = dict(grid if grid is not None else DEFAULT_GRIDS.get(detector, {}))
    candidates = expand_grid(grid)
    normals = load_datalist(datalist, "training")
    if anomalies is None:
        anomalies = load_datalist(datalist, anomaly_section or "validation_labelled")
    anomalies = one_kind_anomalies(anomalies, lesion_kind, datalist)
    splits = fold_splits(normals, anomalies, folds, validation_fraction, seed)
    base = dict(base_hparams or {})
    cache = _SliceCache(detector, preprocessing, roi_labels)
    detector_for(detector, cache.config(), {**base, **candidates[0]})  # bad names or values fail before any training
    dev = resolve_device(device)
    rows = []
    bar = tqdm(total=len(candidates) * len(splits), desc="selection", disable=not progress, unit="fit")
    try:
        for index, candidate in enumerate(candidates):
            aucs = []
            for split in splits:
                hparams = {**base, **candidate, "seed": int(base.get("seed", seed))}
                model = detector_for(detector, cache.config(), hparams).to(dev)
                aucs.append(validation_auroc(model, split, cache, roi_labels))
                bar.update()
            rows.append({"index": index, "hparams": candidate, "fold_auroc": aucs,
                         "mean_auroc": float(np.mean(aucs)), "std_auroc": float(np.std(aucs))})  # fmt: skip
            row = rows[-1]
            logger.info("candidate %d %s: slice AUROC %.4f ± %.4f", index, candidate,
                        row["mean_auroc"], row["std_auroc"])
    finally:
        bar.close()
    best = max(rows, key=lambda r: (r["mean_auroc"], -r["index"]))
    out = Path(output_dir)
    config = {
        "description": f"{detector} hyper-parameters chosen by {len(splits)}-fold weakly-supervised selection "
        f"(slice AUROC {best['mean_auroc']:.4f} ± {best['std_auroc']:.4f}); use with monai-ad train --config",
        "detector": detector,
        "hparams": {**base, **best["hparams"]},
        "preprocessing": cache.config(detector_for(detector, cache.config(), {**base, **best["hparams"]}).image_size).to_dict(),
    }
    report = {
        "detector": detector,
        "datalist": str(datalist),
        "folds": len(splits),
        "validation_fraction": validation_fraction,
        "seed": seed,
        "criterion": "mean over folds of the slice-level ROC AUC (validation normals + one-type validation anomalies)",
        "lesion_kind": lesion_kind,
        "anomalies": [patient_of(a) for a in anomalies],
        "fold_sizes": [{k: len(v) for k, v in s.items()} for s in splits],
        "base_hparams": base,
        "grid": grid,
        "candidates": rows,
        "chosen": best,
        "config": config,
        "files": {
            "report": str(out / "selection.json"),
            "csv": str(out / "selection.csv"),
            "config": str(out / "config.json"),
        },
    }
    write_json(out / "config.json", config)
    with atomic_path(out / "selection.csv") as tmp:
        tmp.write_text(_csv(rows, list(grid), len(splits), best["index"]))
    write_json(out / "selection.json", report)
    return report


def _csv(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], n_folds: int, chosen: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    folds = [f"fold{i}_auroc" for i in range(n_folds)]
    writer.writerow(["candidate", *keys, *folds, "mean_auroc", "std_auroc", "chosen"])
    for row in rows:
        values = [row["hparams"][k] for k in keys]
        summary = [row["mean_auroc"], row["std_auroc"], int(row["index"] == chosen)]
        writer.writerow([row["index"], *values, *row["fold_auroc"], *summary])
    return buffer.getvalue()
