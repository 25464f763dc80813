import json

import nibabel as nib
import numpy as np
import pytest

from monai_ad.data.phantom import make_phantom, write_phantom_dataset


@pytest.fixture(scope="module")
def abnormal_case():
    return make_phantom(7, abnormal=True, preset="tiny", n_lesions=3)


def test_deterministic_by_seed():
    a, b = make_phantom(5, True, "tiny"), make_phantom(5, True, "tiny")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.lesions == b.lesions
    c = make_phantom(6, True, "tiny")
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_labels_follow_lits_and_lesions_sit_in_the_liver(abnormal_case):
    normal = make_phantom(7, abnormal=False, preset="tiny")
    assert set(np.unique(normal.label)) == {0, 1}
    assert set(np.unique(abnormal_case.label)) == {0, 1, 2}
    assert abnormal_case.lesions
    lesion = abnormal_case.label == 2
    # lesions lie inside the liver: every lesion voxel's neighbourhood is liver or lesion
    from scipy import ndimage

    assert not (ndimage.binary_dilation(lesion) & (abnormal_case.label == 0)).any()


def test_hounsfield_units_are_plausible(abnormal_case):
    image, label = abnormal_case.image.astype(float), abnormal_case.label
    liver = np.median(image[label == 1])
    assert 80 <= liver <= 160
    assert abs(image[label == 2].mean() - liver) > 10
    assert (image > 300).any()  # bone
    assert (image < -900).any()  # air
    body_fat = image[(image > -150) & (image < -50)]
    assert body_fat.size > 0


def test_geometry_is_anisotropic_and_affine_matches_spacing(abnormal_case):
    affine, spacing = abnormal_case.affine, abnormal_case.spacing
    assert np.allclose(np.diag(affine)[:3], spacing)
    assert np.allclose(affine[:3, :3], np.diag(spacing))
    assert spacing[2] > spacing[0]


def test_lesion_centres_are_world_coordinates_of_lesion_voxels(abnormal_case):
    inverse = np.linalg.inv(abnormal_case.affine)
    for lesion in abnormal_case.lesions:
        voxel = np.rint(inverse @ np.append(lesion["center_mm"], 1.0))[:3].astype(int)
        assert abnormal_case.label[tuple(voxel)] == 2
        assert 3.0 * 0.7 <= lesion["diameter_mm"] <= 60.0 * 1.3
        assert lesion["kind"] in {"hypodense", "hyperdense", "rim", "cyst"}


def test_dataset_writer(tmp_path):
    datalist = write_phantom_dataset(tmp_path, n_normal=4, n_abnormal=2, seed=1, preset="tiny", progress=False)
    content = json.loads(datalist.read_text())
    assert len(content["training"]) == 2 and len(content["validation"]) == 1 and len(content["test"]) == 3
    assert sum(item["abnormal"] for item in content["test"]) == 2
    for item in content["training"] + content["validation"] + content["test"]:
        image = nib.load(str(tmp_path / item["image"]))
        label = nib.load(str(tmp_path / item["label"]))
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        assert (np.asarray(label.dataobj) == 2).any() == item["abnormal"]
    assert not list(tmp_path.rglob("*.partial*"))
