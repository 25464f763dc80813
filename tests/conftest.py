import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_ad.data.datalists import LESION_LABEL

warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_CT = SHARED / "data" / "real_ct" / "ts_example"


@pytest.fixture(scope="session")
def real_ct() -> Path:
    if not REAL_CT.is_dir():
        pytest.skip("the real CT sample is not available (expected at ../shared/data/real_ct/ts_example)")
    return REAL_CT


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture()
def oblique_case(tmp_path):
    """A small CT-like volume stored in a non-RAS axis order (LPS-style flips, slices along the first axis),
    with a liver block and one bright 'lesion' sphere at a known world position."""
    shape = (18, 40, 36)  # axis 0 is the slice axis
    affine = np.array(
        [
            [0.0, 0.0, -0.8, 40.0],  # array axis 2 → world x (flipped)
            [0.0, -0.75, 0.0, 25.0],  # array axis 1 → world y (flipped)
            [3.0, 0.0, 0.0, -60.0],  # array axis 0 → world z (slices, 3 mm)
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 5.0, shape).astype(np.float32)
    image[:, :3, :] = -1000.0
    label = np.zeros(shape, dtype=np.uint8)
    label[3:15, 8:32, 6:30] = 1
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    center = np.array([9.0, 20.0, 15.0])
    sphere = ((zz - center[0]) * 3.0) ** 2 + ((yy - center[1]) * 0.75) ** 2 + ((xx - center[2]) * 0.8) ** 2 <= 6.0**2
    image[sphere] = 200.0
    label[sphere] = 2
    world_center = (affine @ np.append(center, 1.0))[:3]
    return {
        "image": write_nifti(tmp_path / "case.nii.gz", image, affine),
        "label": write_nifti(tmp_path / "case_label.nii.gz", label, affine),
        "affine": affine,
        "shape": shape,
        "world_center": world_center,
        "sphere": sphere,
    }


def with_inserted_lesion(data: Path, case: dict, radius_mm: float = 12.0) -> dict:
    """A copy of a normal phantom case with a hypodense sphere (-60 HU, label 2) at the deepest point of its liver."""
    from scipy import ndimage

    image, label = nib.load(str(data / case["image"])), nib.load(str(data / case["label"]))
    hu, lab = np.asarray(image.dataobj).copy(), np.asarray(label.dataobj).copy()
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    depth = ndimage.distance_transform_edt(lab > 0, sampling=spacing)
    centre = np.unravel_index(np.argmax(depth), depth.shape)
    assert depth[centre] > radius_mm + 2 * spacing.max()  # the sphere lies inside the liver, with a margin
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1)
    sphere = (((grid - np.array(centre)) * spacing) ** 2).sum(-1) <= radius_mm**2
    hu[sphere] -= 60
    lab[sphere] = LESION_LABEL
    item = {"case_id": f"{case['case_id']}_lesion", "image": f"{case['case_id']}_lesion.nii.gz", "label": f"{case['case_id']}_lesion_label.nii.gz"}
    nib.save(nib.Nifti1Image(hu, image.affine, image.header), str(data / item["image"]))
    nib.save(nib.Nifti1Image(lab, label.affine, label.header), str(data / item["label"]))
    return item


def axial_first(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` with its head-foot axis first (the axis the predictor scores slices along)."""
    codes = nib.aff2axcodes(affine)
    return np.moveaxis(array, [i for i, c in enumerate(codes) if c in "SI"][0], 0)


def check_metrics_against_written_volumes(metrics: dict, csv_rows: dict, out: Path, data: Path, cases: list) -> None:
    """An evaluation's slice and in-liver pixel AUROC and its lesion coverage by size, computed again,
    independently, from the heatmaps and summaries it wrote to ``out / "volumes"`` and the cases' labels."""
    from sklearn.metrics import roc_auc_score

    from monai_ad.metrics import lesion_coverage

    assert metrics["n_volumes"] == len(cases)
    slice_truth, slice_scores, pixel_truth, pixel_scores = [], [], [], []
    volumes = {"heat": [], "lesion": [], "liver": [], "spacing": []}
    for case in cases:
        summary = json.loads((out / "volumes" / f"{case['case_id']}_summary.json").read_text())
        heatmap = nib.load(str(out / "volumes" / f"{case['case_id']}_heatmap.nii.gz"))
        label = nib.load(str(data / case["label"]))
        assert np.allclose(heatmap.affine, label.affine, atol=1e-4)
        heat = axial_first(np.asarray(heatmap.dataobj, dtype=np.float64), heatmap.affine)
        truth = axial_first(np.asarray(label.dataobj), label.affine)
        scored = [z for z, s in enumerate(summary["slice_scores"]) if s is not None]
        assert len(summary["slice_scores"]) == truth.shape[0] and scored
        slice_truth += [bool((truth[z] == LESION_LABEL).any()) for z in scored]
        slice_scores += [summary["slice_scores"][z] for z in scored]
        liver = truth[scored] > 0
        pixel_truth.append(truth[scored][liver] == LESION_LABEL)
        pixel_scores.append(heat[scored][liver])
        volumes["heat"].append(np.asarray(heatmap.dataobj, dtype=np.float64))
        volumes["lesion"].append(np.asarray(label.dataobj) == LESION_LABEL)
        volumes["liver"].append(np.asarray(label.dataobj) > 0)
        volumes["spacing"].append(np.linalg.norm(label.affine[:3, :3], axis=0))
    assert metrics["slice_auroc"] == pytest.approx(roc_auc_score(slice_truth, slice_scores), abs=1e-9)
    pixel = roc_auc_score(np.concatenate(pixel_truth), np.concatenate(pixel_scores))
    assert metrics["pixel_auroc_roi"] == pytest.approx(pixel, abs=1e-4)
    # each lesion's coverage at 5 % FPR of normal liver, by size, again from the written heatmaps
    cover = lesion_coverage(volumes["heat"], volumes["lesion"], volumes["liver"], volumes["spacing"], fpr=0.05)
    by_size = metrics["lesions_by_size"]
    assert sum(v["n_lesions"] for v in by_size.values()) == cover["n_lesions"] > 0
    for name, figures in by_size.items():
        expected = cover["coverage_by_size"][name]
        assert (figures["coverage"] is None) == (expected is None), name
        if expected is not None:
            assert figures["coverage"] == pytest.approx(expected, abs=0.02), name
            assert float(csv_rows[f"lesions_by_size/{name}/coverage"]) == pytest.approx(figures["coverage"], rel=1e-9)
