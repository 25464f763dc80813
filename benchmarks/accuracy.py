"""Detection accuracy as a reader would judge it, per detector, on two data sets, against the plain density floor.

    python benchmarks/accuracy.py                                   # every default detector, both data sets
    python benchmarks/accuracy.py --detectors intensity patchcore   # only these rows
    python benchmarks/accuracy.py --quick --no-record               # a smoke run (minutes)

Data sets:
- phantoms: the project's CT phantoms (``small`` preset; 8 normal + 6 abnormal: 4 normal volumes to fit on,
  2 to calibrate on, 2 normal + 6 abnormal to test);
- real: the real normal CT samples (``--real-ct DIR``) with lesions inserted by ``lesion_insertion.py``, a
  generator written for this evaluation only, once per lesion model (``--lesions``: ``sparse``, a few lesions
  of every size; ``metastatic``, heavy burden, mostly under 10 mm). Leave-one-scan-out: the held-out scan is tested (itself, normal,
  plus ``--sets`` copies with differently seeded lesions); the detector is fitted on the other scan(s) and
  calibrated on a contiguous slab of them (the third quarter of the liver's extent) that it was not fitted on.
  Metrics are computed per held-out scan and averaged over the folds.

A detector that learns from unlabelled studies (``ddad``) gets each fold's test scans as its ``unlabelled``
section, images and liver masks without labels (``with_test_as_unlabelled``), as the MONAI Label app trains it on
every study not marked normal.

``--data alarms``: the conformal operating point (``monai-ad infer --false-alarm-rate``) measured: the false-alarm
rate realised on held-out normal phantoms against the rate asked for, and the abnormal phantoms flagged at it
(``false_alarms.py``).

Per detector: slice AUROC; in-liver pixel AUROC; AUPRO up to FPR 0.3 inside the liver; Dice of the model's own
label map (calibrated pixel threshold); lesion sensitivity at ≤ 1 false region per scan from the FROC sweep, for
all lesions and for lesions of ≥ 10 mm equivalent diameter; false regions per scan and lesion sensitivity of the
label map at the calibrated threshold; training seconds and scoring seconds per volume. By lesion size (< 5,
5–10, 10–20, ≥ 20 mm): FROC sensitivity, and each lesion's coverage and detection at the threshold 5 % of
normal liver voxels reach (``monai_ad.evaluation.lesion_figures``). Each row says whether it beats the plain
density floor (``density``: |HU − the liver's level|, no learning) on in-liver pixel AUROC. The calibrated operating point: the thresholds are the
quantile of held-out normal slices' scores that about ``--false-regions-per-scan`` slices of a normal scan
exceed (``monai_ad.training.train``).

Trained detectors use their short CPU schedules (each detector's ``schedule("cpu")``; ``--quick``: ``"quick"``;
printed with the table). The CLIP detectors (winclip,
clip_reconstruction) need CLIP weights that are not installed with the project: they are left out by default
(name them with ``--detectors`` and pass ``--set winclip:clip_checkpoint=FILE``). A detector that is not
registered is skipped with a note. Prints one markdown table per data set and appends them, with machine, date
and command, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_CT, RESULTS, format_table, record, resolve  # noqa: E402
from lesion_insertion import build_leave_one_out  # noqa: E402
import false_alarms  # noqa: E402

import monai_ad.postprocess as postprocess  # noqa: E402
from monai_ad import evaluation, metrics  # noqa: E402
from monai_ad.data.phantom import write_phantom_dataset  # noqa: E402
from monai_ad.run_config import load_run_config  # noqa: E402
from monai_ad.detectors import available_detectors  # noqa: E402
from monai_ad.detectors.base import detector_class  # noqa: E402
from monai_ad.errors import InputError  # noqa: E402
from monai_ad.postprocess import axial_axis  # noqa: E402

from monai_ad.data.datalists import load_datalist, roi_source  # noqa: E402
from monai_ad.prediction import Predictor  # noqa: E402
from monai_ad.training import train  # noqa: E402

FLOOR = "density"
REAL_TITLES = {"sparse": "real CT, sparse inserted lesions", "metastatic": "real CT, heavy metastatic burden"}
DEFAULT_DETECTORS = ["density", "intensity", "fused", "synthetic_anomaly", "patchcore", "padim", "simplenet"]
CLIP_DETECTORS = ("winclip", "clip_reconstruction")
# Hyper-parameter overrides per detector for a 2-core CPU (the rest are the library defaults).
# Pre-processing options per detector (``preprocessing=`` of ``training.train``); empty: the library defaults.
PREPROCESSING: dict[str, dict[str, Any]] = {}
FPR_LIMIT = 0.3
# the lesion reading's settings are evaluate's (monai_ad.evaluation.lesion_figures)
MIN_DIAMETER_MM, MIN_REGION_OVERLAP = evaluation.LARGE_LESION_MM, evaluation.MIN_REGION_OVERLAP
MIN_LESION_MM3 = float(getattr(postprocess, "MIN_LESION_MM3", 20.0))  # the label map's smallest region, as infer uses
TS_LIVER = 5  # the liver's label in the real scans' organ maps


# ----------------------------------------------------------------------------- data
def phantom_datasets(work: Path, quick: bool, seed: int) -> list[dict[str, Any]]:
    n_normal, n_abnormal, preset = (4, 2, "tiny") if quick else (8, 6, "small")
    datalist = work / "phantom" / "datalist.json"
    if not datalist.is_file():
        write_phantom_dataset(work / "phantom", n_normal, n_abnormal, seed=seed, preset=preset, progress=False)
    validation = load_datalist(datalist, "validation")
    per_scan = float(np.mean([liver_slices(item["label"]) for item in validation]))
    return [{"fold": "phantoms", "datalist": datalist, "slices_per_scan": per_scan,
             "describe": f"{preset} phantoms, {n_normal} normal + {n_abnormal} abnormal"}]  # fmt: skip


def real_scans(real_ct: Path) -> list[dict[str, Any]]:
    """The real normal scans found in ``real_ct``, each with its organ map (fewer than two: none)."""
    scans = [
        {"name": "ct_3mm", "image": real_ct / "example_ct.nii.gz",
         "organ_map": real_ct / "example_seg_fast_force_split.nii.gz", "liver_label": TS_LIVER},
        {"name": "ct_dicom", "image": real_ct / "example_ct_dicom",
         "organ_map": real_ct / "example_seg_dicom.nii.gz", "liver_label": TS_LIVER},
    ]  # fmt: skip
    scans = [s for s in scans if Path(s["image"]).exists() and Path(s["organ_map"]).exists()]
    return scans if len(scans) >= 2 else []


def real_datasets(work: Path, real_ct: Path, quick: bool, seed: int, n_sets: int,
                  lesion_model: str = "sparse") -> list[dict[str, Any]]:
    scans = real_scans(real_ct)
    if not scans:
        return []
    folds = build_leave_one_out(scans, work / f"real_{lesion_model}", n_sets=1 if quick else n_sets, seed=seed,
                                lesion_model=lesion_model)  # fmt: skip
    return [{
        "fold": f"{f['held_out']} held out", "datalist": f["datalist"], "slices_per_scan": f["liver_slices_per_training_scan"],
        "describe": (f"{f['held_out']} ({' × '.join(f'{v:.2g}' for v in f['spacing_mm'])} mm voxels) held out: fitted on {f['n_fit_slices']} slices of {', '.join(f['trained_on'])}, "
                     f"calibrated on {f['n_calibration_slices']} others of it; tested on {f['held_out']} as it is and "
                     f"with {f['n_lesions']} inserted lesions in {1 if quick else n_sets} seeded set(s), "
                     f"{', '.join(f'{b:.0%}' for b in f['burden'])} of the liver"),
    } for f in folds]  # fmt: skip


def liver_slices(label_path: str) -> int:
    image = nib.load(label_path)
    axis = axial_axis(image.affine)
    label = np.asarray(image.dataobj)
    return int(np.moveaxis(label > 0, axis, -1).reshape(-1, label.shape[axis]).any(0).sum())


def calibration_quantile(false_regions_per_scan: float, slices_per_scan: float) -> float:
    """The quantile of normal slices' scores that about ``false_regions_per_scan`` slices of a scan exceed."""
    return float(min(max(1.0 - false_regions_per_scan / slices_per_scan, 0.5), 1.0))


