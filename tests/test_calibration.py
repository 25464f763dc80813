"""Calibrated alarms: conformal p-values (uniform on normal data), operating points at a target false-alarm rate,
lesion diameters, and the warning on a scan unlike the model's normals."""

import json

import nibabel as nib
import numpy as np
import pytest

from monai_ad.calibration import (
    conformal_p_value,
    conformal_p_values,
    conformal_threshold,
    flagged_liver_warning,
    operating_point,
    profile_warnings,
    region_score,
)
from monai_ad.data.datalists import load_datalist, roi_source
from monai_ad.data.phantom import write_phantom_dataset
from monai_ad.errors import InputError
from monai_ad.postprocess import label_lesions, max_diameter_mm
from monai_ad.prediction import Predictor
from monai_ad.training import train


@pytest.mark.parametrize("n_calibration", [9, 19, 49])
def test_p_values_of_normal_scans_are_uniform(n_calibration):
    """Exchangeable normal scans: P(p <= a) lies in [a - 1/(n+1), a] for every a (up to sampling error)."""
    rng = np.random.default_rng(n_calibration)
    trials, rates = 4000, (0.1, 0.2, 0.5)
    p = np.empty(trials)
    for t in range(trials):
        calibration = rng.gamma(2.0, size=n_calibration)  # a skewed score distribution: no shape is assumed
        p[t] = conformal_p_value(float(rng.gamma(2.0)), calibration)
    for a in rates:
        if a * (n_calibration + 1) < 1:
            continue
        realised = float(np.mean(p <= a))
        tolerance = 3.0 * np.sqrt(a * (1 - a) / trials)
        assert a - 1.0 / (n_calibration + 1) - tolerance <= realised <= a + tolerance, (a, realised)
    assert p.min() == pytest.approx(1.0 / (n_calibration + 1))


def test_threshold_flags_exactly_the_scores_with_p_at_most_the_rate():
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=39)
    scores = np.concatenate([rng.normal(size=500), calibration])  # ties with the calibration maxima included
    for a in (0.025, 0.05, 0.1, 0.3):
        threshold = conformal_threshold(calibration, a)
        np.testing.assert_array_equal(scores >= threshold, conformal_p_values(scores, calibration) <= a)


def test_too_few_calibration_scans_for_a_rate_is_a_clear_error():
    with pytest.raises(InputError, match="needs at least 19 held-out normal scans.*calibrated on 5"):
        conformal_threshold([0.1, 0.2, 0.3, 0.4, 0.5], 0.05)
    with pytest.raises(InputError, match="between 0 and 1"):
        conformal_threshold([0.1], 1.5)


def test_region_score_is_the_highest_threshold_that_keeps_a_region():
    heat = np.zeros((40, 40, 10), dtype=np.float32)
    heat[5:10, 5:10, 2:4] = 3.0  # 50 mm³, peak 3
    heat[20:30, 20:30, 5:8] = 2.0  # 300 mm³, peak 2
    heat[35, 35, 5] = 9.0  # one voxel: smaller than any kept region
    roi = np.ones(heat.shape, dtype=bool)
    score = region_score(heat, np.eye(4), roi, min_volume_mm3=20, extent_threshold=1.0)
    assert score == 3.0
    for t in (2.5, 3.0, np.nextafter(3.0, 4)):
        kept = label_lesions(heat, np.eye(4), t, 20, roi, 1.0)[1]
        assert bool(kept) == (t <= score)
    assert region_score(heat, np.eye(4), roi, min_volume_mm3=100, extent_threshold=1.0) == 2.0
    nothing = region_score(heat, np.eye(4), roi, min_volume_mm3=1000, extent_threshold=1.0)
    assert nothing < 1.0 and np.isfinite(nothing) and not label_lesions(heat, np.eye(4), 1.0, 1000, roi, 1.0)[1]


