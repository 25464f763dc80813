"""BMAD liver protocol preparation on tiny phantoms laid out as BTCV, LiTS and MSD Task03_Liver ship them."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_ad.cli import main
from monai_ad.data.phantom import make_phantom


def _save(path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    for i in range(5):  # BTCV: liver is label 6, other organs other labels
        case = make_phantom(100 + i, abnormal=False, preset="tiny")
        label = np.where(case.label > 0, 6, 0).astype(np.uint8)
        label[:5, :5, :] = 1  # another organ's label
        _save(root / "btcv" / "img" / f"img{i + 1:04d}.nii.gz", case.image, case.affine)
        _save(root / "btcv" / "label" / f"label{i + 1:04d}.nii.gz", label, case.affine)
    for i in range(4):  # LiTS: volume-N.nii / segmentation-N.nii
        case = make_phantom(200 + i, abnormal=True, preset="tiny", n_lesions=2)
        _save(root / "lits" / "batch1" / f"volume-{i}.nii", case.image, case.affine)
        _save(root / "lits" / "batch1" / f"segmentation-{i}.nii", case.label, case.affine)
    items = []
    for i in range(2):  # MSD Task03_Liver with its dataset.json
        case = make_phantom(300 + i, abnormal=True, preset="tiny")
        _save(root / "msd" / "Task03_Liver" / "imagesTr" / f"liver_{i}.nii.gz", case.image, case.affine)
        _save(root / "msd" / "Task03_Liver" / "labelsTr" / f"liver_{i}.nii.gz", case.label, case.affine)
        items.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    (root / "msd" / "Task03_Liver" / "dataset.json").write_text(
        json.dumps(
            {"name": "Liver", "description": "phantom in MSD form", "reference": "-", "licence": "-", "release": "-",
             "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
             "numTraining": 2, "numTest": 0, "training": items, "test": []}  # fmt: skip
        )
    )
    return root


def test_prepare_writes_patient_level_splits_and_bmad_layout(sources, tmp_path):
    out = tmp_path / "prepared"
    args = ["--quiet", "prepare", "--btcv", sources / "btcv", "--lits", sources / "lits", "--msd", sources / "msd", "--out", out, "--seed", "3"]
    assert main([str(a) for a in args]) == 0
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == 5
    assert len(datalist["test"]) + len(datalist["validation_labelled"]) == 6
    ids = [item["case_id"] for section in ("training", "validation", "validation_labelled", "test") for item in datalist[section]]
    assert len(ids) == len(set(ids))  # each patient in exactly one split
    for item in datalist["training"] + datalist["test"]:
        roi = np.asarray(nib.load(item["roi"]).dataobj)
        assert set(np.unique(roi)) == {0, 1}
    assert all("label" in item and item["abnormal"] for item in datalist["test"])

    train_png = sorted((out / "bmad" / "train" / "good").glob("*.png"))
    assert train_png and Image.open(train_png[0]).size == (512, 512)
    ungood = sorted((out / "bmad" / "test" / "Ungood" / "img").glob("*.png"))
    masks = sorted((out / "bmad" / "test" / "Ungood" / "anomaly_mask").glob("*.png"))
    assert ungood and [p.name for p in ungood] == [p.name for p in masks]
    assert np.asarray(Image.open(masks[0])).max() == 255
    assert (out / "bmad" / "test" / "good" / "img").is_dir()
    picture = np.asarray(Image.open(train_png[len(train_png) // 2]))
    assert picture.max() > 100 and (picture == 0).mean() > 0.3  # liver bright, outside the liver black

    again = tmp_path / "again"
    assert main([str(a) for a in ["--quiet", "prepare", "--btcv", sources / "btcv", "--lits", sources / "lits", "--out", again, "--seed", "3", "--no-slices"]]) == 0
    assert not (again / "bmad").exists()


def test_prepare_refuses_missing_sources(tmp_path, capsys):
    assert main(["--quiet", "prepare", "--btcv", str(tmp_path), "--lits", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no BTCV cases found" in capsys.readouterr().err


def test_prepare_lists_a_share_of_the_test_patients_as_unlabelled(sources, tmp_path):
    """``--unlabelled-fraction``: a share of the LiTS/MSD test patients leaves ``test`` for ``unlabelled``, with an
    image and a liver mask and no lesion label; without it the datalist is what it was."""
    from monai_ad.data.datalists import load_unlabelled

    common = ["--quiet", "prepare", "--btcv", sources / "btcv", "--lits", sources / "lits", "--msd", sources / "msd", "--seed", "3", "--no-slices"]
    assert main([str(a) for a in [*common, "--out", tmp_path / "plain"]]) == 0
    assert main([str(a) for a in [*common, "--out", tmp_path / "mixed", "--unlabelled-fraction", "0.5"]]) == 0
    plain = json.loads((tmp_path / "plain" / "datalist.json").read_text())
    mixed = json.loads((tmp_path / "mixed" / "datalist.json").read_text())
    assert "unlabelled" not in plain
    for section in ("training", "validation", "validation_labelled"):
        assert [c["case_id"] for c in mixed[section]] == [c["case_id"] for c in plain[section]], section
    unlabelled, test = mixed["unlabelled"], mixed["test"]
    assert len(unlabelled) == round(0.5 * len(plain["test"])) and len(unlabelled) + len(test) == len(plain["test"])
    assert {c["case_id"] for c in unlabelled} | {c["case_id"] for c in test} == {c["case_id"] for c in plain["test"]}
    assert not {c["case_id"] for c in unlabelled} & {c["case_id"] for c in test}  # no scored patient is trained on
    for item in unlabelled:
        assert set(item) == {"case_id", "image", "roi"}
        assert set(np.unique(np.asarray(nib.load(item["roi"]).dataobj))) == {0, 1}
    assert [i["image"] for i in load_unlabelled(tmp_path / "mixed" / "datalist.json")] == [i["image"] for i in unlabelled]
    assert load_unlabelled(tmp_path / "plain" / "datalist.json") == []


def test_prepare_refuses_an_unlabelled_fraction_out_of_range(sources, tmp_path, capsys):
    args = ["--quiet", "prepare", "--btcv", sources / "btcv", "--lits", sources / "lits", "--out", tmp_path / "o", "--unlabelled-fraction", "1"]
    assert main([str(a) for a in args]) == 2
    assert "the unlabelled fraction must be at least 0 and below 1, got 1.0" in capsys.readouterr().err
