"""Calibrated alarms measured: the false-alarm rate realised on held-out normal scans against the rate asked for,
and the share of abnormal scans flagged at it.

    python benchmarks/false_alarms.py                       # density and intensity, rates 0.05 0.1 0.2
    python benchmarks/false_alarms.py --detectors fused --rates 0.1

Each detector is fitted once on a few phantom normals. The remaining normal scans are split again and again
(``--splits`` seeded splits) into ``--calibration`` scans that calibrate and the rest, every scan read once as
``monai-ad infer`` reads it (``monai_ad.calibration.calibrate_on_scans``: its study score and its region score, the
highest threshold at which its label map keeps a region). Per rate ``a``: the share of held-out normal scans with a
flagged slice (study level) and with a flagged region, mean over splits with its standard deviation, against the
finite-sample bounds ``[a - 1/(n+1), a]``; and the share of abnormal scans flagged at the same thresholds.
Re-splitting the normals without refitting is what the guarantee covers: calibration and test scans are
exchangeable given the fitted model.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, format_table, record, resolve  # noqa: E402

from monai_ad.calibration import calibrate_on_scans, operating_point  # noqa: E402
from monai_ad.data.datalists import load_datalist, roi_source  # noqa: E402
from monai_ad.data.phantom import write_phantom_dataset  # noqa: E402
from monai_ad.detectors.base import detector_class  # noqa: E402
from monai_ad.postprocess import MIN_LESION_MM3  # noqa: E402
from monai_ad.prediction import Predictor  # noqa: E402
from monai_ad.training import train  # noqa: E402

TITLE = "Calibrated alarms: realised false-alarm rate on held-out normals"


def scan_scores(predictor: Predictor, items) -> dict[str, np.ndarray]:
    """Per scan, read as infer reads it: its study score and its region score (``monai_ad.calibration``)."""
    study, region = [], []
    for item in items:
        one = calibrate_on_scans(predictor, [(item["image"], roi_source(item))])
        study.append(one["study"][0])
        region.append(one["region"][0])
    return {"study": np.asarray(study), "region": np.asarray(region)}


def measure(name: str, work: Path, args, device, hparams: dict | None = None) -> list[dict]:
    """The table rows of one detector (``hparams``: default its cpu schedule); ``args`` as ``main`` parses them."""
    datalist = write_phantom_dataset(
        work / "data", n_normal=args.fit + args.normals, n_abnormal=args.abnormal, n_validation=args.normals - 2,
        n_test_normal=2, seed=args.seed, preset=args.preset, progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    hparams = detector_class(name).schedule("cpu") if hparams is None else hparams
    detector = train(name, datalist, work / f"{name}.pt", hparams, device=str(device), progress=False)
    train_s = time.perf_counter() - start
    predictor = Predictor(detector, device=str(device))
    normals = load_datalist(datalist, "validation") + [i for i in load_datalist(datalist, "test") if not i["abnormal"]]
    abnormal = [i for i in load_datalist(datalist, "test") if i["abnormal"]]
    normal, sick = scan_scores(predictor, normals), scan_scores(predictor, abnormal)
    rng = np.random.default_rng(args.seed)
    rows = []
    for rate in args.rates:
        if rate * (args.calibration + 1) < 1:
            rows.append({"detector": name, "rate asked": rate, "calibration scans": args.calibration,
                         "bounds": f"needs {math.ceil(1 / rate - 1 - 1e-9)} calibration scans"})  # fmt: skip
            continue
        study_far, region_far, sensitivity, region_sensitivity = [], [], [], []
        for _ in range(args.splits):
            order = rng.permutation(len(normals))
            cal, test = order[: args.calibration], order[args.calibration :]
            point = operating_point({"study": normal["study"][cal], "region": normal["region"][cal],
                                     "extent_threshold": predictor.extent_threshold}, rate)  # fmt: skip
            slice_t, pixel_t = point["slice"], point["pixel"]  # a scan holds a kept region iff its region score reaches it
            study_far.append(np.mean(normal["study"][test] >= slice_t))
            region_far.append(np.mean(normal["region"][test] >= pixel_t))
            sensitivity.append(np.mean(sick["study"] >= slice_t))
            region_sensitivity.append(np.mean(sick["region"] >= pixel_t))
        n = args.calibration
        rows.append({
            "detector": name, "rate asked": rate, "calibration scans": n, "held-out normals": len(normals) - n,
            "bounds": f"{max(rate - 1 / (n + 1), 0):.3f}–{rate:.3f}",
            "study FAR": f"{np.mean(study_far):.3f} ± {np.std(study_far):.3f}",
            "region FAR": f"{np.mean(region_far):.3f} ± {np.std(region_far):.3f}",
            "abnormal: flagged slice": f"{np.mean(sensitivity):.3f}",
            "abnormal: flagged region": f"{np.mean(region_sensitivity):.3f}", "train s": round(train_s, 1),
        })  # fmt: skip
    return rows


COLUMNS = ["detector", "rate asked", "calibration scans", "held-out normals", "bounds", "study FAR", "region FAR",
           "abnormal: flagged slice", "abnormal: flagged region", "train s"]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings of the measurement (also the accuracy benchmark's, for its ``--data alarms``)."""
    parser.add_argument("--rates", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--fit", type=int, default=4, help="normal phantoms the detector is fitted on")
    parser.add_argument("--normals", type=int, default=40, help="further normal phantoms, split into calibration and test")
    parser.add_argument("--calibration", type=int, default=19, help="of them, how many calibrate in each split")
    parser.add_argument("--abnormal", type=int, default=10)
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--preset", default="tiny")


def describe(args) -> str:
    return (f"{args.preset} phantoms: each detector fitted on {args.fit} normals; {args.normals} other normals split "
            f"{args.splits} times (seeded) into {args.calibration} calibration scans and the rest; {args.abnormal} "
            f"abnormal phantoms. FAR: share of held-out normal scans with a flagged slice (study) or a region of at "
            f"least {MIN_LESION_MM3:g} mm³ (region), mean ± std over splits. abnormal: share of abnormal phantoms "
            f"with a flagged slice / region at the same thresholds.")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["density", "intensity"])
    add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    device = resolve(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.detectors:
            rows += measure(name, Path(tmp) / name, args, device)
    table = format_table(rows, COLUMNS)
    notes = [describe(args)]
    if args.no_record:
        print(table)
    else:
        record(TITLE, device, [table], notes, results=RESULTS)


if __name__ == "__main__":
    main()
