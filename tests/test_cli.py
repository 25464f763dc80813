"""The CLI end to end on tiny phantoms, and its answers to bad input."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import check_metrics_against_written_volumes
from monai_ad.cli import main

TINY_PATCHCORE = ["--set", "image_size=64", "--set", "coreset_ratio=0.2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["--quiet", "phantom", "--out", str(root / "data"), "--normal", "4", "--abnormal", "2", "--preset", "tiny"]) == 0
    datalist = root / "data" / "datalist.json"
    model = root / "patchcore.pt"
    assert main(["--quiet", "train", "--datalist", str(datalist), "--detector", "patchcore", "--out", str(model), *TINY_PATCHCORE]) == 0
    return {"root": root, "datalist": datalist, "model": model, "content": json.loads(datalist.read_text())}


def run_cli(*args):
    """Run ``python -m monai_ad`` as a user would; returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "monai_ad", "--quiet", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_train_writes_a_loadable_model_with_thresholds(workspace):
    payload = torch.load(workspace["model"], weights_only=True)
    assert payload["detector"] == "patchcore"
    assert payload["thresholds"]["pixel"] > 0 and payload["thresholds"]["n_slices"] > 0
    assert payload["preprocessing"]["image_size"] == 64


def test_infer_writes_heatmap_label_map_and_summary_in_input_geometry(workspace, tmp_path):
    case = next(c for c in workspace["content"]["test"] if c["abnormal"])
    image = workspace["datalist"].parent / case["image"]
    label = workspace["datalist"].parent / case["label"]
    code, out, err = run_cli("infer", "--model", workspace["model"], "--image", image, "--roi", label, "--out", tmp_path)
    assert code == 0, err
    name = image.name.replace(".nii.gz", "")
    src = nib.load(str(image))
    heat = nib.load(str(tmp_path / f"{name}_heatmap.nii.gz"))
    lab = nib.load(str(tmp_path / f"{name}_anomaly-label.nii.gz"))
    assert heat.shape == src.shape and lab.shape == src.shape
    assert np.allclose(heat.affine, src.affine, atol=1e-4) and np.allclose(lab.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1}
    summary = json.loads((tmp_path / f"{name}_summary.json").read_text())
    assert len(summary["slice_scores"]) == src.shape[2]
    assert all(isinstance(i, int) for i in summary["abnormal_slices"])
    heat_data = np.asarray(heat.dataobj)
    liver = np.asarray(nib.load(str(label)).dataobj) > 0
    assert heat_data[~liver].max() <= heat_data[liver].min() + 1e-6  # outside the ROI: the lowest score
    assert not list(tmp_path.glob("*.partial*"))


def test_evaluate_writes_metrics_and_report(workspace, tmp_path):
    code, out, err = run_cli("evaluate", "--model", workspace["model"], "--datalist", workspace["datalist"], "--out", tmp_path)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auroc_roi", "aupro", "dice", "slice_f1"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key
    with open(tmp_path / "metrics.csv") as f:
        rows = {row["metric"]: row["value"] for row in csv.DictReader(f)}
    assert float(rows["aupro"]) == pytest.approx(metrics["aupro"], rel=1e-9)
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # the figures again, independently, from the heatmaps and summaries it wrote
    check_metrics_against_written_volumes(metrics, rows, tmp_path, workspace["datalist"].parent, workspace["content"]["test"])


# ----------------------------------------------------------------------------- bad input
def _case(workspace):
    case = workspace["content"]["test"][0]
    base = workspace["datalist"].parent
    return base / case["image"], base / case["label"]


def _bad_input(workspace, tmp_path, image, roi, match, model=None):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("infer", "--model", model or workspace["model"], "--image", image, "--roi", roi, "--out", out)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert match in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    return lines[0]


def test_bad_input_unreadable_and_truncated(workspace, tmp_path):
    image, label = _case(workspace)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image")
    line = _bad_input(workspace, tmp_path, junk, label, "cannot be read")
    assert str(junk) in line
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    _bad_input(workspace, tmp_path, truncated, label, str(truncated))


def test_bad_input_2d_and_4d(workspace, tmp_path):
    image, label = _case(workspace)
    img = nib.load(str(image))
    two_d = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 3], img.affine), str(two_d))
    _bad_input(workspace, tmp_path, two_d, label, "2-D")
    four_d = tmp_path / "series.nii.gz"
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), img.affine), str(four_d))
    _bad_input(workspace, tmp_path, four_d, label, "channels/time points")


def test_bad_input_mask_mismatch_and_empty_roi(workspace, tmp_path):
    image, label = _case(workspace)
    lab = nib.load(str(label))
    data = np.asarray(lab.dataobj)
    small = tmp_path / "small_mask.nii.gz"
    nib.save(nib.Nifti1Image(data[:-4], lab.affine), str(small))
    _bad_input(workspace, tmp_path, image, small, "does not match image shape")
    moved = tmp_path / "moved_mask.nii.gz"
    affine = lab.affine.copy()
    affine[:3, 3] += 25.0
    nib.save(nib.Nifti1Image(data, affine), str(moved))
    _bad_input(workspace, tmp_path, image, moved, "geometry")
    empty = tmp_path / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros_like(data), lab.affine), str(empty))
    _bad_input(workspace, tmp_path, image, empty, "ROI is empty")


