#!/usr/bin/env python
"""Measure the app's feedback threshold selection on phantom studies, without a server.

A folder datastore of ``small`` phantoms (6 normal, 4 abnormal) is built as ``make app`` builds it; two abnormal
studies get a ``final`` label (their true lesion mask, as a radiologist's correction would be); the app's training
task fits PatchCore (bundle defaults) on the normal-marked studies and selects the threshold on the two corrected
ones. Printed: the training task's before/after figures on those two, and the pooled Dice of the label maps on the
two other abnormal studies (held out) at the threshold before and after.

Usage: ``python scripts/feedback_check.py [--out DIR]`` (about 2 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_ad import label_server
from monai_ad.prediction import Predictor

sys.path.insert(0, str(label_server.APP_DIR))

from lib.scoring.feedback_threshold import pooled_label_dice  # noqa: E402
from lib.trainers.normal_studies import NormalStudiesTrain  # noqa: E402

MODEL = "patchcore_liver_ct"
LESION = 2  # LiTS labels of the phantom


def lesion_mask(phantom: Path, item: dict, out: Path) -> Path:
    label = nib.load(str(phantom / item["label"]))
    path = out / f"{item['case_id']}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image((np.asarray(label.dataobj) == LESION).astype(np.uint8), label.affine), str(path))
    return path


def main() -> int:
    from monailabel.datastore.local import LocalDatastore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (default: a new temporary folder)")
    out = Path(parser.parse_args().out or tempfile.mkdtemp(prefix="feedback_check_"))
    studies = label_server.prepare_sample_studies(out, n_normal=6, n_abnormal=4, preset="small", progress=False)
    phantom = out / "phantom"
    abnormal = [item for item in json.loads((phantom / "datalist.json").read_text())["test"] if item["abnormal"]]
    corrected, held_out = abnormal[:2], abnormal[2:]
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    for item in corrected:
        store.save_label(item["case_id"], str(lesion_mask(phantom, item, out / "final")), "final", {})
    model = out / "models" / f"{MODEL}.pt"
    result = NormalStudiesTrain(MODEL, label_server.PROJECT_ROOT / "bundles" / MODEL, str(model), MODEL)({"device": "cpu"}, store)
    feedback = result["feedback"]
    summary = {"corrected": {k: feedback[k] for k in ("cases", "threshold_before", "threshold_after", "dice_before", "dice_after")}}
    for name in ("before", "after"):
        predictor = Predictor(str(model), pixel_threshold=feedback[f"threshold_{name}"], device="cpu")
        maps, truths = [], []
        for item in held_out:
            case = item["case_id"]
            maps.append(predictor(str(studies / f"{case}.nii.gz"), str(out / "liver_masks" / f"{case}.nii.gz")).label_map)
            truths.append(np.asarray(nib.load(str(lesion_mask(phantom, item, out / "held_out"))).dataobj) > 0)
        summary[f"held_out_dice_{name}"] = pooled_label_dice(maps, truths)
    summary["held_out"] = [item["case_id"] for item in held_out]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
