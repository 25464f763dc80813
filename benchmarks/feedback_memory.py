"""Corrections that teach at once: false regions per normal scan and lesion sensitivity before and after N corrections.

A memory detector is fitted on phantom normals (thresholds from held-out normals, as ``monai-ad train`` sets them).
A pool of other normal scans plays the corrected studies: each pool scan the model flags is one correction, its
flagged regions erased (the ``final`` label is empty), taught through the app's own code path
(``lib.scoring.feedback_memory.correction_slices`` → ``remember_normal``). After N = 1, 2, 4 corrections the model
reads held-out scans it never saw: normal ones (false regions per scan) and abnormal ones (lesion sensitivity: the
share of lesions a labelled region overlaps, ``monai_ad.metrics.detect_lesions`` on the served label map).

    python benchmarks/feedback_memory.py                       # patchcore, tiny phantoms
    python benchmarks/feedback_memory.py --detectors patchcore padim fused --preset small
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, record, resolve  # noqa: E402

from monai_ad.data.datalists import LESION_LABEL, load_datalist, roi_source  # noqa: E402
from monai_ad.data.phantom import write_phantom_dataset  # noqa: E402
from monai_ad.detectors.base import detector_class  # noqa: E402
from monai_ad.label_server import APP_DIR  # noqa: E402
from monai_ad.metrics import detect_lesions  # noqa: E402
from monai_ad.prediction import Predictor  # noqa: E402
from monai_ad.training import train  # noqa: E402
from monai_ad.transforms.pipeline import IMAGE, ROI  # noqa: E402

sys.path.insert(0, str(APP_DIR))
from lib.scoring.feedback_memory import ERASED, correction_slices  # noqa: E402

import nibabel as nib  # noqa: E402

COLUMNS = ["detector", "corrections", "features added", "false regions / normal scan", "false regions / corrected scan", "lesion sensitivity",
           "lesions", "normal scans", "abnormal scans", "update s"]  # fmt: skip


def reading(predictor: Predictor, normals: list[dict], abnormal: list[dict]) -> dict[str, float]:
    """False regions per normal scan and lesion sensitivity of the served label maps."""
    false_regions = [predictor(i["image"], roi_source(i)).summary for i in normals]
    found = total = 0
    for item in abnormal:
        result = predictor(item["image"], roi_source(item))
        lesion = np.asarray(nib.load(item["label"]).dataobj) == LESION_LABEL
        spacing = np.linalg.norm(result.affine[:3, :3], axis=0)
        figures = detect_lesions(result.label_map, lesion, 0.5, spacing=spacing)
        found, total = found + figures["n_found"], total + figures["n_lesions"]
    false = float(np.mean([len(s.get("lesions") or []) for s in false_regions])) if false_regions else None
    return {"false": false, "found": found, "lesions": total}


def teach(predictor: Predictor, item: dict) -> int:
    """One correction: every region the model labels on the normal scan ``item`` erased; the features added."""
    served = predictor(item["image"], roi_source(item)).label_map > 0
    if not served.any():
        return 0
    slices = correction_slices(predictor, item["image"], roi_source(item), served, np.zeros_like(served))
    if slices is None:
        return 0
    return predictor.detector.remember_normal(slices[IMAGE], slices[ROI], slices[ERASED])


def measure(name: str, work: Path, args, device) -> list[dict]:
    datalist = write_phantom_dataset(
        work / f"data_{name}", n_normal=args.fit + args.calibration + args.pool + args.normals, n_abnormal=args.abnormal,
        n_validation=args.calibration, n_test_normal=args.pool + args.normals, seed=args.seed, preset=args.preset, progress=False,
    )  # fmt: skip
    hparams = {**detector_class(name).schedule("cpu"), "image_size": args.image_size}
    detector = train(name, datalist, work / f"{name}.pt", hparams, device=str(device), progress=False)
    test = load_datalist(datalist, "test")
    test_normals = [i for i in test if not i["abnormal"]]
    pool, normals = test_normals[: args.pool], test_normals[args.pool :]
    abnormal = [i for i in test if i["abnormal"]]
    base = Predictor(detector, device=str(device))
    corrections = [i for i in pool if base(i["image"], roi_source(i)).label_map.any()][: max(args.corrections)]
    rows, taught, added, seconds = [], 0, 0, 0.0
    model = copy.deepcopy(detector)
    predictor = Predictor(model, device=str(device))
    for n in [0, *args.corrections]:
        if n > len(corrections):
            print(f"{name}: only {len(corrections)} pool scans hold a false region; N = {n} not measured")
            break
        for item in corrections[taught:n]:
            start = time.perf_counter()
            added += teach(predictor, item)
            seconds += time.perf_counter() - start
        taught = n
        figures = reading(predictor, normals, abnormal)
        own = reading(predictor, corrections[:n], [])["false"] if n else None
        rows.append({
            "detector": name, "corrections": n, "features added": added, "false regions / normal scan": round(figures["false"], 3),
            "false regions / corrected scan": "" if own is None else round(own, 3),
            "lesion sensitivity": round(figures["found"] / max(figures["lesions"], 1), 3), "lesions": figures["lesions"],
            "normal scans": len(normals), "abnormal scans": len(abnormal), "update s": round(seconds / max(n, 1), 2) if n else "",
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=["patchcore"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fit", type=int, default=8, help="normal phantoms to fit on")
    parser.add_argument("--calibration", type=int, default=4, help="held-out normals that set the thresholds")
    parser.add_argument("--pool", type=int, default=8, help="normal scans the corrections are taken from")
    parser.add_argument("--normals", type=int, default=8, help="held-out normal scans read after the corrections")
    parser.add_argument("--abnormal", type=int, default=6, help="held-out abnormal scans read after the corrections")
    parser.add_argument("--corrections", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--image-size", type=int, default=96, help="slice size the detectors work at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave benchmarks/RESULTS.md as it is")
    args = parser.parse_args()
    device = resolve(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        rows = [row for name in args.detectors for row in measure(name, work, args, device)]
    notes = [
        f"{args.preset} phantoms (seed {args.seed}): each detector (its cpu schedule, {args.image_size} px slices) fitted on {args.fit} normals, thresholds "
        f"from {args.calibration} held-out normals; corrections: the first pool scans (of {args.pool} other normals) "
        "the model flags, all their labelled regions erased, taught with `remember_normal` through the app's code "
        "path, cumulatively; then held-out normal and abnormal scans read with the served label maps.",
        "false regions / corrected scan: the corrected pool scans read again after the update (before it, each held one or more).",
        "update s: mean seconds per correction (the scan read again, its slices pre-processed, the memory updated).",
    ]
    table = format_table(rows, COLUMNS)
    if args.no_record:
        print(table)
    else:
        record("Corrections that teach at once: false regions and sensitivity after N corrections", device, [table], notes)


if __name__ == "__main__":
    main()
