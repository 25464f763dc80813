import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from monai_ad import metrics
from monai_ad.metrics import UndefinedMetricError


def test_slice_auroc_hand_computed():
    assert metrics.slice_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.slice_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # 3 positives, 3 negatives, one positive (0.5) below one negative (0.6): 8 of 9 pairs ordered
    assert metrics.slice_auroc([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.7, 0.9]) == pytest.approx(8 / 9)
    assert metrics.slice_auroc(torch.tensor([0, 1]), torch.tensor([0.2, 0.1])) == 0.0
    with pytest.raises(UndefinedMetricError, match="both normal and abnormal"):
        metrics.slice_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.slice_auroc([0, 1], [0.1, np.nan])


def test_slice_auprc_hand_computed():
    # ranking pos, neg, pos: recall steps of 1/2 at precision 1/1 and 2/3 → AP = 0.5 * 1 + 0.5 * 2/3
    assert metrics.slice_auprc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert metrics.slice_auprc([0, 1, 1], [0.1, 0.8, 0.9]) == pytest.approx(1.0)
    with pytest.raises(UndefinedMetricError):
        metrics.slice_auprc([0, 0], [0.1, 0.2])


def test_pixel_auroc_with_and_without_roi():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 0] = 1.0
    maps[0, 3, 3] = 2.0  # a false alarm outside the ROI
    roi = np.ones_like(masks)
    roi[0, 3, 3] = False
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(14 / 15)  # one of 15 negatives above the positive
    assert metrics.pixel_auroc(masks, maps, roi) == 1.0
    assert metrics.pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps), torch.from_numpy(roi)) == 1.0
    with pytest.raises(UndefinedMetricError, match="inside the ROI"):
        metrics.pixel_auroc(masks, maps, masks)


def test_pixel_auroc_agrees_with_sklearn_including_ties_and_lists():
    rng = np.random.default_rng(0)
    m = rng.random((3, 10, 12)) > 0.8
    s = rng.random((3, 10, 12))
    assert metrics.pixel_auroc(m, s) == pytest.approx(roc_auc_score(m.ravel(), s.ravel()), abs=1e-12)
    coarse = np.round(s * 4).astype(np.float32)  # many ties
    assert metrics.pixel_auroc(m, coarse) == pytest.approx(roc_auc_score(m.ravel(), coarse.ravel()), abs=1e-12)
    roi = rng.random(m.shape) > 0.3
    assert metrics.pixel_auroc(m, s, roi) == pytest.approx(roc_auc_score(m[roi], s[roi]), abs=1e-12)
    # cases with different in-plane sizes as lists of stacks
    m2, s2 = rng.random((2, 7, 5)) > 0.7, rng.random((2, 7, 5))
    expected = roc_auc_score(np.r_[m.ravel(), m2.ravel()], np.r_[s.ravel(), s2.ravel()])
    assert metrics.pixel_auroc([m, m2], [s, s2]) == pytest.approx(expected, abs=1e-12)


def test_aupro_perfect_inverted_and_half():
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 10:13, 10:13] = True
    assert metrics.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert metrics.aupro(masks, (~masks).astype(np.float32)) == pytest.approx(0.0)
    # one region above all background, the other below all of it: mean overlap 0.5 over the whole range
    maps = np.full(masks.shape, 0.5, np.float32)
    maps[0, 2:5, 2:5] = 1.0
    maps[1, 10:13, 10:13] = 0.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_hand_computed_with_interpolation_at_the_limit():
    # one region of 2 pixels (0.9, 0.5); 10 background pixels: one at 1.0, nine at 0.1.
    # mean overlap: 0 up to FPR 0.1 (the bright background pixel), then 1 → area to 0.3 = 0.2, / 0.3 = 2/3
    masks = np.zeros((1, 3, 4), bool)
    masks[0, 0, :2] = True
    maps = np.full((1, 3, 4), 0.1, np.float32)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 2, 3] = 0.9, 0.5, 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(2 / 3)
    # regions are weighted equally, not by size: a 1-pixel region detected, a 9-pixel region missed → 0.5
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 0, 0] = True
    masks[0, 5:8, 5:8] = True
    maps = np.where(masks, 0.0, 0.5).astype(np.float32)
    maps[0, 0, 0] = 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.5)
    # ties between lesion and background scores give a diagonal segment: overlap = FPR on [0, 1] → 0.3 / 2
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    assert metrics.aupro(masks, np.ones((1, 4, 4), np.float32)) == pytest.approx(0.15)