def test_bad_input_nan_and_not_hu(workspace, tmp_path):
    image, label = _case(workspace)
    img = nib.load(str(image))
    data = np.asarray(img.dataobj).astype(np.float32)
    nan = tmp_path / "nan.nii.gz"
    bad = data.copy()
    bad[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(bad, img.affine), str(nan))
    _bad_input(workspace, tmp_path, nan, label, "NaN")
    scaled = tmp_path / "scaled.nii.gz"
    nib.save(nib.Nifti1Image((data - data.min()) / (data.max() - data.min()), img.affine), str(scaled))
    _bad_input(workspace, tmp_path, scaled, label, "do not look like CT")


def test_bad_input_models(workspace, tmp_path):
    image, label = _case(workspace)
    _bad_input(workspace, tmp_path, image, label, "model file not found", model=tmp_path / "none.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(workspace["model"].read_bytes()[:1000])
    _bad_input(workspace, tmp_path, image, label, "not a readable monai_ad model", model=truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    _bad_input(workspace, tmp_path, image, label, "not a monai_ad model file", model=other)


def test_missing_roi_is_refused_clearly(workspace, tmp_path):
    image, _ = _case(workspace)
    code, _, stderr = run_cli("infer", "--model", workspace["model"], "--image", image, "--out", tmp_path / "o")
    assert code == 2 and "no liver mask given" in stderr and len(stderr.strip().splitlines()) == 1


def test_infer_a_folder_with_masks_named_as_the_images(workspace, tmp_path):
    base = workspace["datalist"].parent
    code, out, err = run_cli("infer", "--model", workspace["model"], "--image", base / "imagesTr", "--roi", base / "labelsTr", "--out", tmp_path)
    assert code == 0, err
    n_images = len(list((base / "imagesTr").glob("*.nii.gz")))
    assert len(list(tmp_path.glob("*_summary.json"))) == n_images == len(list(tmp_path.glob("*_anomaly-label.nii.gz")))


def test_infer_real_dicom_series_with_an_organ_segmentation(workspace, real_ct, tmp_path):
    from monai_ad.transforms.pipeline import LoadVolumed

    code, out, err = run_cli(
        "infer", "--model", workspace["model"], "--image", real_ct / "example_ct_dicom",
        "--roi", real_ct / "example_seg_dicom.nii.gz", "--roi-label", "5", "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, err
    heat = nib.load(str(tmp_path / "example_ct_dicom_heatmap.nii.gz"))
    source = LoadVolumed(["image"])({"image": str(real_ct / "example_ct_dicom")})["image"]
    assert heat.shape == tuple(source.shape[1:]) == (512, 512, 20)
    assert np.allclose(heat.affine, np.asarray(source.affine), atol=1e-3)
    summary = json.loads((tmp_path / "example_ct_dicom_summary.json").read_text())
    assert len(summary["slice_scores"]) == 20 and sum(s is not None for s in summary["slice_scores"]) > 5


def test_benchmark_over_seeds_reports_bmad_table(workspace, tmp_path):
    code, out, err = run_cli("benchmark", "--datalist", workspace["datalist"], "--detector", "patchcore", "--seeds", "0", "1", "--out", tmp_path, *TINY_PATCHCORE)
    assert code == 0, err
    summary = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [0, 1]
    assert summary["pixel_auroc"]["n"] == 2 and summary["pixel_auroc"]["std"] >= 0
    assert "| image AUROC | pixel AUROC | PRO |" in (tmp_path / "benchmark.md").read_text()


SAMPLE_CONFIGS = sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "sample_configs").glob("*.json"))


@pytest.mark.parametrize("path", SAMPLE_CONFIGS, ids=lambda p: p.name)
def test_a_sample_config_is_valid_and_states_only_what_differs_from_its_schedule(path):
    """A run config names a schedule and states only what differs from it, so no default lives in two places."""
    from monai_ad.cli.options import check_detector_options
    from monai_ad.detectors.base import settings_repeating_schedule
    from monai_ad.run_config import load_run_config
    from monai_ad.transforms.pipeline import PreprocessConfig
    from monai_ad.detectors.base import detector_class

    config = load_run_config(str(path))
    hparams, preprocessing = config.get("hparams", {}), config.get("preprocessing", {})
    check_detector_options(config["detector"], hparams, preprocessing)
    assert config["description"].strip() and config["schedule"]
    assert settings_repeating_schedule(config["detector"], config["schedule"], hparams) == []
    library = PreprocessConfig.with_defaults(detector_class(config["detector"]).default_preprocessing, {}).to_dict()
    assert [k for k, v in preprocessing.items() if library.get(k) == (list(v) if isinstance(v, tuple) else v)] == []


def test_a_run_config_schedule_is_applied_under_its_hparams_and_a_bad_one_is_refused(tmp_path):
    import argparse

    from monai_ad.cli.options import detector_settings
    from monai_ad.detectors.base import detector_class
    from monai_ad.errors import InputError

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"detector": "rd4ad", "schedule": "cpu", "hparams": {"batch_size": 4}}))
    args = argparse.Namespace(config=str(config), schedule=None, set=["lr=0.001"], preprocess=None)
    detector, hparams, _ = detector_settings(args, "intensity")
    assert detector == "rd4ad" and hparams == {**detector_class("rd4ad").schedule("cpu"), "batch_size": 4, "lr": 0.001}
    args.schedule = "quick"  # the command line's schedule wins over the config's
    assert detector_settings(args, "intensity")[1]["epochs"] == detector_class("rd4ad").schedule("quick")["epochs"]
    config.write_text(json.dumps({"detector": "rd4ad", "schedule": "fast"}))
    with pytest.raises(InputError, match="schedule must be one of paper, cpu, quick, got 'fast'"):
        detector_settings(argparse.Namespace(config=str(config), schedule=None, set=None, preprocess=None), "intensity")