def with_test_as_unlabelled(datalist: Path, out: Path) -> Path:
    """The fold's datalist with an ``unlabelled`` section holding its test scans without their labels (image and
    liver mask): a detector that learns from unlabelled studies (DDAD) sees the scans it will read, as the MONAI
    Label app trains it on every study not marked normal; the labels stay with the evaluation."""
    content = json.loads(Path(datalist).read_text())
    base = Path(datalist).parent
    unlabelled = [{"image": str(base / item["image"]), "roi": str(base / roi_source(item))} for item in content["test"]]
    out.write_text(json.dumps({**{k: v for k, v in content.items() if k not in ("training", "validation", "test")},
                               **{k: [{**i, **{f: str(base / i[f]) for f in ("image", "label", "roi") if i.get(f)}}
                                      for i in content.get(k, [])] for k in ("training", "validation", "test")},
                               "unlabelled": unlabelled}, indent=1))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- one detector on one fold
def run_fold(name: str, hparams: dict, preprocessing: dict, fold: dict, work: Path, device, fa_rate: float,
             keep_cases: bool = False) -> dict:
    """Fit and calibrate ``name`` on the fold, score its test scans, and measure; with ``keep_cases``, the
    per-scan maps behind the figures are returned too (``cases``: one dict per test scan)."""
    quantile = calibration_quantile(fa_rate, fold["slices_per_scan"])
    datalist = fold["datalist"]
    if detector_class(name).uses_unlabelled:
        datalist = with_test_as_unlabelled(datalist, work / "datalist_unlabelled.json")
    start = time.perf_counter()
    detector = train(name, datalist, work / f"{name}.pt", hparams=hparams, preprocessing=preprocessing,
                     quantile=quantile, device=str(device), progress=False)  # fmt: skip
    train_s = time.perf_counter() - start
    predictor = Predictor(detector, device=str(device), min_lesion_mm3=MIN_LESION_MM3)
    cases, seconds, inference_s, scored = [], [], 0.0, 0
    for item in load_datalist(fold["datalist"], "test"):
        timings: dict[str, float] = {}
        case = evaluation.measure_case(predictor, item, fold["datalist"], timings=timings)
        seconds.append(case.seconds)
        inference_s += timings.get("inference", 0.0)
        scored += len(case.scored)
        normal, flagged = case.normal_slices()
        cases.append({
            "case_id": item.get("case_id", Path(item["image"]).name), "image": item["image"],
            "box": case.box, "axis": case.axis, "lesions_drawn": item.get("lesions", []),
            "affine": np.asarray(case.result.affine), "spacing": case.axial_spacing,
            **{name: case.in_liver_box(volume) for name, volume in (
                ("heat", case.result.heatmap), ("lesion", case.lesion), ("liver", case.liver),
                ("pred", case.result.label_map > 0))},
            "slice_labels": case.slice_labels.astype(bool), "slice_scores": case.slice_scores,
            "tp": case.tp, "fp": case.fp, "fn": case.fn, "normal_slices": normal, "flagged_normal": flagged,
        })  # fmt: skip
    out = fold_metrics(cases, MIN_LESION_MM3)
    out.update({
        "train_s": train_s, "score_s_per_volume": float(np.mean(seconds)), "slices_per_s": scored / inference_s if inference_s else None,
        "thresholds": {k: v for k, v in detector.thresholds.items() if isinstance(v, (int, float, str))}, "quantile": quantile,
    })  # fmt: skip
    if keep_cases:
        out["cases"] = cases
    return out


