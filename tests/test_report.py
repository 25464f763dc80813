import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.figure import Figure

from monai_ad import report
from monai_ad.report import MontageItem, ScoreCurve, radiological, render_report, select_most_abnormal


def _items(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.45 * size) ** 2
    liver = body & (xx < size / 2) & (yy > size / 3)
    items = []
    for i in range(n):
        gt = (xx - 20 - i) ** 2 + (yy - 35) ** 2 < 16
        heat = np.where(liver, rng.random((size, size)) + 2.0 * gt, 0.0).astype(np.float32)
        image = np.where(body, 0.4 + 0.1 * rng.random((size, size)), 0.0)
        title = f"case_{i}  z={i}  score {heat.max():.2f}"
        items.append(MontageItem(image=image, heatmap=heat, gt=gt, pred=heat > 1.5, title=title))
    return items


def _curves(rng):
    labels = np.r_[0, 0, (np.arange(20) % 5 == 0).astype(int), 0]
    scores = np.r_[np.nan, np.nan, rng.random(20) + labels[2:-1], np.nan]
    return [ScoreCurve("case_a", scores, labels), ScoreCurve("case_b", rng.random(12), None)]


def test_renders_a_png_and_leaves_no_partial_files(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3 == 0
    path = render_report(
        tmp_path / "report.png", _items(6), _curves(rng), (labels, rng.random(30) + labels), 0.8, title="synthetic"
    )
    assert path == tmp_path / "report.png"
    picture = mpimg.imread(str(path))
    assert picture.shape[1] == 1600 and 800 < picture.shape[0] < 2500
    assert picture[..., :3].std() > 0.05  # not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


@pytest.mark.parametrize(
    "montage, with_curves, roc",
    [
        ([], True, None),  # nothing to show in the montage
        ("items", False, None),  # no curves
        ("items", True, (np.zeros(10), np.arange(10.0))),  # one class only
        ("no_outlines", True, (np.arange(10) % 2, np.r_[np.nan, np.arange(9.0)])),  # NaN scores dropped
        ([], False, None),  # nothing at all
    ],
)
def test_renders_with_missing_parts(tmp_path, montage, with_curves, roc):
    rng = np.random.default_rng(1)
    items = _items(3)
    if montage == "items":
        montage = items
    elif montage == "no_outlines":
        montage = [MontageItem(i.image, i.heatmap, None, None, i.title) for i in items]
    curves = [ScoreCurve(c.name, c.scores, None) for c in _curves(rng)] if with_curves else []
    path = render_report(tmp_path / "r.png", montage, curves, roc, None)
    assert mpimg.imread(str(path)).shape[1] == 1600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]


def test_a_failure_leaves_no_file(tmp_path, monkeypatch):
    items = _items(2)
    bad = MontageItem(items[0].image, items[0].heatmap[:10], None, None, "wrong shape")
    with pytest.raises(ValueError, match="shape"):
        render_report(tmp_path / "bad.png", [bad], [], None, None)

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        render_report(tmp_path / "broken.png", items, [], None, None)
    assert list(tmp_path.iterdir()) == []


def test_radiological_orientation():
    ras = np.zeros((4, 3))  # axes (x → patient's right, y → anterior)
    ras[3, 2] = 1  # the patient's rightmost, most anterior pixel
    shown = radiological(ras)
    assert shown.shape == (3, 4) and shown[0, 0] == 1  # top-left: anterior, on the viewer's left
    lps = np.zeros((4, 3))  # x → patient's left, y → posterior
    lps[0, 0] = 1
    assert radiological(lps, ("L", "P"))[0, 0] == 1
    yx = np.zeros((3, 4))  # axes swapped: (anterior, right)
    yx[2, 3] = 1
    assert radiological(yx, ("A", "R"))[0, 0] == 1
    with pytest.raises(ValueError, match="axcodes"):
        radiological(ras, ("R", "S"))


def test_select_most_abnormal():
    scores = [("a", 1, 0.9), ("a", 2, 0.95), ("a", 10, 0.5), ("b", 4, 0.7), ("b", 5, float("nan"))]
    scores.append(("c", 0, 0.1, "payload"))
    assert [t[:2] for t in select_most_abnormal(scores, k=3)] == [("a", 2), ("a", 1), ("b", 4)]
    assert [t[:2] for t in select_most_abnormal(scores, k=3, min_gap=3)] == [("a", 2), ("b", 4), ("a", 10)]
    assert [t[:2] for t in select_most_abnormal(scores, k=10, max_per_case=1)] == [("a", 2), ("b", 4), ("c", 0)]
    assert select_most_abnormal(scores, k=10)[-1] == ("c", 0, 0.1, "payload")


def test_default_heat_range_ignores_the_unscored_background():
    item = _items(1)[0]
    lo, hi = report._default_heat_range([item])
    assert 0.0 < lo < hi == pytest.approx(float(item.heatmap.max()))
