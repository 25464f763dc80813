import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

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