def cases_lesion_figures(cases: list[dict], min_region_mm3: float = MIN_LESION_MM3) -> dict[str, Any]:
    """The lesion reading of a fold's test scans (``evaluation.lesion_figures``: FROC at ≤ 1 false region per
    scan, coverage at 5 % FPR, both by size)."""
    return evaluation.lesion_figures([c["heat"] for c in cases], [c["lesion"] for c in cases], [c["liver"] for c in cases],
                                     [c["spacing"] for c in cases], min_region_mm3)  # fmt: skip


def cases_froc(cases: list[dict], min_region_mm3: float = MIN_LESION_MM3) -> dict[str, Any]:
    return cases_lesion_figures(cases, min_region_mm3)["froc"]


def fold_metrics(cases: list[dict], min_region_mm3: float) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def attempt(key, fn, *args, **kwargs):
        try:
            out[key] = float(fn(*args, **kwargs))
        except metrics.UndefinedMetricError as exc:
            out[key], out.setdefault("notes", {})[key] = None, str(exc)

    attempt("slice_auroc", metrics.slice_auroc, np.concatenate([c["slice_labels"] for c in cases]),
            np.concatenate([c["slice_scores"] for c in cases]))  # fmt: skip
    masks, maps, rois = [c["lesion"] for c in cases], [c["heat"] for c in cases], [c["liver"] for c in cases]
    attempt("pixel_auroc_liver", metrics.pixel_auroc, masks, maps, rois)
    attempt("aupro_liver", metrics.aupro, masks, maps, FPR_LIMIT, roi=rois)
    tp, fp, fn = (sum(c[k] for c in cases) for k in ("tp", "fp", "fn"))
    out["dice"] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None
    figures = cases_lesion_figures(cases, min_region_mm3)
    froc = figures["froc"]
    out.update(sens_1fp=froc["sensitivity"], sens_1fp_large=froc["sensitivity_large"], n_lesions=froc["n_lesions"],
               n_lesions_large=froc["n_lesions_large"], n_scans=froc["n_scans"])  # fmt: skip
    out.update(by_size(figures))
    found = n_false = 0
    for c in cases:  # the label map as the user gets it (components below the size limit already removed)
        d = metrics.detect_lesions(c["pred"], c["lesion"], 0.5, roi=c["liver"], spacing=c["spacing"],
                                   min_region_overlap=MIN_REGION_OVERLAP)  # fmt: skip
        found += d["n_found"]
        n_false += d["n_false_regions"]
    out["fp_regions_per_scan_cal"] = n_false / len(cases)
    out["sens_cal"] = found / froc["n_lesions"] if froc["n_lesions"] else None
    normal = sum(c["normal_slices"] for c in cases)
    out["flagged_normal_slices"] = sum(c["flagged_normal"] for c in cases) / normal if normal else None
    return out