def test_max_diameter_is_edge_to_edge_in_mm():
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    line = np.stack([np.arange(10), np.zeros(10), np.zeros(10)], axis=1)
    assert max_diameter_mm(line, affine) == pytest.approx(7.0)
    ball = np.argwhere(np.fromfunction(lambda x, y, z: ((x - 20) * 0.7) ** 2 + ((y - 20) * 0.7) ** 2 + ((z - 8) * 2.5) ** 2 <= 100, (41, 41, 17)))
    assert 19.0 <= max_diameter_mm(ball, affine) <= 22.5  # a 20 mm ball, voxelised: at most one 2.5 mm voxel more
    assert max_diameter_mm(np.zeros((1, 3)), affine) == pytest.approx(0.7)  # one voxel: its width


def test_label_lesions_reports_diameters():
    heat = np.zeros((30, 30, 10), dtype=np.float32)
    heat[5:15, 10:12, 4:6] = 1.0  # 10 × 2 × 2 voxels of 1 mm
    _, lesions = label_lesions(heat, np.eye(4), 0.5, min_volume_mm3=1)
    assert len(lesions) == 1 and 10.0 <= lesions[0]["max_diameter_mm"] <= 10.5


NORMAL_PROFILE = {"liver_hu": 105.0, "liver_spread_hu": 12.0, "liver_ml": 1500.0, "liver_extent_mm": 160.0, "spacing_mm": [0.8, 0.8, 3.0]}


def test_profile_warnings_name_what_differs():
    normals = [NORMAL_PROFILE, {**NORMAL_PROFILE, "liver_hu": 112.0}]
    assert profile_warnings(NORMAL_PROFILE, normals) == []
    assert profile_warnings({**NORMAL_PROFILE, "liver_hu": 118.0}, normals) == []  # within the tolerance
    non_contrast = profile_warnings({**NORMAL_PROFILE, "liver_hu": 55.0}, normals)
    assert len(non_contrast) == 1 and "55 HU" in non_contrast[0] and "contrast phase" in non_contrast[0]
    thin = profile_warnings({**NORMAL_PROFILE, "spacing_mm": [0.8, 0.8, 1.0]}, normals)
    assert len(thin) == 1 and "slice spacing" in thin[0]
    partial = profile_warnings({**NORMAL_PROFILE, "liver_extent_mm": 40.0}, normals)
    assert len(partial) == 1 and "partial" in partial[0]
    noisy = profile_warnings({**NORMAL_PROFILE, "liver_spread_hu": 30.0}, normals)
    assert len(noisy) == 1 and "noise" in noisy[0]
    assert profile_warnings({**NORMAL_PROFILE, "liver_hu": 55.0}, []) == []  # a model without profiles: nothing


