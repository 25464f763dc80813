"""What a detector gets wrong on the accuracy benchmark's data, slice by slice and lesion by lesion.

    python benchmarks/error_review.py --detector intensity --data phantoms
    python benchmarks/error_review.py --detector fused --data real --top 6
    python benchmarks/error_review.py --detector intensity --data real --set intensity:min_width_mm=4 --no-record

The same folds, training and scoring as ``accuracy.py`` (same options: ``--set``, ``--preprocess``, ``--quick``).
For each fold it lists:

- the normal slices that score highest (the ones that push lesion slices down the slice ranking): where their
  maximum lies (depth from the liver's edge in mm) and how far the CT there is from the liver's median HU;
- the lesion slices that score below the ``--top``-th of those normal slices, with the lesion's cross-section
  in the slice (a few mm² at a lesion's tip is in the slice count too) and how visible it is there (``d′``,
  ``visibility.py``: its contrast in units of the same measurement's spread over normal liver);
- the slice AUROC over all lesion slices and over those whose lesion is at least ``d′`` 2, 3 and 5 visible;
- every lesion at the FROC operating point of ``accuracy.py`` (the threshold with the best sensitivity at ≤ 1
  false region per scan): found or missed, its size, its peak score, and what the generator drew (contrast,
  margin, rim) where the data set records it; then the false regions at that threshold.

It appends the tables, with machine, date and command, to ``benchmarks/RESULTS.md`` (``--no-record``: print only).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import visibility  # noqa: E402
from common import REAL_CT, RESULTS, format_table, record, resolve  # noqa: E402

from monai_ad import metrics  # noqa: E402
from monai_ad.transforms.pipeline import LoadVolumed  # noqa: E402


def liver_median_hu(image: np.ndarray, liver: np.ndarray) -> float:
    return float(np.median(image[liver])) if liver.any() else float("nan")


def case_image(case: dict) -> np.ndarray:
    """The test scan's CT in the heatmap's crop (axial axis first)."""
    image = LoadVolumed(["image"])({"image": case["image"]})["image"].as_tensor()[0].numpy()
    return np.moveaxis(image[case["box"]], case["axis"], 0)


def in_plane_depth(liver: np.ndarray, spacing) -> np.ndarray:
    """Each liver pixel's distance (mm) from the liver's edge within its own slice (axial axis first)."""
    return np.stack([ndimage.distance_transform_edt(s, sampling=spacing[1:]) for s in liver])


def scan_slice(case: dict, z: int) -> int:
    """The slice's index along the scan's own axial axis (the crop starts at the liver's box)."""
    return int(case["box"][case["axis"]].start + z)


def slice_rows(cases: list[dict], images: list[np.ndarray], depths: list[np.ndarray],
               visibility: dict[tuple[int, int], dict] | None = None):  # fmt: skip
    """Every liver slice of the cases: the normal ones by slice score, highest first, and the lesion ones, lowest
    first (with ``visibility``: each lesion slice's ``d′`` and contrast, see ``visibility.slice_visibility``)."""
    normal, abnormal = [], []
    for i, (case, image, depth) in enumerate(zip(cases, images, depths)):
        median = liver_median_hu(image, case["liver"])
        slice_area = case["spacing"][1] * case["spacing"][2]
        for z in range(case["heat"].shape[0]):
            liver = case["liver"][z]
            if not liver.any():
                continue
            heat = np.where(liver, case["heat"][z], -np.inf)
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            lesion = case["lesion"][z]
            row = {"scan": case["case_id"], "slice": scan_slice(case, z), "slice score": float(heat[peak])}
            if lesion.any():
                abnormal.append({**row, "lesion area (mm²)": float(lesion.sum() * slice_area),
                                 "score in the lesion": float(case["heat"][z][lesion].max()),
                                 **(visibility or {}).get((i, z), {})})  # fmt: skip
            else:
                local = image[z][max(peak[0] - 1, 0) : peak[0] + 2, max(peak[1] - 1, 0) : peak[1] + 2]
                normal.append({**row, "depth of the maximum (mm)": float(depth[z][peak]),
                               "HU − liver median there": float(local.mean() - median)})  # fmt: skip
    normal.sort(key=lambda r: -r["slice score"])
    abnormal.sort(key=lambda r: r["slice score"])
    return normal, abnormal


def below_top(normal: list[dict], abnormal: list[dict], top: int) -> list[dict]:
    """The lesion slices that score below the ``top``-th normal slice."""
    bar = normal[min(top, len(normal)) - 1]["slice score"] if normal else np.inf
    return [r for r in abnormal if r["slice score"] < bar]


VISIBILITY_LEVELS = (2.0, 3.0, 5.0)
CEILING = "all lesion slices, these ranked first"


def auroc_by_visibility(normal: list[dict], abnormal: list[dict]) -> list[dict]:
    """Slice AUROC (these slice scores) against every normal slice, over all lesion slices and over those whose
    lesion is at least as visible as each of ``VISIBILITY_LEVELS`` (``d′``); and the ceiling over all lesion
    slices that ranking those visible ones above every normal slice would reach, the fainter ones scored as they
    are."""
    normal_scores = [r["slice score"] for r in normal]
    above_all = max(normal_scores, default=0.0) + 1.0

    def auroc(lesion_scores: list[float]) -> float | None:
        labels = [0] * len(normal_scores) + [1] * len(lesion_scores)
        try:
            return metrics.slice_auroc(np.asarray(labels), np.asarray(normal_scores + lesion_scores))
        except metrics.UndefinedMetricError:
            return None

    rows = []
    for level in (None, *VISIBILITY_LEVELS):
        visible = [level is None or (r.get("d′") is not None and r["d′"] >= level) for r in abnormal]
        kept = [r["slice score"] for r, v in zip(abnormal, visible) if v]
        observed = auroc(kept)
        ceiling = auroc([above_all if v else r["slice score"] for r, v in zip(abnormal, visible)]) if level else None
        rows.append({"lesion slices": "all" if level is None else f"d′ ≥ {level:g}", "count": len(kept),
                     "slice AUROC": "n/a" if observed is None else observed, CEILING: ceiling})  # fmt: skip
    return rows


def drawn_lesion(case: dict, component: np.ndarray) -> dict[str, Any]:
    """What the data set says was drawn for the lesion whose centre falls in ``component`` (crop grid)."""
    inverse = np.linalg.inv(case["affine"])
    for drawn in case["lesions_drawn"]:
        voxel = np.rint((inverse @ np.r_[np.asarray(drawn["center_mm"], float), 1.0])[:3]).astype(int)
        crop = [voxel[i] - case["box"][i].start for i in range(3)]
        crop = [crop[case["axis"]], *(crop[i] for i in range(3) if i != case["axis"])]
        if all(0 <= c < n for c, n in zip(crop, component.shape)) and component[tuple(crop)]:
            return drawn
    return {}


def slice_range(case: dict, mask: np.ndarray) -> str:
    z = np.nonzero(mask.any(axis=(1, 2)))[0]
    return f"{scan_slice(case, int(z[0]))}–{scan_slice(case, int(z[-1]))}"


def lesion_rows(cases: list[dict], threshold: float):
    """Every lesion at ``threshold`` (found or not, with what was drawn) and the false regions there."""
    rows, false_regions = [], []
    for case in cases:
        labels, n, diameters = metrics.lesion_components(case["lesion"], case["spacing"])
        predicted = (case["heat"] >= threshold) & case["liver"]
        regions, kept, true, match = metrics.match_regions(
            predicted, labels, n, float(np.prod(case["spacing"])), accuracy.MIN_LESION_MM3, accuracy.MIN_REGION_OVERLAP
        )
        found = set(match[true].tolist())
        for j in range(1, n + 1):
            component = labels == j
            drawn = drawn_lesion(case, component)
            rows.append({
                "scan": case["case_id"], "slices": slice_range(case, component), "diameter (mm)": float(diameters[j - 1]),
                "peak score": float(case["heat"][component].max()), "found": "yes" if j in found else "no",
                "contrast (HU)": drawn.get("contrast_hu", "n/a"), "kind / margin": drawn.get("kind", drawn.get("margin", "n/a")),
                "rim (HU)": drawn.get("rim_hu", "n/a"),
            })  # fmt: skip
        for j in np.nonzero(kept & ~true)[0]:
            region = regions == j
            false_regions.append({
                "scan": case["case_id"], "slices": slice_range(case, region),
                "volume (mm³)": float(region.sum() * np.prod(case["spacing"])), "peak score": float(case["heat"][region].max()),
            })  # fmt: skip
    false_regions.sort(key=lambda r: -r["peak score"])
    return rows, false_regions


def review(name: str, title: str, fold: dict, cases: list[dict], out: dict, top: int) -> list[str]:
    images = [case_image(c) for c in cases]
    depths = [in_plane_depth(c["liver"], c["spacing"]) for c in cases]
    normal, abnormal = slice_rows(cases, images, depths, visibility.slice_visibility(cases, images))
    below = below_top(normal, abnormal, top)
    n_lesion_slices, n_tips = len(abnormal), sum(r["lesion area (mm²)"] < 25.0 for r in abnormal)
    froc = accuracy.cases_froc(cases)
    lesions, false_regions = lesion_rows(cases, froc["threshold"])
    auroc = "n/a" if out.get("slice_auroc") is None else f"{out['slice_auroc']:.3f}"
    head = (f"**{title}, {fold['fold']}**: `{name}` slice AUROC {auroc} over "
            f"{sum(int(c['liver'].any(axis=(1, 2)).sum()) for c in cases)} liver slices, {n_lesion_slices} of them "
            f"with lesion ({n_tips} with under 25 mm² of it)")  # fmt: skip
    return [
        head,
        f"Normal slices scored highest (depth: in-plane distance of the slice's maximum from the liver's edge):\n\n"
        + format_table(normal[:top], ["scan", "slice", "slice score", "depth of the maximum (mm)", "HU − liver median there"]),
        f"Lesion slices scored below the {top}th normal slice above ({len(below)}; d′: how visible the lesion is in "
        f"the slice, its contrast against the liver around it in units of that measurement's spread over normal "
        f"liver, benchmarks/visibility.py):\n\n"
        + (format_table(below, ["scan", "slice", "lesion area (mm²)", "contrast (HU)", "d′", "score in the lesion",
                                "slice score"]) if below else "none"),
        "Slice AUROC by how visible the lesion is (the slice score = the map's maximum in the liver; normal "
        "slices: all; last column: the slice AUROC over all lesion slices were these visible ones ranked above "
        "every normal slice and the fainter ones scored as they are):\n\n" + format_table(auroc_by_visibility(normal, abnormal), ["lesion slices", "count", "slice AUROC", CEILING]),
        f"Lesions at the FROC operating point (threshold {froc['threshold']:.4g}: sensitivity "
        f"{froc['sensitivity']:.3f} at ≤ 1 false region per scan):\n\n"
        + format_table(lesions, ["scan", "slices", "diameter (mm)", "peak score", "found", "contrast (HU)", "kind / margin", "rim (HU)"]),
        f"False regions at that threshold ({len(false_regions)}; the {min(len(false_regions), 2 * top)} highest):\n\n"
        + (format_table(false_regions[: 2 * top], ["scan", "slices", "volume (mm³)", "peak score"]) if false_regions else "none"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="intensity")
    parser.add_argument("--data", nargs="+", choices=["phantoms", "real"], default=["phantoms"])
    parser.add_argument("--top", type=int, default=6, help="how many of the highest normal slices to list")
    parser.add_argument("--real-ct", type=Path, default=REAL_CT)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--false-regions-per-scan", type=float, default=1.0)
    parser.add_argument("--set", dest="hparams", action="append", default=[], metavar="DETECTOR:KEY=VALUE")
    parser.add_argument("--preprocess", action="append", default=[], metavar="DETECTOR:KEY=VALUE")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.top < 1:
        raise SystemExit("--top must be at least 1")
    name, device = args.detector, resolve(args.device)
    hparams = {**accuracy.detector_class(name).schedule("quick" if args.quick else "cpu"),
               **accuracy.parse_assignments(args.hparams, "--set").get(name, {})}  # fmt: skip
    preprocessing = {**accuracy.PREPROCESSING.get(name, {}),
                     **accuracy.parse_assignments(args.preprocess, "--preprocess").get(name, {})}  # fmt: skip
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_review_"))
    tables = []
    try:
        datasets = {}
        if "phantoms" in args.data:
            datasets["phantoms"] = accuracy.phantom_datasets(work, args.quick, args.seed)
        if "real" in args.data:
            folds = accuracy.real_datasets(work, args.real_ct, args.quick, args.seed, args.sets)
            if not folds:
                raise SystemExit(f"{args.real_ct}: the real CT samples are not there (pass --real-ct DIR)")
            datasets["real CT, inserted lesions"] = folds
        for title, folds in datasets.items():
            for i, fold in enumerate(folds):
                print(f"[{title}] {name}: {fold['fold']}", file=sys.stderr, flush=True)
                fold_work = work / "runs" / f"{title.split()[0]}_{i}"
                fold_work.mkdir(parents=True, exist_ok=True)
                out = accuracy.run_fold(name, hparams, preprocessing, fold, fold_work, device,
                                        args.false_regions_per_scan, keep_cases=True)  # fmt: skip
                tables += review(name, title, fold, out.pop("cases"), out, args.top)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    notes = [f"schedule: {accuracy.schedule_text(hparams, preprocessing)}",
             "data, training and operating point as in benchmarks/accuracy.py; slices are indices along each test "
             "scan's own axial axis"]  # fmt: skip
    record(f"Error review: {name}", device, tables, notes, results=None if args.no_record else args.results)


if __name__ == "__main__":
    main()