def by_size(figures: dict[str, Any]) -> dict[str, Any]:
    """``evaluation.lesion_figures``' size classes as this benchmark's flat keys (``froc_<5 mm``, ...)."""
    out: dict[str, Any] = {"coverage_under_10mm": figures["coverage_small"]}
    for name, values in figures["by_size"].items():
        out.update({f"n_{name}": values["n_lesions"], f"froc_{name}": values["sensitivity"],
                    f"coverage_{name}": values["coverage"], f"detected_{name}": values["detected"]})  # fmt: skip
    return out


# ----------------------------------------------------------------------------- table
COLUMNS = ["detector", "schedule", "slice AUROC", "pixel AUROC (liver)", "AUPRO@0.3 (liver)", "Dice @cal",
           "sens ≤1 FP/scan", "sens ≤1 FP/scan ≥10 mm", "FP regions/scan @cal", "sens @cal", "train s",
           "score s/volume", "slices/s", "beats floor?"]  # fmt: skip
KEYS = {"slice AUROC": "slice_auroc", "pixel AUROC (liver)": "pixel_auroc_liver", "AUPRO@0.3 (liver)": "aupro_liver",
        "Dice @cal": "dice", "sens ≤1 FP/scan": "sens_1fp", "sens ≤1 FP/scan ≥10 mm": "sens_1fp_large",
        "FP regions/scan @cal": "fp_regions_per_scan_cal", "sens @cal": "sens_cal", "train s": "train_s",
        "score s/volume": "score_s_per_volume", "slices/s": "slices_per_s"}  # fmt: skip


SIZE_NAMES = metrics.size_bin_names()
SIZE_COLUMNS = ["detector", "lesions (<5 / 5-10 / 10-20 / >=20 mm)", "coverage <10 mm @5% FPR",
                *[f"coverage {n}" for n in SIZE_NAMES], *[f"detected {n}" for n in SIZE_NAMES],
                *[f"FROC ≤1 FP {n}" for n in SIZE_NAMES]]  # fmt: skip
SIZE_KEYS = {"coverage <10 mm @5% FPR": "coverage_under_10mm", **{f"coverage {n}": f"coverage_{n}" for n in SIZE_NAMES},
             **{f"detected {n}": f"detected_{n}" for n in SIZE_NAMES},
             **{f"FROC ≤1 FP {n}": f"froc_{n}" for n in SIZE_NAMES}}  # fmt: skip


