"""Turn downloaded public liver datasets into what monai_ad reads: a 3-D datalist and BMAD's 2-D slice layout.

The BMAD liver protocol: BTCV abdomens (liver = label 6) are the normal training data; LiTS volumes (1 liver,
2 tumour) are the test data; MSD Task03_Liver has LiTS's labels and can stand in for, or add to, LiTS.

Where this differs from BMAD's own preparation code, and why:
- the HU clip (−200..250) is applied to training *and* test slices (BMAD's code clips only LiTS, so its
  training and test intensities differ);
- slices are not rescaled by their own min/max (BMAD's ``imsave`` does), so intensities mean the same HU in
  every slice;
- volumes are oriented to RAS and slices written in radiological display (BMAD flips the raw arrays);
- splits are seeded and at patient level (no patient has slices in two splits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Orientation
from PIL import Image
from tqdm.auto import tqdm

from monai_ad.data.datalists import unlabelled_count
from monai_ad.errors import InputError
from monai_ad.io import atomic_write, save_nifti, write_json
from monai_ad.report import radiological
from monai_ad.transforms.array import BMAD_WINDOW, HistogramEqualize, HUWindow
from monai_ad.transforms.pipeline import LoadVolumed

BTCV_LIVER = 6
LITS_LIVER, LITS_TUMOUR = 1, 2
BMAD_SIZE = 512


def _volumes(pattern_dirs: Sequence[Path], prefixes: Sequence[str]) -> list[Path]:
    files = []
    for folder in pattern_dirs:
        if folder.is_dir():
            files += [p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))
                      and any(p.name.startswith(prefix) for prefix in prefixes)]  # fmt: skip
    return sorted(files)


def find_btcv(root: str | os.PathLike) -> list[dict[str, str]]:
    """BTCV (``img/imgNNNN.nii.gz`` with ``label/labelNNNN.nii.gz``, as in RawData/Training)."""
    root = Path(root)
    cases = []
    for image in _volumes([root], ["img"]):
        label = image.parent.parent / "label" / image.name.replace("img", "label", 1)
        if label.is_file():
            cases.append({"case_id": "btcv_" + image.name.split(".")[0].removeprefix("img"), "image": str(image), "label": str(label)})
    if not cases:
        raise InputError("no BTCV cases found (expected img/imgNNNN.nii.gz beside label/labelNNNN.nii.gz)", root)
    return cases


def find_lits(root: str | os.PathLike) -> list[dict[str, str]]:
    """LiTS (``volume-N.nii`` with ``segmentation-N.nii``, in any sub-folder)."""
    root = Path(root)
    segmentations = {p.name.split(".")[0].removeprefix("segmentation-"): p for p in _volumes([root], ["segmentation-"])}
    cases = []
    for image in _volumes([root], ["volume-"]):
        key = image.name.split(".")[0].removeprefix("volume-")
        if key in segmentations:
            cases.append({"case_id": f"lits_{key}", "image": str(image), "label": str(segmentations[key])})
    if not cases:
        raise InputError("no LiTS cases found (expected volume-N.nii beside segmentation-N.nii)", root)
    return cases


def find_msd_liver(root: str | os.PathLike) -> list[dict[str, str]]:
    """MSD Task03_Liver through ``monai.apps.DecathlonDataset`` (``root`` holds ``Task03_Liver/``)."""
    from monai.apps import DecathlonDataset

    root = Path(root)
    if not (root / "Task03_Liver" / "dataset.json").is_file():
        raise InputError("no Task03_Liver/dataset.json here (the folder that holds Task03_Liver)", root)
    items = DecathlonDataset(str(root), task="Task03_Liver", section="training", download=False, cache_rate=0.0, val_frac=0.0).data
    return [{"case_id": "msd_" + Path(i["image"]).name.split(".")[0], "image": i["image"], "label": i["label"]} for i in items]


def _split(cases: list[dict], fractions: Sequence[float], rng: np.random.Generator) -> list[list[dict]]:
    """Patient-level split: each case (a patient) goes to exactly one part."""
    order = rng.permutation(len(cases))
    counts = [int(round(f * len(cases))) for f in fractions[:-1]]
    parts, start = [], 0
    for n in counts:
        parts.append([cases[i] for i in order[start : start + n]])
        start += n
    parts.append([cases[i] for i in order[start:]])
    return parts


def _write_mask(mask: np.ndarray, affine: np.ndarray, path: Path) -> str:
    atomic_write(path, lambda tmp: save_nifti(mask.astype(np.uint8), affine, tmp, intent="label"))
    return str(path)


class _SliceWriter:
    """BMAD-style 2-D slices: HU clip, liver masking, BMAD histogram equalisation, 512², 8-bit PNG."""

    def __init__(self, window=BMAD_WINDOW):
        self.window = HUWindow(window)
        self.equalize = HistogramEqualize(bmad_squeeze=True)
        self.orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
        self.loader = LoadVolumed(["image", "label"], mask_keys=["label"])

    def slices(self, case: dict, liver_labels: Sequence[int], tumour_label: int | None):
        data = self.loader({"image": case["image"], "label": case["label"]})
        image, label = self.orient(data["image"]), self.orient(data["label"])
        label_np = label.as_tensor()[0].numpy()
        liver = np.isin(label_np, liver_labels) | ((label_np == tumour_label) if tumour_label else False)
        roi = torch.as_tensor(liver[None])
        windowed = self.equalize(self.window(image.as_tensor()), roi) * roi
        tumour = label_np == tumour_label if tumour_label else np.zeros_like(liver)
        for z in np.nonzero(liver.any(axis=(0, 1)))[0]:
            yield int(z), radiological(windowed[0, :, :, z].numpy()), radiological(tumour[:, :, z].astype(np.float32))

    def write(self, path: Path, array: np.ndarray) -> None:
        picture = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)).resize((BMAD_SIZE, BMAD_SIZE), Image.BILINEAR)
        atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))

    def write_mask(self, path: Path, mask: np.ndarray) -> None:
        picture = Image.fromarray((mask > 0.5).astype(np.uint8) * 255).resize((BMAD_SIZE, BMAD_SIZE), Image.NEAREST)
        atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def prepare_liver_benchmark(
    out_dir: str | os.PathLike,
    btcv: str | os.PathLike,
    lits: str | os.PathLike | None = None,
    msd: str | os.PathLike | None = None,
    seed: int = 0,
    normal_validation_fraction: float = 0.2,
    lits_validation_fraction: float = 0.1,
    slices: bool = True,
    progress: bool = True,
    unlabelled_fraction: float = 0.0,
) -> Path:
    """Write ``out_dir/datalist.json`` (3-D) and, with ``slices``, the BMAD layout under ``out_dir/bmad``.

    Sections: ``training`` (BTCV normals), ``validation`` (held-out BTCV normals, to calibrate thresholds),
    ``validation_labelled`` (a few LiTS/MSD patients, for model selection) and ``test`` (the other LiTS/MSD
    patients). Every item has ``image``, ``roi`` (a binary liver mask written under ``out_dir/masks``) and,
    for LiTS/MSD, ``label`` (1 liver, 2 tumour).

    ``unlabelled_fraction`` > 0: that share of the test patients (seeded, at patient level, at least one) moves
    to an ``unlabelled`` section instead, each with ``image`` and ``roi`` only (no tumour label, no "abnormal"
    flag): the unlabelled studies, normal and abnormal mixed, that DDAD's second ensemble learns from. They leave
    ``test`` (and BMAD's test slices), so no scored patient was seen in training. With 0 (the default) the
    output is what it was without the option.
    """
    out = Path(out_dir)
    if lits is None and msd is None:
        raise InputError("give LiTS and/or MSD Task03_Liver as test data")
    if not 0 <= float(unlabelled_fraction) < 1:
        raise InputError(f"the unlabelled fraction must be at least 0 and below 1, got {unlabelled_fraction}")
    rng = np.random.default_rng(seed)
    normals = find_btcv(btcv)
    abnormals = (find_lits(lits) if lits else []) + (find_msd_liver(msd) if msd else [])
    train, valid = _split(normals, [1 - normal_validation_fraction, normal_validation_fraction], rng)
    valid_labelled, test = _split(abnormals, [lits_validation_fraction, 1 - lits_validation_fraction], rng)
    unlabelled: list[dict] = []
    if unlabelled_fraction > 0:
        if len(test) < 2:
            raise InputError(f"{len(test)} test patient(s) leave none to list as unlabelled; give more LiTS/MSD cases")
        n_unlabelled = unlabelled_count(len(test), unlabelled_fraction)
        unlabelled, test = _split(test, [n_unlabelled / len(test), 1 - n_unlabelled / len(test)], rng)

    sections: dict[str, list[dict[str, Any]]] = {}
    for name, cases, liver_labels, tumour in (
        ("training", train, [BTCV_LIVER], None),
        ("validation", valid, [BTCV_LIVER], None),
        ("validation_labelled", valid_labelled, [LITS_LIVER], LITS_TUMOUR),
        ("test", test, [LITS_LIVER], LITS_TUMOUR),
        *((("unlabelled", unlabelled, [LITS_LIVER], LITS_TUMOUR),) if unlabelled else ()),
    ):
        items = []
        for case in tqdm(cases, desc=f"masks ({name})", disable=not progress, unit="volume"):
            label = nib.load(case["label"])
            values = np.asarray(label.dataobj)
            liver = np.isin(values, liver_labels + ([tumour] if tumour else []))
            if not liver.any():
                raise InputError(f"no liver label {liver_labels} in the segmentation", case["label"])
            item = {"case_id": case["case_id"], "image": case["image"],
                    "roi": _write_mask(liver, label.affine, out / "masks" / f"{case['case_id']}_liver.nii.gz")}  # fmt: skip
            if tumour and name != "unlabelled":
                item.update({"label": case["label"], "abnormal": bool((values == tumour).any())})
            items.append(item)
        sections[name] = items

    if slices:
        writer = _SliceWriter()
        bmad = out / "bmad"
        layout = {"training": "train", "validation_labelled": "valid", "test": "test"}
        for name, split in layout.items():
            cases = {"training": train, "validation_labelled": valid_labelled, "test": test}[name]
            tumour = None if name == "training" else LITS_TUMOUR
            liver = [BTCV_LIVER] if name == "training" else [LITS_LIVER]
            for case in tqdm(cases, desc=f"BMAD slices ({split})", disable=not progress, unit="volume"):
                for z, image, mask in writer.slices(case, liver, tumour):
                    stem = f"{case['case_id']}_{z:04d}.png"
                    if name == "training":
                        writer.write(bmad / "train" / "good" / stem, image)
                        continue
                    kind = "Ungood" if mask.any() else "good"
                    writer.write(bmad / split / kind / "img" / stem, image)
                    writer.write_mask(bmad / split / kind / "anomaly_mask" / stem, mask)

    description = {
        "name": "BMAD liver protocol (monai_ad preparation)",
        "seed": seed,
        "sources": {"btcv": str(btcv), "lits": str(lits) if lits else None, "msd": str(msd) if msd else None},
        "splits": "patient level, seeded",
        "hu_window": list(BMAD_WINDOW),
        **sections,
    }
    return write_json(out / "datalist.json", description)


def datalist_summary(path: str | os.PathLike) -> dict[str, int]:
    content = json.loads(Path(path).read_text())
    return {k: len(v) for k, v in content.items() if isinstance(v, list)}
