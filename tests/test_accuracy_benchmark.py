"""The accuracy benchmark's own parts: the evaluation-only lesion generator and the lesion-level counting."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lesion_insertion as li  # noqa: E402

from monai_ad import metrics  # noqa: E402

SPACING = (1.5, 1.5, 3.0)


def _scan():
    """A 'liver' ellipsoid of 60 HU with noise in fat, at 1.5 × 1.5 × 3 mm, with a non-zero origin."""
    shape = (120, 100, 40)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-90.0, -75.0, -60.0)
    rng = np.random.default_rng(1)
    x, y, z = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, SPACING)], indexing="ij")
    liver = (x / 80) ** 2 + (y / 65) ** 2 + (z / 55) ** 2 <= 1
    image = np.where(liver, 60.0, -100.0) + rng.normal(0, 8, shape)
    return image.astype(np.float32), liver, affine


def _lesion(center_voxel, diameter, contrast, margin="sharp", rim_hu=0.0):
    return li.Lesion(
        center_voxel=tuple(float(c) for c in center_voxel), center_mm=(0.0, 0.0, 0.0), diameter_mm=diameter,
        axes=(1.0, 1.0, 1.0), rotation=tuple(np.eye(3).ravel()), contrast_hu=contrast, margin=margin,
        margin_mm=5.0 if margin == "soft" else 1.5, rim_hu=rim_hu, rim_mm=3.0 if rim_hu else 0.0,
    )  # fmt: skip


def test_inserted_lesions_have_the_requested_contrast_and_size_inside_the_liver():
    image, liver, affine = _scan()
    lesions = [_lesion((45, 50, 20), 30.0, -60.0), _lesion((80, 50, 20), 20.0, 40.0, "soft"),
               _lesion((60, 30, 12), 12.0, -30.0), _lesion((60, 70, 26), 25.0, -50.0, rim_hu=50.0)]  # fmt: skip
    out, label = li.insert_lesions(image, liver, affine, lesions, np.random.default_rng(0))
    assert set(np.unique(label)) == {0, 1, 2}
    assert not (label[~liver]).any() and ((label == 1) | (label == 2))[liver].all()
    np.testing.assert_array_equal(out[~liver], image[~liver])  # nothing changes outside the liver
    labels, n, diameters = metrics.lesion_components(label == 2, SPACING)
    assert n == 4
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"), -1) * np.asarray(SPACING)
    for lesion in lesions:
        centre = np.asarray(lesion.center_voxel) * np.asarray(SPACING)
        distance = np.linalg.norm(grid - centre, axis=-1)
        core = distance <= lesion.diameter_mm / 2 - (6.0 if lesion.rim_hu else 3.0)
        # the core's mean HU is the liver's plus the requested contrast (the scan's noise is kept)
        assert out[core].mean() - 60.0 == pytest.approx(lesion.contrast_hu, abs=6.0)
        assert out[core].std() < 15.0
        # the labelled lesion is the requested size (equivalent diameter, mm)
        component = labels[tuple(np.round(lesion.center_voxel).astype(int))]
        assert component > 0
        assert diameters[component - 1] == pytest.approx(lesion.diameter_mm, rel=0.12)
        assert lesion.measured_diameter_mm == pytest.approx(diameters[component - 1], rel=1e-6)
    # the rim lesion's ring is brighter than the liver, its centre darker
    rim = lesions[3]
    centre = np.asarray(rim.center_voxel) * np.asarray(SPACING)
    distance = np.linalg.norm(grid - centre, axis=-1)
    ring = (distance > rim.diameter_mm / 2 - 2.5) & (distance < rim.diameter_mm / 2 - 0.5) & liver
    assert out[ring].mean() > 60.0 + 15.0
    # a soft margin is a gradual transition: intermediate values just outside the nominal surface
    soft = lesions[1]
    distance = np.linalg.norm(grid - np.asarray(soft.center_voxel) * np.asarray(SPACING), axis=-1)
    shell = (distance > soft.diameter_mm / 2 + 0.5) & (distance < soft.diameter_mm / 2 + 2.0)
    assert 60.0 + 3.0 < out[shell].mean() < 60.0 + 30.0


def test_sampled_lesions_stay_in_the_liver_within_the_ranges_and_apart():
    image, liver, affine = _scan()
    rng = np.random.default_rng(3)
    lesions = li.sample_lesions(liver, affine, rng, 6)
    assert 3 <= len(lesions) <= 6
    for a in lesions:
        assert liver[tuple(np.round(a.center_voxel).astype(int))]
        assert 5.0 * 0.8 <= a.diameter_mm <= 80.0
        assert -80.0 <= a.contrast_hu <= 60.0 and abs(a.contrast_hu) >= 15.0
        assert a.margin in ("sharp", "soft") and (a.rim_hu == 0 or a.contrast_hu < 0)
        assert a.center_mm == pytest.approx(tuple((affine @ np.r_[a.center_voxel, 1.0])[:3]))
        for b in lesions:
            if a is not b:
                gap = np.linalg.norm((np.asarray(a.center_voxel) - b.center_voxel) * np.asarray(SPACING))
                assert gap >= (a.diameter_mm + b.diameter_mm) / 2
    out, label = li.insert_lesions(image, liver, affine, lesions, rng)
    assert not (label[~liver]).any() and (label == 2).any()
    # the same seed gives the same lesions
    again = li.sample_lesions(liver, affine, np.random.default_rng(3), 6)
    assert [x.diameter_mm for x in again] == [x.diameter_mm for x in lesions]


def test_metastatic_burden_is_many_mostly_small_lesions_inside_the_liver():
    image, liver, affine = _scan()
    seen_small, seen_kinds, burdens = [], set(), []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        lesions = li.sample_metastases(image, liver, affine, rng)
        assert 8 <= len(lesions) <= 80  # 10-80 drawn; a lesion with no room left is dropped
        out, label = li.insert_lesions(image, liver, affine, lesions, rng, reference_normal=True)
        assert not label[~liver].any() and (label[liver] > 0).all()
        np.testing.assert_array_equal(out[~liver], image[~liver])
        labels, n, diameters = metrics.lesion_components(label == 2, SPACING)
        burdens.append((label == 2).sum() / liver.sum())
        seen_small.append(np.mean([l.diameter_mm < 10.0 for l in lesions]))
        seen_kinds |= {l.kind for l in lesions}
        assert all(3.0 * 0.85 <= l.diameter_mm <= 80.0 for l in lesions)
        # hypodense mostly: the lesions' mean density lies below the liver's
        assert out[label == 2].mean() < image[liver].mean() - 10.0
    assert all(0.005 < b <= 0.35 for b in burdens)
    assert np.mean(seen_small) >= 0.5 and seen_kinds >= {"uniform", "rim", "target"}
    # its parameters are its own: a changed model changes the draw, the same seed repeats it
    again = li.sample_metastases(image, liver, affine, np.random.default_rng(0))
    first = li.sample_metastases(image, liver, affine, np.random.default_rng(0))
    assert [l.diameter_mm for l in again] == [l.diameter_mm for l in first]
    few = li.MetastaticModel(n_lesions=(10, 10), burden=(0.01, 0.01))
    assert len(li.sample_metastases(image, liver, affine, np.random.default_rng(0), few)) <= 10


def test_a_necrotic_core_is_darker_than_the_lesion_around_it():
    image, liver, affine = _scan()
    lesion = li.Lesion(**{**li.asdict(_lesion((60, 50, 20), 30.0, -40.0)), "core_hu": -30.0, "core_fraction": 0.5,
                          "kind": "necrotic"})  # fmt: skip
    out, label = li.insert_lesions(image, liver, affine, [lesion], np.random.default_rng(0))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"), -1) * np.asarray(SPACING)
    distance = np.linalg.norm(grid - np.asarray(lesion.center_voxel) * np.asarray(SPACING), axis=-1)
    core, shell = distance < 5.0, (distance > 9.0) & (distance < 12.0)
    assert out[core].mean() - 60.0 == pytest.approx(-70.0, abs=8.0)
    assert out[shell].mean() - 60.0 == pytest.approx(-40.0, abs=8.0)


def test_organ_map_on_another_grid_is_refused(tmp_path):
    image, liver, affine = _scan()
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    organs = liver.astype(np.uint8) * 5
    nib.save(nib.Nifti1Image(organs, affine), str(tmp_path / "organs.nii.gz"))
    shifted = affine.copy()
    shifted[0, 3] += 10.0
    nib.save(nib.Nifti1Image(organs, shifted), str(tmp_path / "shifted.nii.gz"))
    img, mask, aff = li.load_scan(tmp_path / "ct.nii.gz", tmp_path / "organs.nii.gz", 5)
    np.testing.assert_array_equal(mask, liver)
    np.testing.assert_allclose(aff, affine, atol=1e-6)
    with pytest.raises(ValueError, match="is not the image's"):
        li.load_scan(tmp_path / "ct.nii.gz", tmp_path / "shifted.nii.gz", 5)


def test_froc_counts_found_lesions_and_false_regions_on_inserted_lesions():
    image, liver, affine = _scan()
    lesions = [_lesion((45, 50, 20), 30.0, -60.0), _lesion((80, 50, 20), 8.0, 40.0)]
    _, label = li.insert_lesions(image, liver, affine, lesions, np.random.default_rng(0))
    lesion = label == 2
    heat = np.zeros(lesion.shape, np.float32)
    heat[lesion] = 0.5
    labels, _, diameters = metrics.lesion_components(lesion, SPACING)
    large = labels == 1 + int(np.argmax(diameters))
    heat[large] = 0.9  # the 30 mm lesion scores higher than the 8 mm one
    heat[60:64, 80:84, 30:32] = 0.7  # a false region inside the liver
    heat[2:6, 2:6, 2:4] = 1.0  # outside the liver: never counted
    normal = np.zeros(lesion.shape, np.float32)
    normal[60:63, 40:43, 10:12] = 0.6  # the normal scan's false region
    out = metrics.lesion_froc([heat, normal], [lesion, np.zeros_like(lesion)], [liver, liver], [SPACING] * 2)
    points = [(p["fp_per_scan"], p["sensitivity"], p["sensitivity_large"]) for p in out["curve"]]
    # at 0.9 the large lesion alone; at 0.5 both, with the 0.7 and 0.6 false regions: 2 over 2 scans
    assert points == [(0.0, 0.0, 0.0), (0.0, 0.5, 1.0), (1.0, 1.0, 1.0)]
    assert (out["n_lesions"], out["n_lesions_large"]) == (2, 1)
    assert out["sensitivity"] == 1.0 and out["sensitivity_large"] == 1.0
    strict = metrics.lesion_froc([heat, normal], [lesion, np.zeros_like(lesion)], [liver, liver], [SPACING] * 2,
                                 max_fp_per_scan=0.5)  # fmt: skip
    assert strict["sensitivity"] == 0.5 and strict["threshold"] == pytest.approx(0.9)
    at = metrics.detect_lesions(heat, lesion, 0.65, roi=liver, spacing=SPACING)
    assert (at["n_found"], at["n_false_regions"], at["n_regions"]) == (1, 1, 2)


def test_calibration_quantile_allows_the_stated_false_alarms_per_scan():
    import accuracy

    assert accuracy.calibration_quantile(1.0, 40) == pytest.approx(1 - 1 / 40)
    assert accuracy.calibration_quantile(1.0, 1) == 0.5  # never below the median
    scores = np.random.default_rng(0).random(40 * 5)  # 5 normal scans of 40 slices
    q = accuracy.calibration_quantile(1.0, 40)
    assert np.count_nonzero(scores > np.quantile(scores, q)) / 5 == pytest.approx(1.0, abs=0.2)


def test_a_training_config_replaces_its_detectors_schedule(tmp_path):
    import accuracy

    from monai_ad.errors import InputError

    gpu = Path(__file__).resolve().parents[1] / "sample_configs" / "synthetic_anomaly_gpu.json"
    schedules = accuracy.config_schedules([str(gpu)])
    hparams, preprocessing = schedules["synthetic_anomaly"]
    assert list(schedules) == ["synthetic_anomaly"] and hparams["steps"] == 20000 and preprocessing == {"pixel_mm": 0.8}
    nameless = tmp_path / "nameless.json"
    nameless.write_text('{"hparams": {"steps": 5}}')
    with pytest.raises(InputError, match="names no detector"):
        accuracy.config_schedules([str(nameless)])


def test_error_review_ranks_slices_and_names_each_lesion_as_drawn():
    import error_review

    image, liver, affine = _scan()
    lesions = [_lesion((45, 50, 20), 30.0, -60.0), _lesion((80, 50, 12), 12.0, 40.0, "soft")]
    painted, label = li.insert_lesions(image, liver, affine, lesions, np.random.default_rng(0))
    # the heatmap's crop as accuracy.run_fold keeps it: the liver's box, axial axis (here the last) first
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(liver))
    crop = lambda a: np.moveaxis(a[box], 2, 0)  # noqa: E731
    heat = crop(np.where(label == 2, 5.0, 0.0)).astype(np.float32)
    lesion, liver_c = crop(label == 2), crop(liver)
    normal_z = int(np.nonzero(~lesion.any(axis=(1, 2)) & liver_c.any(axis=(1, 2)))[0][len(lesion) // 2])
    heat[normal_z][liver_c[normal_z]] = 1.0
    y, x = np.argwhere(liver_c[normal_z])[len(np.argwhere(liver_c[normal_z])) // 2]
    heat[normal_z, y, x] = 9.0  # one normal slice outscores every lesion slice
    case = {"case_id": "scan", "box": box, "axis": 2, "affine": affine, "heat": heat, "lesion": lesion,
            "liver": liver_c, "spacing": (SPACING[2], SPACING[0], SPACING[1]),
            "lesions_drawn": [{"center_mm": (affine @ np.r_[l.center_voxel, 1.0])[:3].tolist(),
                               "contrast_hu": l.contrast_hu, "margin": l.margin} for l in lesions]}  # fmt: skip
    depth = error_review.in_plane_depth(liver_c, (SPACING[2], SPACING[0], SPACING[1]))
    normal, abnormal = error_review.slice_rows([case], [crop(painted)], [depth])
    top, below = normal[:1], error_review.below_top(normal, abnormal, top=1)
    assert [(r["slice"], r["slice score"]) for r in top] == [(box[2].start + normal_z, 9.0)]
    assert top[0]["depth of the maximum (mm)"] == pytest.approx(depth[normal_z, y, x])
    assert len(below) == len(abnormal) > 0 and all(r["score in the lesion"] == 5.0 for r in below)
    by_visibility = error_review.auroc_by_visibility(normal, abnormal)  # each lesion slice: below one normal slice
    assert by_visibility[0] == {"lesion slices": "all", "count": len(abnormal), "slice AUROC": pytest.approx(1 - 1 / len(normal)),
                                error_review.CEILING: None}  # fmt: skip
    assert [r["count"] for r in by_visibility[1:]] == [0, 0, 0]  # no d′ measured here: no slice is counted as visible
    rows, false_regions = error_review.lesion_rows([case], threshold=4.0)
    assert sorted((round(r["diameter (mm)"]), r["contrast (HU)"], r["found"]) for r in rows) == [
        (12, 40.0, "yes"), (30, -60.0, "yes")]  # fmt: skip
    assert false_regions == []  # the 9.0 pixel is below the smallest region the label map keeps
    rows, false_regions = error_review.lesion_rows([case], threshold=0.5)
    assert len(false_regions) == 1 and false_regions[0]["peak score"] == 9.0


def test_visibility_ceiling_ranks_only_the_visible_lesion_slices_first():
    import error_review

    normal = [{"slice score": s} for s in (1.0, 2.0, 3.0, 4.0)]
    abnormal = [{"slice score": 0.0, "d′": 5.0}, {"slice score": 2.0, "d′": 1.0}]  # outscore 0 and 1.5 of 4 normals
    rows = {r["lesion slices"]: r for r in error_review.auroc_by_visibility(normal, abnormal)}
    assert rows["all"]["slice AUROC"] == pytest.approx((0 + 1.5 / 4) / 2)
    assert rows["d′ ≥ 3"]["count"] == 1 and rows["d′ ≥ 3"]["slice AUROC"] == pytest.approx(0.0)
    # the visible slice ranked first, the faint one left where it is
    assert rows["d′ ≥ 3"][error_review.CEILING] == pytest.approx((1 + 1.5 / 4) / 2)
    assert rows["d′ ≥ 5"][error_review.CEILING] == pytest.approx((1 + 1.5 / 4) / 2)


def test_visibility_is_high_for_a_clear_lesion_and_low_for_an_invisible_one():
    import visibility

    image, liver, affine = _scan()  # 8 HU white noise in the liver
    lesions = [_lesion((45, 50, 20), 20.0, -40.0), _lesion((80, 50, 12), 20.0, 2.0)]
    painted, label = li.insert_lesions(image, liver, affine, lesions, np.random.default_rng(0))
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(liver))
    crop = lambda a: np.moveaxis(a[box], 2, 0)  # noqa: E731
    case = {"lesion": crop(label == 2), "liver": crop(liver), "spacing": (SPACING[2], SPACING[0], SPACING[1])}
    seen = visibility.slice_visibility([case], [crop(painted)])
    z_clear, z_faint = 20 - box[2].start, 12 - box[2].start
    # a 20 mm disc is about 140 pixels: its mean has a spread of under 1 HU, so 40 HU is far past it
    assert seen[(0, z_clear)]["d′"] > 10 and seen[(0, z_clear)]["contrast (HU)"] < -30
    assert seen[(0, z_faint)]["d′"] < 5
    rim = _lesion((45, 50, 20), 24.0, -40.0, rim_hu=80.0)  # the rim's brightness cancels the core's darkness
    painted, label = li.insert_lesions(image, liver, affine, [rim], np.random.default_rng(0))
    case["lesion"] = crop(label == 2)
    assert visibility.slice_visibility([case], [crop(painted)])[(0, z_clear)]["d′"] > 10  # read in the core
