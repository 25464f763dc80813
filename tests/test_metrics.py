import matplotlib.image as mpimg
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from monai_ad import metrics
from monai_ad.report import MontageItem, ScoreCurve, render_report


def test_slice_auroc_hand_computed():
    assert metrics.slice_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.slice_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # 3 positives, 3 negatives, one positive below one negative: 8 of 9 pairs ordered
    assert metrics.slice_auroc([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.7, 0.9]) == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match="both normal and abnormal"):
        metrics.slice_auroc([1, 1], [0.1, 0.2])


def test_slice_auprc_hand_computed():
    # ranking: pos, neg, pos → precision at the two recall steps 1/1 and 2/3 → AP = 0.5·1 + 0.5·(2/3)
    assert metrics.slice_auprc([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_pixel_auroc_with_and_without_roi():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    maps[0, 3, 3] = 2.0  # a false alarm outside the ROI
    roi = np.ones_like(masks)
    roi[0, 3, 3] = False
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(14 / 15)  # one of 15 negatives above the positive
    assert metrics.pixel_auroc(masks, maps, roi) == 1.0
    rng = np.random.default_rng(0)
    m, s = rng.random((3, 10, 10)) > 0.8, rng.random((3, 10, 10))
    assert metrics.pixel_auroc(m, s) == pytest.approx(roc_auc_score(m.ravel(), s.ravel()))


def test_aupro_perfect_and_half():
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 10:13, 10:13] = True
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    # one region scored above all background, the other below all of it → mean overlap 0.5 over the whole range
    maps = np.full(masks.shape, 0.5)
    maps[0, 2:5, 2:5] = 1.0
    maps[1, 10:13, 10:13] = 0.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.5, abs=1e-3)


def test_aupro_counts_8_connected_regions_per_slice():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
    out = metrics.evaluate_scores([0, 1], [0.1, 0.9], masks, masks.astype(float))
    assert out["n_regions"] == 1


def test_segmentation_scores_and_slice_f1():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, :2, :2] = True  # 4 voxels
    maps = np.zeros((1, 4, 4))
    maps[0, :2, :1] = 1.0  # 2 true positives
    maps[0, 3, 3] = 1.0  # 1 false positive
    seg = metrics.segmentation_scores(gt, maps, threshold=0.5)
    assert seg["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert seg["precision"] == pytest.approx(2 / 3) and seg["recall"] == pytest.approx(0.5)
    assert metrics.slice_f1([1, 0, 1, 0], [0.9, 0.8, 0.1, 0.0], threshold=0.5) == pytest.approx(2 * 1 / (2 + 1 + 1))


def test_evaluate_scores_reports_what_cannot_be_computed():
    masks = np.zeros((2, 4, 4), bool)
    out = metrics.evaluate_scores([0, 0], [0.1, 0.2], masks, np.zeros((2, 4, 4)), pixel_threshold=0.5, slice_threshold=0.5)
    assert out["slice_auroc"] is None and "slice_auroc" in out["notes"]
    assert out["aupro"] is None and out["n_regions"] == 0


def test_report_renders_and_leaves_nothing_on_failure(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        img = rng.random((64, 64))
        gt = np.zeros((64, 64), bool)
        gt[20:30, 20:30] = True
        items.append(MontageItem(image=img, heatmap=rng.random((64, 64)) + 2 * gt, gt=gt, pred=gt, title=f"case z={i}"))
    curves = [ScoreCurve("a", np.r_[np.nan, rng.random(10)], np.r_[0, np.arange(10) % 2]), ScoreCurve("b", rng.random(5), None)]
    path = render_report(tmp_path / "report.png", items, curves, (np.arange(10) % 2, rng.random(10)), 0.5, title="test")
    picture = mpimg.imread(str(path))
    assert picture.shape[0] > 500 and picture.shape[1] > 1000
    assert render_report(tmp_path / "empty.png", [], [], None, None).exists()
    assert not list(tmp_path.glob("*.partial*"))
    with pytest.raises(Exception):
        render_report(tmp_path / "broken.png", items, curves, (np.array([0, 1]), np.array([0.1])), 0.5)
    assert not (tmp_path / "broken.png").exists() and not list(tmp_path.glob("*.partial*"))
