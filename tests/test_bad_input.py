"""Inputs that used to give silently wrong answers or raw exceptions: a bad-input corpus (generated here from a
tiny phantom) refused with one line and no output through the CLI and through a bundle; options checked before
any work; the plausibility checks accept real partial livers and every phantom preset."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_ad.cli import main
from monai_ad.data.phantom import make_phantom
from monai_ad.errors import InputError
from monai_ad.io import _host
from monai_ad.transforms.array import CheckLiverROI, CheckSingleOrgan, CheckVoxelSpacing
from monai_ad.transforms.pipeline import build_preprocessing, run_pipeline

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
TINY_PATCHCORE = ["--set", "image_size=64", "--set", "coreset_ratio=0.2"]


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``{name: (image, roi, expected words)}``: each case must be refused with a line holding those words."""
    root = tmp_path_factory.mktemp("bad_input")
    case = make_phantom(5, False, "tiny")
    image, label, affine = case.image.astype(np.int16), case.label, case.affine
    good_image = _save(root / "image.nii.gz", image, affine)
    good_label = _save(root / "label.nii.gz", label, affine)
    cases = {}

    organs = np.zeros_like(label)  # TotalSegmentator style: body 1, spleen 2, kidney 3, liver 5
    organs[image > -500] = 1
    organs[:10, 30:40, :] = 2
    organs[60:70, 30:40, :] = 3
    organs[label > 0] = 5
    cases["organ_map"] = (good_image, _save(root / "organs.nii.gz", organs, affine), ["organ map", "--roi-label"])
    body = (image > -500).astype(np.uint8)
    cases["body_mask"] = (good_image, _save(root / "body.nii.gz", body, affine), ["of the body", "--roi-label"])
    for name, scale in (("spacing_10mm", 10.0), ("spacing_0.1mm", 0.1)):
        scaled = affine.copy()
        scaled[:3, :3] = np.diag([scale] * 3)
        cases[name] = (
            _save(root / f"{name}.nii.gz", image, scaled), _save(root / f"{name}_label.nii.gz", label, scaled),
            ["voxel spacing", f"{scale:g} × {scale:g} × {scale:g} mm"],
        )  # fmt: skip
    speck = np.zeros_like(label)
    speck[40:42, 40:42, 10] = 1
    cases["speck_roi"] = (good_image, _save(root / "speck.nii.gz", speck, affine), ["smaller than a liver", "mL"])
    (root / "empty.nii.gz").write_bytes(b"")
    cases["empty_file"] = (str(root / "empty.nii.gz"), good_label, ["cannot be read as gzip-compressed NIfTI", "empty"])
    (root / "text.nii.gz").write_text("patient notes, not an image\n")
    cases["text_nii_gz"] = (str(root / "text.nii.gz"), good_label, ["gzip-compressed NIfTI", "not gzip-compressed"])
    (root / "text.nii").write_text("patient notes, not an image\n")
    cases["text_nii"] = (str(root / "text.nii"), good_label, ["cannot be read as NIfTI", "no NIfTI header"])
    return {"root": root, "cases": cases, "image": good_image, "label": good_label, "organs": cases["organ_map"][1]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_model")
    assert main(["--quiet", "phantom", "--out", str(root / "data"), "--normal", "3", "--abnormal", "1", "--preset", "tiny"]) == 0
    path = root / "patchcore.pt"
    args = ["--quiet", "train", "--datalist", str(root / "data" / "datalist.json"), "--detector", "patchcore", "--out", str(path)]
    assert main([*args, *TINY_PATCHCORE]) == 0
    return path


def _cli(capsys, *args) -> tuple[int, list[str]]:
    code = main(["--quiet", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


CASES = ["organ_map", "body_mask", "spacing_10mm", "spacing_0.1mm", "speck_roi", "empty_file", "text_nii_gz", "text_nii"]


@pytest.mark.parametrize("name", CASES)
def test_cli_refuses_each_case_with_one_line_and_no_output(name, corpus, model, tmp_path, capsys):
    image, roi, words = corpus["cases"][name]
    out = tmp_path / "out"
    code, lines = _cli(capsys, "infer", "--model", model, "--image", image, "--roi", roi, "--out", out)
    assert code == 2 and len(lines) == 1, lines
    assert all(w in lines[0] for w in words), lines[0]
    assert lines[0].startswith("error: /")  # names the file
    assert not out.exists() or not any(out.iterdir())


def test_organ_map_with_the_liver_label_is_read(corpus, model, tmp_path, capsys):
    code, lines = _cli(capsys, "infer", "--model", model, "--image", corpus["image"], "--roi", corpus["organs"], "--roi-label", "5", "--out", tmp_path)
    assert code == 0, lines
    assert len(list(tmp_path.glob("*_anomaly-label.nii.gz"))) == 1


def _bundle(tmp_path: Path, model: Path) -> Path:
    bundle = tmp_path / "patchcore_liver_ct"
    shutil.copytree(BUNDLES_DIR / "patchcore_liver_ct", bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
    (bundle / "models").mkdir()
    shutil.copy(model, bundle / "models" / "model.pt")
    return bundle


def _datalist(path: Path, image: str, roi: str) -> str:
    path.write_text(json.dumps({"test": [{"image": image, "roi": roi}]}))
    return str(path)


def _input_error(exc: BaseException) -> InputError | None:
    while exc is not None and not isinstance(exc, InputError):
        exc = exc.__cause__ or exc.__context__
    return exc


def test_bundle_refuses_each_case_with_its_one_line_error_and_no_output(corpus, model, tmp_path, monkeypatch):
    """MONAI's own bundle runner (``monai.bundle.run``, what ``python -m monai.bundle run`` calls), in this process."""
    from monai.bundle import run

    bundle = _bundle(tmp_path, model)
    monkeypatch.chdir(bundle)
    for name in CASES:
        image, roi, words = corpus["cases"][name]
        out = tmp_path / f"out_{name}"
        with pytest.raises(Exception) as info:
            run("inference", meta_file="configs/metadata.json", config_file="configs/inference.json",
                datalist=_datalist(tmp_path / f"{name}.json", image, roi), output_dir=str(out))  # fmt: skip
        error = _input_error(info.value)
        assert error is not None, f"{name}: {info.value!r}"
        assert "\n" not in str(error) and all(w in str(error) for w in words), f"{name}: {error}"
        assert not out.exists() or not any(out.iterdir()), name


def test_bundle_command_line_names_the_problem(corpus, model, tmp_path):
    bundle = _bundle(tmp_path, model)
    image, roi, _ = corpus["cases"]["organ_map"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--meta_file", "configs/metadata.json",
           "--config_file", "configs/inference.json", "--datalist", _datalist(tmp_path / "bad.json", image, roi),
           "--output_dir", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "organ map" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- options, before any work
def test_options_are_checked_before_any_work(corpus, tmp_path, capsys):
    datalist = tmp_path / "never_read.json"  # does not exist: an option error must come first
    afile = tmp_path / "afile"
    afile.write_text("x")
    train = ["train", "--datalist", datalist, "--detector", "patchcore", "--out", tmp_path / "m.pt"]
    cases = [
        ([*train, "--set", "foo=1"], "unknown hyper-parameter(s) foo"),
        ([*train, "--set", "image_size=0"], "image_size must be a whole number from 8 to 1024, got 0"),
        ([*train, "--set", "image_size=100000"], "image_size must be a whole number from 8 to 1024"),
        ([*train, "--set", "batch_size=0"], "batch_size must be a whole number from 1"),
        ([*train, "--preprocess", "window=foo"], "window must be [low, high] in HU"),
        ([*train, "--quantile", "2"], "--quantile must be between 0 and 1"),
        (["train", "--datalist", datalist, "--detector", "patchcore", "--out", tmp_path], "--out is a folder"),
        (["train", "--datalist", datalist, "--out", afile / "m.pt"], "is a file, not a folder"),
        (["infer", "--model", tmp_path / "m.pt", "--image", corpus["image"], "--roi", corpus["label"], "--out", afile], "--out is a file"),
        (["evaluate", "--model", tmp_path / "m.pt", "--datalist", datalist, "--out", afile / "sub"], "is a file, not a folder"),
        (["infer", "--model", tmp_path / "m.pt", "--image", corpus["image"], "--roi", corpus["label"], "--roi-label", "0", "--out", tmp_path / "o"], "--roi-label must be a positive"),
        (["infer", "--model", tmp_path / "m.pt", "--image", corpus["image"], "--roi", corpus["label"], "--min-lesion-mm3", "-1", "--out", tmp_path / "o"], "--min-lesion-mm3 must be at least 0"),
        (["demo", "--out", tmp_path / "demo", "--preset", "huge"], "--preset must be one of"),
        (["demo", "--out", tmp_path / "demo", "--detector", "patchcore", "--set", "batch_size=0"], "batch_size"),
        (["select", "--datalist", datalist, "--out", tmp_path / "sel", "--detector", "dpa", "--grid", "batch_size=4,0"], "batch_size"),
        (["benchmark", "--datalist", datalist, "--detector", "patchcore", "--out", tmp_path / "b", "--set", "num_neighbors=0"], "num_neighbors"),
    ]
    for args, words in cases:
        code, lines = _cli(capsys, *args)
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing was started, nothing written


# ----------------------------------------------------------------------------- partial files and permissions
def test_infer_removes_a_killed_runs_partial_files_and_follows_the_umask(corpus, model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".image_heatmap.{_host()}-{int(dead.stdout)}.0123abcd.partial.nii.gz"
    stale.write_bytes(b"")
    old = out / ".image_anomaly.k3j4h5.partial.nii.gz"  # an earlier version's name, an hour old
    old.write_bytes(b"")
    os.utime(old, (os.path.getmtime(old) - 7200,) * 2)
    previous = os.umask(0o022)
    try:
        code, lines = _cli(capsys, "infer", "--model", model, "--image", corpus["image"], "--roi", corpus["label"], "--out", out)
    finally:
        os.umask(previous)
    assert code == 0, lines
    assert not list(out.glob(".*partial*"))
    written = sorted(out.iterdir())
    # heatmap, label map, summary and picture
    assert len(written) == 4 and all(p.stat().st_mode & 0o777 == 0o644 for p in written), [(p.name, oct(p.stat().st_mode)) for p in written]


# ----------------------------------------------------------------------------- the checks accept what is real
def _passes(image, roi, labels=None) -> None:
    run_pipeline(build_preprocessing({"image_size": 32}, labels), {"image": str(image), "roi": str(roi)})


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("small", {}), ("full", {"extent_mm": (40.0, 40.0)})])
def test_phantom_presets_pass_the_checks(preset, overrides, tmp_path):
    for seed, abnormal in ((0, False), (1, True)):
        case = make_phantom(seed, abnormal, preset, **overrides)
        _passes(_save(tmp_path / "i.nii.gz", case.image, case.affine), _save(tmp_path / "l.nii.gz", case.label, case.affine))


def test_real_scans_pass_with_the_liver_label_and_are_refused_without(real_ct):
    _passes(real_ct / "example_ct.nii.gz", real_ct / "example_seg_fast_force_split.nii.gz", labels=5)  # liver top cut off
    _passes(real_ct / "example_ct_dicom", real_ct / "example_seg_dicom.nii.gz", labels=5)  # 20 slices, about 40 mm of liver
    with pytest.raises(InputError, match="organ map.*roi_label / --roi-label"):
        _passes(real_ct / "example_ct.nii.gz", real_ct / "example_seg_fast_force_split.nii.gz")


def test_array_checks_on_their_own():
    affine = torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0], dtype=torch.float64))
    roi = torch.zeros(1, 300, 300, 100, dtype=torch.uint8)
    roi[0, 50:250, 50:250, 10:90] = 1  # 200 × 200 × 80 voxels of 1.6 mm³: 5120 mL, 44 % of the body
    image = torch.full((1, 300, 300, 100), -1000.0)
    image[0, 20:290, 20:290] = 40.0
    assert CheckLiverROI()(MetaTensor(roi, affine=affine), MetaTensor(image, affine=affine)) is not None
    with pytest.raises(InputError, match="larger than a liver"):
        CheckLiverROI(max_ml=5000)(MetaTensor(roi, affine=affine))
    with pytest.raises(InputError, match="of the body"):
        CheckLiverROI(max_body_fraction=0.4)(MetaTensor(roi, affine=affine), MetaTensor(image, affine=affine))
    labels = roi.clone()
    labels[0, :10] = 2
    assert CheckSingleOrgan()(labels) is labels  # LiTS style: liver 1, lesion 2
    labels[0, -10:] = 3
    with pytest.raises(InputError, match="3 label values"):
        CheckSingleOrgan()(labels)
    assert CheckSingleOrgan(labels=[1])(labels) is labels  # the liver's label chosen: no guessing needed
    soft = roi.float() * 0.37  # a resampled soft mask is no label map
    soft[0, :5] = 0.9
    soft[0, -5:] = 0.2
    assert CheckSingleOrgan()(soft) is soft
    thick = torch.diag(torch.tensor([0.7, 0.7, 10.0, 1.0], dtype=torch.float64))  # 10 mm slices: an old scan, fine
    CheckVoxelSpacing()(MetaTensor(image, affine=thick))
    with pytest.raises(InputError, match="voxel spacing 10 × 10 × 10 mm"):
        CheckVoxelSpacing()(MetaTensor(image, affine=torch.diag(torch.tensor([10.0, 10.0, 10.0, 1.0], dtype=torch.float64))))