def size_rows(results: dict[str, dict], per_fold: bool = False) -> list[dict]:
    """The lesion-size table: per detector, each size class's coverage and detection at 5 % FPR and its FROC
    sensitivity (means over folds, or ``per_fold`` one row per held-out scan), with the number of lesions of
    each class."""
    rows = []
    for name, r in results.items():
        for figures, folds in ([(f, [f]) for f in r["folds"]] if per_fold else [(r["mean"], r["folds"])]):
            counts = [sum(f.get(f"n_{n}", 0) for f in folds) for n in SIZE_NAMES]
            row = {"detector": name, **({"fold": figures["fold"]} if per_fold else {}),
                   "lesions (<5 / 5-10 / 10-20 / >=20 mm)": " / ".join(str(c) for c in counts)}  # fmt: skip
            for column, key in SIZE_KEYS.items():
                value = figures.get(key)
                row[column] = "n/a" if value is None else value
            rows.append(row)
    return rows


def mean_over_folds(folds: list[dict]) -> dict[str, Any]:
    out = {}
    for key in set(KEYS.values()) | set(SIZE_KEYS.values()) | {"flagged_normal_slices"}:
        values = [f[key] for f in folds if f.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def schedule_text(hparams: dict, preprocessing: dict) -> str:
    parts = [f"{k}={v}" for k, v in hparams.items()] + [f"pre:{k}={v}" for k, v in preprocessing.items()]
    return ", ".join(parts) or "defaults"


def table_rows(results: dict[str, dict]) -> list[dict]:
    floor = results.get(FLOOR, {}).get("mean", {}).get("pixel_auroc_liver")
    rows = []
    for name, r in results.items():
        row = {"detector": name, "schedule": r["schedule"]}
        for column, key in KEYS.items():
            value = r["mean"].get(key)
            row[column] = "n/a" if value is None else value
        value = r["mean"].get("pixel_auroc_liver")
        if name == FLOOR:
            row["beats floor?"] = "(floor)"
        elif floor is None or value is None:
            row["beats floor?"] = "n/a (no floor)" if floor is None else "n/a"
        else:
            row["beats floor?"] = f"{'yes' if value > floor else 'no'} ({value - floor:+.3f})"
        rows.append(row)
    return rows


def parse_assignments(values: list[str], what: str) -> dict[str, dict[str, Any]]:
    """``DETECTOR:KEY=VALUE`` (VALUE as JSON when it parses, else a string) → {detector: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for text in values:
        try:
            name, rest = text.split(":", 1)
            key, value = rest.split("=", 1)
        except ValueError:
            raise SystemExit(f"{what} takes DETECTOR:KEY=VALUE, got {text!r}") from None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[key] = parsed
    return out


def config_schedules(paths: list[str]) -> dict[str, tuple[dict, dict]]:
    """Each training config's detector → its (hparams over the config's schedule, preprocessing), in place of its
    ``cpu`` schedule and ``PREPROCESSING`` for that detector."""
    out = {}
    for path in paths:
        config = load_run_config(path)
        if not isinstance(config.get("detector"), str):
            raise InputError("names no detector", path)
        schedule = detector_class(config["detector"]).schedule(config.get("schedule") or "paper")
        out[config["detector"]] = ({**schedule, **(config.get("hparams") or {})}, dict(config.get("preprocessing") or {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=DEFAULT_DETECTORS)
    parser.add_argument("--real-ct", type=Path, default=REAL_CT, help="folder with the real normal CT samples")
    parser.add_argument("--sets", type=int, default=3, help="seeded lesion sets per held-out real scan")
    parser.add_argument("--false-regions-per-scan", type=float, default=1.0,
                        help="calibration: about this many slices of a normal scan exceed the thresholds")
    parser.add_argument("--set", dest="hparams", action="append", default=[], metavar="DETECTOR:KEY=VALUE",
                        help="a hyper-parameter override on top of the detector's cpu schedule")
    parser.add_argument("--preprocess", action="append", default=[], metavar="DETECTOR:KEY=VALUE",
                        help="a pre-processing option for one detector")
    parser.add_argument("--config", action="append", default=[], metavar="JSON",
                        help="a training config (sample_configs/): its hparams and preprocessing replace its "
                             "detector's schedule here (e.g. sample_configs/synthetic_anomaly_gpu.json on a GPU)")
    parser.add_argument("--data", nargs="+", choices=["phantoms", "real", "alarms"], default=["phantoms", "real"],
                        help="alarms: the false-alarm rate realised on held-out normal phantoms against the rate "
                             "asked for (benchmarks/false_alarms.py; its options below)")
    false_alarms.add_arguments(parser.add_argument_group("alarms"))
    parser.add_argument("--lesions", nargs="+", choices=list(REAL_TITLES), default=list(REAL_TITLES),
                        help="the lesion models inserted into the real scans (lesion_insertion.LESION_MODELS)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny phantoms, one lesion set, shortest schedules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    device = resolve(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_accuracy_"))
    extra_hparams = parse_assignments(args.hparams, "--set")
    extra_pre = parse_assignments(args.preprocess, "--preprocess")
    try:
        configured = config_schedules(args.config)
    except InputError as exc:
        parser.error(str(exc))
    registered = set(available_detectors())
    notes, detectors = [], []
    for name in args.detectors:
        if name not in registered:
            notes.append(f"{name}: not registered in this version, skipped")
        else:
            detectors.append(name)
    left_out = [n for n in CLIP_DETECTORS if n in registered and n not in detectors]
    if left_out:
        notes.append(f"left out: {', '.join(left_out)} (need CLIP weights that are not installed with the project)")
    optional = [n for n in ("rd4ad", "dpa") if n in registered and n not in detectors]
    if optional:
        notes.append(f"not in this run: {', '.join(optional)} (longer CPU training; `--detectors {' '.join(optional)}` "
                     "runs them with their cpu schedules)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    datasets: dict[str, list[dict]] = {}
    if "phantoms" in args.data:
        datasets["phantoms"] = phantom_datasets(work, args.quick, args.seed)
    if "real" in args.data:
        for model in args.lesions:
            folds = real_datasets(work, args.real_ct, args.quick, args.seed, args.sets, model)
            if not folds:
                notes.append(f"real set skipped: the real CT samples are not in {args.real_ct} (pass --real-ct DIR)")
                break
            datasets[REAL_TITLES[model]] = folds

    tables, data = [], {}
    try:
        for title, folds in datasets.items():
            results: dict[str, dict] = {}
            for name in detectors:
                own = detector_class(name).schedule("quick" if args.quick else "cpu")
                schedule, pre = configured.get(name, (own, PREPROCESSING.get(name, {})))
                hparams = {**schedule, **extra_hparams.get(name, {})}
                preprocessing = {**pre, **extra_pre.get(name, {})}
                per_fold = []
                try:
                    for i, fold in enumerate(folds):
                        print(f"[{title}] {name}: {fold['fold']}", file=sys.stderr, flush=True)
                        fold_work = work / "runs" / f"{title.split()[0]}_{i}"
                        fold_work.mkdir(parents=True, exist_ok=True)
                        per_fold.append({"fold": fold["fold"], **run_fold(name, hparams, preprocessing, fold, fold_work,
                                                                         device, args.false_regions_per_scan)})  # fmt: skip
                except Exception as exc:  # noqa: BLE001 — one detector's failure must not sink the others' rows
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    notes.append(f"{name} on {title}: failed ({type(exc).__name__}: {first[:200]}), no row")
                    continue
                results[name] = {"schedule": schedule_text(hparams, preprocessing), "folds": per_fold,
                                 "mean": mean_over_folds(per_fold)}  # fmt: skip
            data[title] = results
            tables.append(f"**{title}** ({'; '.join(f['describe'] for f in folds)})\n\n"
                          + format_table(table_rows(results), COLUMNS))  # fmt: skip
            tables.append(f"{title}, lesions by size (equivalent diameter):\n\n" + format_table(size_rows(results), SIZE_COLUMNS))
            if len(folds) > 1:
                rows = [{"detector": n, "fold": f["fold"], **{c: ("n/a" if f.get(k) is None else f[k]) for c, k in KEYS.items()},
                         "normal slices flagged @cal": "n/a" if f.get("flagged_normal_slices") is None else f["flagged_normal_slices"]}
                        for n, r in results.items() for f in r["folds"]]  # fmt: skip
                tables.append(f"{title}, per held-out scan:\n\n" + format_table(
                    rows, ["detector", "fold", *[c for c in COLUMNS if c in KEYS], "normal slices flagged @cal"]))
                tables.append(f"{title}, lesions by size, per held-out scan:\n\n" + format_table(
                    size_rows(results, per_fold=True), [SIZE_COLUMNS[0], "fold", *SIZE_COLUMNS[1:]]))
        if "alarms" in args.data:
            rows = []
            for name in detectors:
                print(f"[alarms] {name}", file=sys.stderr, flush=True)
                own = detector_class(name).schedule("quick" if args.quick else "cpu")
                schedule = configured.get(name, (own, {}))[0]
                rows += false_alarms.measure(name, work / "alarms" / name, args, device, {**schedule, **extra_hparams.get(name, {})})
            tables.append(f"**calibrated alarms** ({false_alarms.describe(args)})\n\n" + format_table(rows, false_alarms.COLUMNS))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    notes = [
        "metrics on the test scans in their own geometry (prediction.Predictor); in-liver metrics use the liver "
        "mask (phantoms: label > 0; real: the organ map's liver); slice AUROC over the scored slices; real set: "
        "each figure is the mean over the held-out scans",
        f"calibrated point: thresholds = the quantile of held-out normal slices' scores (slice score; in-liver "
        f"pixel maximum) that about {args.false_regions_per_scan:g} slice(s) per normal scan exceed; Dice, "
        "'FP regions/scan @cal' and 'sens @cal' are of the model's own label map at those thresholds",
        f"lesions: 3-D connected components of the ground truth; 'sens ≤1 FP/scan': the best lesion sensitivity "
        f"over thresholds with at most 1 false region per scan (FROC; ≥10 mm: equivalent diameter ≥ "
        f"{MIN_DIAMETER_MM:g} mm); a predicted region counts as a hit when ≥ {MIN_REGION_OVERLAP:g} of it lies in "
        "lesions, all others are false regions; regions smaller than the label map's minimum lesion volume are dropped",
        "real set, leave-one-scan-out: only two real normal scans exist; each is held out in turn, so a detector "
        "is fitted on one scan's slices only; its thresholds come from a contiguous slab of that same training "
        "scan (the third quarter of its liver's extent) that it was not fitted on — held out from fitting, not "
        "from the patient",
        "lesions inserted by benchmarks/lesion_insertion.py (evaluation only). sparse: density −80…+60 HU relative "
        "to the surrounding liver (|Δ| ≥ 15 HU), equivalent diameter 5–80 mm (log-uniform, capped by the liver), "
        "sharp or soft margins, rim enhancement on some hypodense ones, 2–6 per scan. metastatic: 10–80 lesions, "
        "3–30 % of the liver, 70 % of them 3–10 mm, clustered, hypodense (−70…−20 HU) or hyperdense, uniform, "
        "necrotic, rim or target, some at the capsule and against vessels",
        f"lesions by size: 'coverage': the mean share of each lesion's voxels at or above the threshold that "
        f"{evaluation.COVERAGE_FPR:.0%} of normal liver voxels reach, 'detected': the share of lesions covered at "
        f"least {evaluation.MIN_COVERAGE:g}; 'FROC ≤1 FP': the FROC sensitivity of that size class",
        "train s: training.train (pre-processing, fit, calibration); score s/volume: Predictor end to end "
        "(load to label map, nothing written); slices/s: scored slices over the inference stage",
        *([f"load average at the start: {load:.1f} on {os.cpu_count()} cores (times are slower when the CPU is "
             "shared)"] if load is not None else []),
        *notes,
    ]
    # one current section per configuration: what the command line chose beyond the defaults
    chosen = " ".join(sys.argv[1:]).replace(f"--results {args.results}", "").replace("--no-record", "")
    chosen = " ".join(chosen.replace(f"--work {args.work}", "").split())
    scope = f" ({chosen})" if chosen else ""
    record(f"Accuracy: phantoms and real CT with inserted lesions{scope}", device, tables, notes,
           results=None if args.no_record else args.results)  # fmt: skip


if __name__ == "__main__":
    main()
