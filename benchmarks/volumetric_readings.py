"""3-D readings of the real scans without learning: does a volumetric blob reading find the small lesions that
the slice-wise maps lose, and what does trimming the fat at the liver mask's border (``TrimROIBorder``) do?

    python benchmarks/volumetric_readings.py                  # both lesion models, both held-out scans
    python benchmarks/volumetric_readings.py --scales 1.5 2.5 4

The same seeded lesion sets as ``benchmarks/accuracy.py`` (``lesion_insertion.build_leave_one_out``, sparse and
metastatic); each held-out scan's test cases (the scan itself and its lesion sets) are read in the scan's own
grid, cropped to the liver's box:

- ``density (3-D)``: |HU − the scan's median liver HU|, Gaussian σ 1 mm in 3-D: the plain density floor.
- ``blob (3-D)``: the scale-normalised Hessian of the density in 3-D (``σ²·λ``, Gaussian derivatives at each of
  ``--scales`` mm, anisotropic voxels in mm): where all three eigenvalues share a sign (a dark blob curves up in
  every direction, a bright one down), the weakest of them, else 0; the maximum over scales and both signs. A
  vessel (a tube: one direction flat) or the capsule (a sheet) reads 0, which no 2-D reading can tell from a
  vessel cut across.

Outside the scored ROI the density is set to the liver's median before any filter (no edge at the mask's border).
Each map is read with and without ``TrimROIBorder`` (``--trim-hu``, 3 mm); the metrics are always over the organ
map's whole liver (trimmed voxels score 0). FROC and coverage as in the accuracy benchmark (regions below the
label map's minimum lesion volume dropped; a region is a hit when ≥ 0.05 of it is lesion), pooled over each held-out
scan's test cases; each figure is the mean over the two held-out scans. These maps use no normal scan at all (the
scan's own median is their reference), so the FROC, which pools the test cases of one held-out scan, needs no unit
shared between scans.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, format_table, record  # noqa: E402
from accuracy import REAL_CT, real_scans  # noqa: E402
from lesion_insertion import build_leave_one_out, voxel_spacing  # noqa: E402

from monai_ad import metrics  # noqa: E402
from monai_ad.postprocess import MIN_LESION_MM3, bounding_box  # noqa: E402
from monai_ad.transforms.array import TrimROIBorder  # noqa: E402

TITLE = "Small lesions: 3-D blob readings and the mask's border (no learning)"
MARGIN_MM = 8.0
TRIM_SECONDS: dict[str, list[float]] = {}  # TrimROIBorder's time per case, by scan (cropped to the liver's box)


def hessian_eigenvalues(volume: np.ndarray, sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    """The Hessian's eigenvalues (ascending, ``[..., 3]``) of ``volume`` smoothed at ``sigma_mm``, per mm²."""
    sigma = sigma_mm / spacing
    hessian = np.empty(volume.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            hessian[..., i, j] = hessian[..., j, i] = ndimage.gaussian_filter(volume, sigma, order=order) / (spacing[i] * spacing[j])
    return np.linalg.eigvalsh(hessian)


def readings(image: np.ndarray, scored: np.ndarray, spacing: np.ndarray, scales: list[float]) -> dict[str, np.ndarray]:
    median = float(np.median(image[scored]))
    filled = np.where(scored, image, median).astype(np.float32)
    density = ndimage.gaussian_filter(np.abs(filled - median), 1.0 / spacing)
    blob = np.zeros_like(filled)
    for sigma in scales:
        eig = hessian_eigenvalues(filled, sigma, spacing)
        dark = np.where(eig[..., 0] > 0, eig[..., 0], 0.0)
        bright = np.where(eig[..., 2] < 0, -eig[..., 2], 0.0)
        blob = np.maximum(blob, sigma**2 * np.maximum(dark, bright))
    return {"density (3-D)": np.where(scored, density, 0.0), "blob (3-D)": np.where(scored, blob, 0.0)}


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    volume = nib.load(str(path))
    return np.asarray(volume.dataobj), volume.affine


def read_case(folder: Path, entry: dict, trim: TrimROIBorder | None, scales: list[float]):
    image, affine = load_nifti(folder / entry["image"])
    label, _ = load_nifti(folder / entry["label"])
    spacing = voxel_spacing(affine)
    liver = label > 0
    box = bounding_box(liver)
    reach = np.ceil(MARGIN_MM / spacing).astype(int)
    box = tuple(slice(max(b.start - r, 0), b.stop + r) for b, r in zip(box, reach))
    image, label, liver = image[box].astype(np.float32), label[box], liver[box]
    scored = liver
    if trim is not None:
        meta_affine = torch.as_tensor(np.diag([*spacing, 1.0]))
        start = time.perf_counter()
        roi = trim(MetaTensor(torch.from_numpy(liver[None].astype(np.float32)), affine=meta_affine),
                   MetaTensor(torch.from_numpy(image[None]), affine=meta_affine))  # fmt: skip
        TRIM_SECONDS.setdefault("_".join(entry["case_id"].split("_")[:2]), []).append(time.perf_counter() - start)
        scored = roi[0].numpy() > 0
    return readings(image, scored, spacing, scales), label == 2, liver, spacing, image


def fold_figures(folder: Path, datalist: Path, trim, scales) -> dict[str, dict]:
    from sklearn.metrics import roc_auc_score

    cases = [read_case(folder, e, trim, scales) for e in json.loads(datalist.read_text())["test"]]
    out = {}
    for name in cases[0][0]:
        heat = [c[0][name] for c in cases]
        lesions, livers, spacings = [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases]
        froc = metrics.lesion_froc(heat, lesions, livers, spacings, min_region_mm3=MIN_LESION_MM3, min_region_overlap=0.05)
        coverage = metrics.lesion_coverage(heat, lesions, livers, spacings)
        truth = np.concatenate([l[r] for l, r in zip(lesions, livers)])
        scores = np.concatenate([h[r] for h, r in zip(heat, livers)])
        small = [c for d, c in coverage["lesions"] if d < 10.0]
        out[name] = {"pixel AUROC (liver)": float(roc_auc_score(truth, scores)), "sens ≤1 FP/scan": froc["sensitivity"],
                     **{f"FROC ≤1 FP {k}": v for k, v in froc["sensitivity_by_size"].items()},
                     "coverage <10 mm @5% FPR": float(np.mean(small)) if small else None}  # fmt: skip
    return out


def normal_peaks(folder: Path, datalist: Path, scales: list[float], k: int = 12) -> list[dict]:
    """The held-out normal scan's ``k`` highest 3-D blob readings in the organ map's liver (ROI as given): the
    depth of each region's maximum inside the mask and the HU there."""
    entry = json.loads(datalist.read_text())["test"][0]
    maps, _, liver, spacing, image = read_case(folder, entry, None, scales)
    blob = maps["blob (3-D)"]
    depth = ndimage.distance_transform_edt(np.pad(liver, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    regions, n = ndimage.label(blob > np.quantile(blob[liver], 0.999))
    peaks = ndimage.maximum(blob, regions, np.arange(1, n + 1))
    where = ndimage.maximum_position(blob, regions, np.arange(1, n + 1))
    return [{"blob reading": float(peaks[i]), "depth in the mask (mm)": float(depth[where[i]]), "HU": float(image[where[i]])}
            for i in np.argsort(peaks)[::-1][:k]]  # fmt: skip


def mean_rows(per_fold: list[dict[str, dict]], label: str) -> list[dict]:
    rows = []
    for name in per_fold[0]:
        row = {"reading": name, "ROI": label}
        for key in per_fold[0][name]:
            values = [f[name][key] for f in per_fold if f[name][key] is not None]
            row[key] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-ct", type=Path, default=REAL_CT, help="folder with the real normal CT samples")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.5, 4.0], help="blob scales, mm")
    parser.add_argument("--trim-hu", type=float, default=-30.0, help="TrimROIBorder's HU limit")
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_volumetric_"))
    scans = real_scans(args.real_ct)
    if not scans:
        raise SystemExit(f"{args.real_ct}: the two real normal scans and their organ maps are not there")
    trim = TrimROIBorder(args.trim_hu, 3.0)
    tables, notes = [], []
    start = time.perf_counter()
    for model in ("sparse", "metastatic"):
        folds = build_leave_one_out(scans, work / model, n_sets=args.sets, seed=args.seed, lesion_model=model)
        rows = []
        for label, chosen in (("as given", None), (f"trimmed ({args.trim_hu:g} HU, 3 mm)", trim)):
            per_fold = [fold_figures(work / model, f["datalist"], chosen, args.scales) for f in folds]
            rows += mean_rows(per_fold, label)
            rows += [{**r, "ROI": f"{label}, {f['held_out']}"} for f, p in zip(folds, per_fold) for r in mean_rows([p], label)]
        columns = ["reading", "ROI", "pixel AUROC (liver)", "sens ≤1 FP/scan", *[k for k in rows[0] if k.startswith("FROC")],
                   "coverage <10 mm @5% FPR"]  # fmt: skip
        tables.append(f"**{model} lesions** (mean of the two held-out scans, then each)\n\n" + format_table(rows, columns))
        if model == "sparse":  # the normal scans are the same for both models
            peaks = [{"scan": f["held_out"], **p} for f in folds for p in normal_peaks(work / model, f["datalist"], args.scales)]
            tables.append("**the highest blob readings of each normal scan** (ROI as given)\n\n"
                          + format_table(peaks, ["scan", "blob reading", "depth in the mask (mm)", "HU"]))  # fmt: skip
    notes.append("TrimROIBorder, seconds per case on the liver's box: " + ", ".join(
        f"{scan} {np.mean(t):.2f}" for scan, t in sorted(TRIM_SECONDS.items())))
    notes.append(f"blob scales {args.scales} mm; {args.sets} seeded lesion sets per scan and model (seed {args.seed}); "
                 f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip
    record(TITLE, torch.device("cpu"), tables, notes, results=None if args.no_record else args.results)


if __name__ == "__main__":
    main()