def test_flagged_liver_warning_only_when_most_of_the_liver_is_flagged():
    roi = np.ones((10, 10, 10), dtype=bool)
    label = np.zeros_like(roi, dtype=np.uint8)
    label[:4] = 1
    assert flagged_liver_warning(label, roi) is None
    label[:6] = 1
    assert "60% of the liver is flagged" in flagged_liver_warning(label, roi)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The density detector fitted on phantom normals and conformally calibrated on 5 held-out normal scans."""
    work = tmp_path_factory.mktemp("calibrated")
    datalist = write_phantom_dataset(work / "data", n_normal=10, n_abnormal=2, n_validation=5, n_test_normal=2,
                                     preset="tiny", progress=False)  # fmt: skip
    model = work / "density.pt"
    detector = train("density", datalist, model, device="cpu", progress=False)
    return {"datalist": datalist, "model": model, "detector": detector, "work": work}


def test_training_stores_scan_level_calibration_and_profiles(calibrated):
    thresholds = calibrated["detector"].thresholds
    assert thresholds["conformal"]["n_scans"] == 5
    assert len(thresholds["conformal"]["study"]) == len(thresholds["conformal"]["region"]) == 5
    assert len(thresholds["normal_profiles"]) == 8  # 3 fitted on + 5 calibrated on
    assert all(60 < p["liver_hu"] < 160 for p in thresholds["normal_profiles"])


def test_summaries_carry_study_slice_and_region_p_values(calibrated, tmp_path):
    predictor = Predictor(calibrated["model"], device="cpu")
    summaries = {}
    for item in load_datalist(calibrated["datalist"], "test"):
        summaries[item["abnormal"]] = summaries.get(item["abnormal"], []) + [predictor(item["image"], roi_source(item)).summary]
    for summary in summaries[False] + summaries[True]:
        assert summary["study_score"] == max(s for s in summary["slice_scores"] if s is not None)
        assert summary["p_value"] == conformal_p_value(summary["study_score"], calibrated["detector"].thresholds["conformal"]["study"])
        assert len(summary["slice_p_values"]) == len(summary["slice_scores"])
        assert all(0 < lesion["p_value"] <= 1 and lesion["max_diameter_mm"] > 0 for lesion in summary["lesions"])
        assert summary["warnings"] == []  # the phantoms are alike
        assert summary["calibration"]["conformal_scans"] == 5 and "conformal" not in summary["calibration"]
        region = calibrated["detector"].thresholds["conformal"]["region"]
        assert [lesion["p_value"] for lesion in summary["lesions"]] == [conformal_p_value(lesion["peak_score"], region) for lesion in summary["lesions"]]
        assert {round(p * 6, 9) for p in summary["slice_p_values"] if p is not None} <= {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}


def test_false_alarm_rate_sets_the_conformal_operating_point(calibrated):
    conformal = calibrated["detector"].thresholds["conformal"]
    predictor = Predictor(calibrated["model"], device="cpu", false_alarm_rate=0.34)
    expected = operating_point(conformal, 0.34)
    assert (predictor.slice_threshold, predictor.pixel_threshold) == (expected["slice"], expected["pixel"])
    # k = floor(0.34 * 6) - 1 = 1: above the second-highest calibration maximum
    assert expected["slice"] == pytest.approx(np.sort(conformal["study"])[-2])
    item = next(i for i in load_datalist(calibrated["datalist"], "test") if i["abnormal"])
    summary = predictor(item["image"], roi_source(item)).summary
    assert summary["operating_point"]["false_alarm_rate"] == 0.34 and "at most 0.34" in summary["operating_point"]["guarantee"]
    with pytest.raises(InputError, match="needs at least 19 held-out normal scans"):
        Predictor(calibrated["model"], device="cpu", false_alarm_rate=0.05)
    with pytest.raises(InputError, match="not both"):
        Predictor(calibrated["model"], device="cpu", false_alarm_rate=0.34, pixel_threshold=1.0)


def test_a_scan_in_another_contrast_phase_gets_a_warning(calibrated, tmp_path):
    item = next(i for i in load_datalist(calibrated["datalist"], "test") if not i["abnormal"])
    image = nib.load(item["image"])
    roi = np.asarray(nib.load(roi_source(item)).dataobj) > 0
    volume = np.asarray(image.dataobj).astype(np.float32)
    volume[roi] -= 55.0  # the liver as a non-contrast scan reads it
    shifted = tmp_path / "non_contrast.nii.gz"
    nib.save(nib.Nifti1Image(volume, image.affine), shifted)
    summary = Predictor(calibrated["model"], device="cpu")(shifted, roi_source(item), output_dir=tmp_path).summary
    assert any("contrast phase" in w for w in summary["warnings"]), summary["warnings"]
    assert json.loads((tmp_path / f"{summary['case']}_summary.json").read_text())["warnings"] == summary["warnings"]


def test_infer_command_takes_a_false_alarm_rate(calibrated, tmp_path):
    import subprocess
    import sys

    item = next(i for i in load_datalist(calibrated["datalist"], "test") if i["abnormal"])
    command = [sys.executable, "-m", "monai_ad", "--device", "cpu", "infer", "--quiet", "--model", str(calibrated["model"]),
               "--image", str(item["image"]), "--roi", str(roi_source(item)), "--out", str(tmp_path / "out")]  # fmt: skip
    ran = subprocess.run([*command, "--false-alarm-rate", "0.34"], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "against 5 normal scans" in ran.stdout
    summary = json.loads(next((tmp_path / "out").glob("*_summary.json")).read_text())
    assert summary["operating_point"]["false_alarm_rate"] == 0.34
    assert summary["thresholds"]["pixel"] == summary["operating_point"]["pixel"]
    refused = subprocess.run([*command, "--false-alarm-rate", "0.01"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "needs at least 99 held-out normal scans" in refused.stderr