def test_aupro_within_the_roi():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 0, 0] = 1.0
    maps[0, 3, 3] = 2.0  # a false alarm outside the ROI: overlap 0 until FPR 1/15
    roi = np.ones_like(masks)
    roi[0, 3, 3] = False
    assert metrics.aupro(masks, maps) == pytest.approx((0.3 - 1 / 15) / 0.3)
    assert metrics.aupro(masks, maps, roi=roi) == pytest.approx(1.0)
    out = metrics.evaluate_scores([1], [1.0], masks, maps, roi)
    assert out["aupro"] == pytest.approx(7 / 9) and out["aupro_roi"] == pytest.approx(1.0)


def _reference_aupro(masks, maps, limit, grid_points=200_001):
    """Per-region sklearn ROC, resampled on a fine common FPR grid, averaged, cut, integrated."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, n = ndimage.label(masks, structure=structure)
    background = ~masks
    grid = np.linspace(0, limit, grid_points)
    mean = np.zeros_like(grid)
    for region in range(1, n + 1):
        keep = background | (labels == region)
        fpr, tpr, _ = roc_curve((labels == region)[keep], maps[keep], drop_intermediate=False)
        mean += np.interp(grid, fpr, tpr)
    return np.trapz(mean / n, grid) / limit


def test_aupro_matches_a_per_region_reference_on_random_maps():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 24, 24), bool)
    for i in range(4):
        for _ in range(3):
            r, c, h, w = rng.integers(0, 18), rng.integers(0, 18), rng.integers(1, 6), rng.integers(1, 6)
            masks[i, r : r + h, c : c + w] = True
    maps = (rng.random(masks.shape) + 0.8 * masks).astype(np.float32)
    maps = np.round(maps * 20) / 20  # ties
    for limit in (0.05, 0.3, 1.0):
        expected = _reference_aupro(masks, maps, limit)
        assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=2e-4)
    fpr, pro = metrics.pro_curve(masks, maps, fpr_limit=0.3)
    assert fpr[0] == 0 and fpr[-1] == pytest.approx(0.3) and np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_regions_are_8_connected_per_slice_and_unique_over_the_stack():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
    masks[1, 1, 1] = True  # same place, next slice: another region
    labels, n = metrics.label_regions(masks)
    assert n == 2 and labels[0, 1, 1] == labels[0, 2, 2] != labels[1, 1, 1]
    out = metrics.evaluate_scores([1, 1], [0.9, 0.8], masks, masks.astype(np.float32))
    assert out["n_regions"] == 2


def test_dice_and_segmentation_scores_of_known_overlaps():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, :2, :2] = True  # 4 voxels
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, :2, :1] = 1.0  # 2 true positives
    maps[0, 3, 3] = 1.0  # 1 false positive
    seg = metrics.segmentation_scores(gt, maps, threshold=0.5)
    assert seg["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert seg["precision"] == pytest.approx(2 / 3) and seg["recall"] == pytest.approx(0.5)
    roi = np.ones_like(gt)
    roi[0, 3, 3] = False  # the false positive lies outside the ROI
    assert metrics.segmentation_scores(gt, maps, 0.5, roi)["precision"] == 1.0
    assert metrics.dice(maps >= 0.5, gt) == pytest.approx(4 / 7)
    assert metrics.dice(gt, gt) == 1.0 and metrics.dice(~gt, gt) == 0.0
    assert np.isnan(metrics.dice(np.zeros(3, bool), np.zeros(3, bool)))


def test_slice_f1_precision_recall():
    labels, scores = [1, 0, 1, 0], [0.9, 0.8, 0.1, 0.0]  # at 0.5: one TP, one FP, one FN
    assert metrics.slice_f1(labels, scores, threshold=0.5) == pytest.approx(0.5)
    got = metrics.slice_scores_at(labels, scores, 0.5)
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(0.5)
    assert metrics.slice_f1([0, 1], [0.5, 0.5], threshold=0.5) == pytest.approx(2 / 3)  # score == threshold is abnormal


def test_evaluate_scores_is_complete_and_json_serialisable():
    rng = np.random.default_rng(2)
    masks = np.zeros((6, 16, 16), bool)
    masks[2, 4:8, 4:8] = masks[3, 5:9, 5:9] = True
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    roi = np.zeros_like(masks)
    roi[:, 2:14, 2:14] = True
    labels = masks.reshape(6, -1).any(1).astype(int)
    scores = maps.reshape(6, -1).max(1)
    out = metrics.evaluate_scores(labels, scores, masks, maps, roi, pixel_threshold=1.0, slice_threshold=1.5)
    for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auroc_roi", "aupro", "dice", "slice_f1"):
        assert isinstance(out[key], float) and 0.0 <= out[key] <= 1.0, key
    assert out["n_slices"] == 6 and out["n_abnormal_slices"] == 2 and out["n_regions"] == 2
    assert out["notes"] == {}
    json.dumps(out, allow_nan=False)
    seg = metrics.segmentation_scores(masks, maps, 1.0, roi)
    at = metrics.slice_scores_at(labels, scores, 1.5)
    assert (out["dice"], out["pixel_precision"], out["pixel_recall"]) == (seg["dice"], seg["precision"], seg["recall"])
    assert (out["slice_f1"], out["slice_precision"], out["slice_recall"]) == (at["f1"], at["precision"], at["recall"])
    assert out["aupro"] == metrics.aupro(masks, maps) and out["aupro_roi"] == metrics.aupro(masks, maps, roi=roi)
    assert out["pixel_auroc_roi"] == metrics.pixel_auroc(masks, maps, roi)


def test_evaluate_scores_reports_what_cannot_be_computed():
    masks = np.zeros((2, 4, 4), bool)
    maps = np.zeros((2, 4, 4))
    out = metrics.evaluate_scores([0, 0], [0.1, 0.2], masks, maps, masks, pixel_threshold=0.5, slice_threshold=0.5)
    for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auroc_roi", "aupro", "dice", "slice_f1"):
        assert out[key] is None and key in out["notes"], key
    assert out["n_regions"] == 0 and out["n_abnormal_slices"] == 0
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate_scores([0, 1], [0.1, 0.2], masks, np.zeros((2, 4, 5)))


# ----------------------------------------------------------------------------- lesion level
def _two_lesion_case():
    """A 20×20×10 volume: lesion A (3×3×3 voxels at 2 mm: 216 mm³), lesion B (one voxel), a liver ROI."""
    lesion = np.zeros((20, 20, 10), np.uint8)
    lesion[2:5, 2:5, 2:5] = 1  # A
    lesion[15, 15, 7] = 1  # B
    roi = np.zeros(lesion.shape, bool)
    roi[:, :, 1:9] = True
    heat = np.zeros(lesion.shape, np.float32)
    heat[3, 3, 3] = 0.9  # a peak inside A
    heat[15, 15, 7] = 0.4  # B's only voxel
    heat[10:12, 10:12, 4] = 0.7  # a false region of 4 voxels
    heat[10, 2, 0] = 5.0  # a bright voxel outside the ROI: never a region
    return heat, lesion, roi


def test_lesion_components_are_3d_with_equivalent_diameters():
    lesion = np.zeros((8, 8, 8), bool)
    lesion[1:3, 1:3, 1:3] = True
    lesion[3, 3, 3] = True  # touches the block only at a corner: the same 26-connected lesion
    lesion[6, 6, 6] = True
    labels, n, diameters = metrics.lesion_components(lesion, spacing=(1.0, 2.0, 3.0))
    assert n == 2 and labels.max() == 2
    np.testing.assert_allclose(diameters, np.cbrt(6 * np.array([9 * 6.0, 6.0]) / np.pi))


def test_detect_lesions_counts_found_lesions_and_false_regions():
    heat, lesion, roi = _two_lesion_case()
    out = metrics.detect_lesions(heat, lesion, 0.5, roi=roi, spacing=(2.0, 2.0, 2.0))
    assert out["found"].tolist() == [True, False]
    assert (out["n_lesions"], out["n_found"], out["n_regions"], out["n_false_regions"]) == (2, 1, 2, 1)
    out = metrics.detect_lesions(heat, lesion, 0.3, roi=roi)
    assert out["found"].tolist() == [True, True] and out["n_false_regions"] == 1
    # without the ROI the bright voxel outside it is one more false region
    assert metrics.detect_lesions(heat, lesion, 0.3)["n_false_regions"] == 2
    # a region below the size limit is dropped: the 4-voxel false region (32 mm³ at 2 mm) and B's voxel go
    out = metrics.detect_lesions(heat, lesion, 0.3, roi=roi, spacing=(2.0, 2.0, 2.0), min_region_mm3=40.0)
    assert out["n_regions"] == 0 and out["n_found"] == 0
    # one region over the whole ROI overlaps both lesions: it finds only the one it overlaps most (A), and with
    # a minimum overlap fraction it is a false region instead
    flat = np.ones(lesion.shape, np.float32)
    out = metrics.detect_lesions(flat, lesion, 0.5, roi=roi)
    assert out["found"].tolist() == [True, False] and out["n_false_regions"] == 0
    out = metrics.detect_lesions(flat, lesion, 0.5, roi=roi, min_region_overlap=0.05)
    assert out["n_found"] == 0 and out["n_false_regions"] == 1


def test_lesion_froc_hand_computed():
    heat, lesion, roi = _two_lesion_case()
    normal = np.zeros(lesion.shape, np.float32)
    normal[5:7, 5:7, 5] = 0.6  # a normal scan with one false region above 0.5
    normal_roi = roi.copy()
    out = metrics.lesion_froc([heat, normal], [lesion, np.zeros_like(lesion)], [roi, normal_roi],
                              spacings=[(2.0, 2.0, 2.0)] * 2, max_fp_per_scan=0.5, min_diameter_mm=5.0)  # fmt: skip
    # thresholds: above everything (0 regions), 0.9 (A found, no false region), 0.4 (both found, false regions:
    # the 0.7 one and the normal scan's 0.6 one → 2 over 2 scans)
    points = [(p["threshold"], p["fp_per_scan"], p["sensitivity"], p["sensitivity_large"]) for p in out["curve"]]
    assert points[1:] == [(pytest.approx(0.9), 0.0, 0.5, 1.0), (pytest.approx(0.4), 1.0, 1.0, 1.0)]
    assert points[0][1:] == (0.0, 0.0, 0.0) and points[0][0] > 5.0
    assert out["n_lesions"] == 2 and out["n_lesions_large"] == 1  # A: 7.4 mm equivalent diameter, B: 2.5 mm
    assert out["sensitivity"] == 0.5 and out["threshold"] == pytest.approx(0.9)
    assert out["sensitivity_large"] == 1.0
    out = metrics.lesion_froc([heat, normal], [lesion, np.zeros_like(lesion)], [roi, normal_roi], max_fp_per_scan=1.0)
    assert out["sensitivity"] == 1.0 and out["threshold"] == pytest.approx(0.4)
    # no lesion ≥ 10 voxels across: that sensitivity is undefined, not 0
    assert out["sensitivity_large"] is None and out["n_lesions_large"] == 0
    # a lesion entirely outside the ROI can never be found
    out = metrics.lesion_froc([heat], [lesion], [np.zeros_like(roi)])
    assert out["sensitivity"] == 0.0 and len(out["curve"]) == 1
    with pytest.raises(ValueError, match="one lesion mask per heatmap"):
        metrics.lesion_froc([heat], [])


def test_lesion_froc_by_size_hand_computed():
    heat, lesion, roi = _two_lesion_case()
    assert metrics.size_bin_names() == ["<5 mm", "5-10 mm", "10-20 mm", ">=20 mm"]
    out = metrics.lesion_froc([heat], [lesion], [roi], spacings=[(2.0, 2.0, 2.0)], max_fp_per_scan=0.0)
    # A (7.4 mm) is found at 0.9 with no false region; B (2.5 mm) only at 0.4, where the 0.7 region is false
    assert out["n_lesions_by_size"] == {"<5 mm": 1, "5-10 mm": 1, "10-20 mm": 0, ">=20 mm": 0}
    assert out["sensitivity_by_size"] == {"<5 mm": 0.0, "5-10 mm": 1.0, "10-20 mm": None, ">=20 mm": None}
    assert [p["sensitivity_by_size"]["<5 mm"] for p in out["curve"]] == [0.0, 0.0, 1.0]
    out = metrics.lesion_froc([heat], [lesion], [roi], spacings=[(2.0, 2.0, 2.0)], max_fp_per_scan=1.0, size_bins_mm=(2.0,))
    assert out["sensitivity_by_size"] == {"<2 mm": None, ">=2 mm": 1.0}
    with pytest.raises(ValueError, match="increasing positive"):
        metrics.lesion_froc([heat], [lesion], [roi], size_bins_mm=(10.0, 5.0))


def test_lesion_coverage_hand_computed():
    lesion = np.zeros((10, 10, 10), np.uint8)
    lesion[1:4, 1:4, 1:4] = 1  # 27 voxels at 1 mm: 3.7 mm equivalent diameter
    lesion[6:9, 6:9, 6] = 1  # 9 voxels, 2.6 mm
    roi = np.zeros(lesion.shape, bool)
    roi[:, :, 1:8] = True
    heat = np.zeros(lesion.shape, np.float32)
    normal = roi & (lesion == 0)
    ramp = np.linspace(0.0, 1.0, int(normal.sum()), dtype=np.float32)
    heat[normal] = ramp
    heat[1:4, 1:4, 1:4] = 2.0
    heat[1, 1:4, 1:4] = 0.0  # a third of the first lesion stays below any threshold
    heat[6, 6:9, 6] = 2.0  # a third of the second one is above
    heat[0, 0, 0] = 9.0  # outside the ROI: neither sets the threshold nor counts
    out = metrics.lesion_coverage([heat], [lesion], [roi], spacings=[(1.0, 1.0, 1.0)], fpr=0.05)
    assert out["threshold"] == pytest.approx(np.quantile(ramp, 0.95))
    assert [c for _, c in out["lesions"]] == pytest.approx([2 / 3, 1 / 3])
    assert out["coverage"] == pytest.approx(0.5) and out["detected"] == 0.5 and out["n_lesions"] == 2
    assert out["coverage_by_size"] == {"<5 mm": pytest.approx(0.5), "5-10 mm": None, "10-20 mm": None, ">=20 mm": None}
    assert out["detected_by_size"]["<5 mm"] == 0.5 and out["n_lesions_by_size"]["<5 mm"] == 2
    # a stricter reading: neither lesion is three quarters covered
    assert metrics.lesion_coverage([heat], [lesion], [roi], min_coverage=0.75)["detected"] == 0.0
    # a scan without lesions only adds normal voxels; its own bright liver raises the threshold
    bright = np.where(roi, 5.0, 0.0).astype(np.float32)
    two = metrics.lesion_coverage([heat, bright], [lesion, np.zeros_like(lesion)], [roi, roi], fpr=0.05)
    assert two["threshold"] == 5.0 and two["coverage"] == 0.0
    with pytest.raises(ValueError, match="fpr"):
        metrics.lesion_coverage([heat], [lesion], [roi], fpr=0.0)
    with pytest.raises(UndefinedMetricError, match="no normal voxel"):
        metrics.lesion_coverage([heat], [lesion], [lesion > 0])


def test_lesion_froc_sweeps_where_a_lesion_first_makes_a_region_large_enough():
    # at 1 mm³ voxels a region needs 8 voxels to count: at its own peak (one voxel) the lesion is not found yet
    lesion = np.zeros((12, 12, 12), bool)
    lesion[2:5, 2:5, 2:5] = True
    heat = np.zeros(lesion.shape, np.float32)
    heat[lesion] = 0.8
    heat[3, 3, 3] = 0.9
    heat[8:11, 8:11, 8:11] = 0.85  # a false region between the lesion's peak and the rest of it
    out = metrics.lesion_froc([heat], [lesion], spacings=[(1.0, 1.0, 1.0)], min_region_mm3=8.0, max_fp_per_scan=1.0)
    points = [(p["threshold"], p["fp_per_scan"], p["sensitivity"]) for p in out["curve"][1:]]
    # 0.9: the peak alone, too small; 0.8 (the lesion's 8th highest voxel): found, with the one false region
    assert points == [(pytest.approx(0.9), 0.0, 0.0), (pytest.approx(0.8), 1.0, 1.0)]
    assert out["sensitivity"] == 1.0 and out["threshold"] == pytest.approx(0.8)
    # with no size limit the peak is where it is found
    out = metrics.lesion_froc([heat], [lesion], spacings=[(1.0, 1.0, 1.0)], max_fp_per_scan=0.0)
    assert out["sensitivity"] == 1.0 and out["threshold"] == pytest.approx(0.9)
