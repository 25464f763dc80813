"""The intensity baseline, the CT-aware pipeline inputs and the false-alarm operating point."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from sklearn.metrics import roc_auc_score

from monai_ad.detectors import AnomalyDetector, create_detector
from monai_ad.detectors.fused import log_beyond
from monai_ad.detectors.intensity import MIN_TAIL_COUNT, exponential_beyond_sample, tail_probabilities
from monai_ad.errors import InputError
from monai_ad.transforms.array import AxialContext, FillOutsideROIWithLiver, HUWindows, NormalizeLiverSpread
from monai_ad.transforms.pipeline import PreprocessConfig, build_preprocessing, run_pipeline

from liver_slices import synthetic_slices
from test_lesion_ranking import fitted_detector

SIZE = 96


@pytest.fixture(scope="module")
def fitted():
    return fitted_detector("intensity")  # 24 textured normals at 96 px, 1.5 mm pixels (test_lesion_ranking.CASES)


def test_intensity_is_self_referenced_through_the_pipeline(fitted):
    """A uniform shift of the whole liver (another contrast phase) is removed by the pipeline's liver
    normalisation; a detector without that normalisation is centred on each slice's own median instead."""
    image, roi, _ = synthetic_slices(4, seed=3)
    shifted = torch.where(roi, image + 0.1, image)
    kept, fitted.preprocessing = fitted.preprocessing, {"normalize_liver_hu": None}
    try:
        assert torch.allclose(fitted.score(shifted, roi).pixel, fitted.score(image, roi).pixel, atol=1e-4)
    finally:
        fitted.preprocessing = kept


def test_intensity_saves_and_loads_whole(fitted, tmp_path):
    image, roi, _ = synthetic_slices(3, seed=4, lesion=True)
    fitted.save(tmp_path / "intensity.pt")
    loaded = AnomalyDetector.load(tmp_path / "intensity.pt")
    assert torch.equal(loaded.score(image, roi).pixel, fitted.score(image, roi).pixel)


def _as_saved_before_several_scales(payload: dict, prefix: str = "") -> None:
    """A saved model as the single-scale version wrote it: tables without the scale axis."""
    for name in ("centre", "tail_distance"):
        payload["state"][prefix + name] = payload["state"][prefix + name][0]


def test_a_model_saved_with_one_scale_before_there_were_several_still_loads(tmp_path):
    image, roi, _ = synthetic_slices(24, seed=0, size=SIZE)
    old = create_detector("intensity", image_size=SIZE, pixel_mm=1.5, sigma_mm=2.0, min_width_mm=6.0)
    old.fit([{"image": image, "roi": roi}], progress=False)
    old.save(tmp_path / "intensity.pt")
    payload = torch.load(tmp_path / "intensity.pt", weights_only=True)
    _as_saved_before_several_scales(payload)
    torch.save(payload, tmp_path / "old.pt")
    test, test_roi, _ = synthetic_slices(3, seed=4, lesion=True)
    assert torch.equal(AnomalyDetector.load(tmp_path / "old.pt").score(test, test_roi).pixel, old.score(test, test_roi).pixel)
    # a fused model's intensity settings were recorded as given: the single-scale defaults fill them in
    from test_lesion_ranking import fitted_detector

    fused = fitted_detector("fused")
    assert "sigma_mm" not in fused.hparams["intensity_hparams"]
    fused.save(tmp_path / "fused.pt")
    payload = torch.load(tmp_path / "fused.pt", weights_only=True)
    payload["state"]["density.centre"] = old.centre[0].clone()
    payload["state"]["density.tail_distance"] = old.tail_distance[0].clone()
    torch.save(payload, tmp_path / "old_fused.pt")
    loaded = AnomalyDetector.load(tmp_path / "old_fused.pt")
    assert loaded.density.scales == [2.0] and loaded.density.hparams["min_width_mm"] == 6.0
    assert torch.equal(loaded.density.score(test, test_roi).pixel, old.score(test, test_roi).pixel)
    # tables of another number of scales than the settings ask for are refused, not misread
    two = create_detector("intensity", image_size=SIZE, pixel_mm=1.5, sigma_mm=[1.0, 2.0])
    two.fit([{"image": image, "roi": roi}], progress=False)
    two.hparams["sigma_mm"], two.scales = [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="fitted at 2 scale"):
        two.score(test, test_roi)


def test_several_scales_read_a_small_lesion_at_the_small_one_and_keep_their_own_tables():
    image, roi, _ = synthetic_slices(24, seed=0, size=SIZE)
    single = create_detector("intensity", image_size=SIZE, pixel_mm=1.5, sigma_mm=3.0, min_width_mm=0)
    both = create_detector("intensity", image_size=SIZE, pixel_mm=1.5, sigma_mm=[0.75, 3.0], min_width_mm=0)
    for detector in (single, both):
        detector.fit([{"image": image, "roi": roi}], progress=False)
    assert both.centre.shape[0] == 2 and torch.equal(both.tail_distance[1], single.tail_distance[0])
    test, test_roi, _ = synthetic_slices(2, seed=5, size=SIZE)
    y, x = (int(v) for v in torch.nonzero(test_roi[0, 0]).float().mean(0))
    small = test.clone()
    small[:, :, y - 1 : y + 2, x - 1 : x + 2] -= 0.15  # a 4.5 mm dark lesion (60 HU in the abdominal window)
    lesion_single = single.score(small, test_roi).pixel[:, y, x]
    lesion_both = both.score(small, test_roi).pixel[:, y, x]
    # the pixel takes the rarer reading: never below the wide scale's, and the small scale lifts it further
    assert (lesion_both >= lesion_single - 1e-5).all() and (lesion_both > lesion_single + 0.5).all()


def test_tail_levels_a_small_sample_cannot_have_measured_continue_the_last_measured_decade():
    levels = tail_probabilities(1e-4)
    exponential = -torch.log10(levels)[None].repeat(2, 1)  # distance grows linearly in log10 of the tail
    n = 2000  # holds MIN_TAIL_COUNT values beyond 1.5e-3, not beyond 1e-4
    resolved = int((levels * n >= MIN_TAIL_COUNT).sum())
    assert 4 < resolved < len(levels)
    tied = exponential.clone()
    tied[:, resolved:] = tied[:, resolved - 1, None]  # the sample's maximum repeated: the cliff
    restored = exponential_beyond_sample(tied, levels, n)
    torch.testing.assert_close(restored, exponential)
    torch.testing.assert_close(exponential_beyond_sample(tied, levels, 10**6), tied)  # a large sample is left alone


def test_intensity_rejects_bad_hyper_parameters():
    for bad in ({"sigma_mm": 0}, {"sigma_mm": [1.0, -2.0]}, {"sigma_mm": []}, {"min_tail": 0.7}, {"depth_bands_mm": [4, 2]},
                {"in_channels": 2}, {"width_filter": "median"}, {"width_rank": 1.0}):
        with pytest.raises(InputError):
            create_detector("intensity", **bad)


def test_operating_point_gives_the_stated_false_alarm_rate_on_held_out_normals(fitted):
    """Thresholds for one false region per scan, picked on normal scans, flag about one slice per held-out
    normal scan (a false region spans at least one slice, so flagged slices bound false regions)."""
    scans = [synthetic_slices(30, seed=10 + i) for i in range(4)]
    calibration = [{"image": img, "roi": roi} for img, roi, _ in scans]
    fitted.calibrate(calibration, false_regions_per_scan=1.0, n_scans=4)
    assert fitted.thresholds["quantile"] == pytest.approx(1 - 4 / 120)
    held_out = [synthetic_slices(30, seed=20 + i) for i in range(6)]
    flagged = [int((fitted.score(img, roi).slice > fitted.thresholds["slice"]).sum()) for img, roi, _ in held_out]
    assert np.mean(flagged) <= 2.0
    pixel_flagged = [
        int((fitted.score(img, roi).pixel.flatten(1).amax(1) > fitted.thresholds["pixel"]).sum()) for img, roi, _ in held_out
    ]
    assert np.mean(pixel_flagged) <= 2.0


def _volume(depth=6, spacing_z=2.0):
    values = torch.arange(depth, dtype=torch.float32).view(1, 1, 1, depth).expand(1, 4, 4, depth).clone()
    affine = torch.diag(torch.tensor([1.0, 1.0, spacing_z, 1.0]))
    return MetaTensor(values, affine=affine)


def test_axial_context_stacks_the_right_neighbours_at_the_edges():
    out = AxialContext(offset_mm=4.0)(_volume(spacing_z=2.0))  # 4 mm = 2 slices
    assert out.shape == (3, 4, 4, 6)
    assert out[0, 0, 0].tolist() == [0, 0, 0, 1, 2, 3]  # z - 2, the first slice repeated below the volume
    assert out[1, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert out[2, 0, 0].tolist() == [2, 3, 4, 5, 5, 5]  # z + 2, the last slice repeated above it
    assert AxialContext(offset_mm=0.5)(_volume(spacing_z=5.0))[2, 0, 0].tolist()[:2] == [1, 2]  # at least one slice


def test_several_windows_and_liver_fill():
    hu = torch.tensor([-200.0, 0.0, 100.0, 300.0]).view(1, 4, 1, 1)
    out = HUWindows([[-160, 240], [0, 200], [100, 300]])(hu)
    assert out.shape == (3, 4, 1, 1)
    assert out[1, :, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0]
    roi = torch.tensor([0, 1, 1, 1]).view(1, 4, 1, 1)
    filled = FillOutsideROIWithLiver()(hu, roi)
    assert filled[0, 0, 0, 0] == 100.0 and filled[0, 1:, 0, 0].tolist() == [0.0, 100.0, 300.0]


def test_ct_aware_pipeline_gives_three_channels_and_inverts(oblique_case):
    config = PreprocessConfig.from_dict({"image_size": 32, "context_mm": 3.0, "pixel_mm": 1.0, "outside_fill": "liver"})
    assert config.in_channels == 3
    pipeline = build_preprocessing(config, concat=True)
    data = run_pipeline(pipeline, {"image": str(oblique_case["image"]), "roi": str(oblique_case["label"])})
    assert data["image"].shape[0] == 4 and tuple(data["image"].shape[1:3]) == (32, 32)
    from monai.transforms import Invertd

    data["pred"] = data["image"][:1].clone()
    back = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert tuple(back.shape[1:]) == tuple(oblique_case["shape"])
    assert np.allclose(back.affine.numpy(), oblique_case["affine"], atol=1e-4)


def test_pipeline_options_are_checked():
    for bad in ({"outside_fill": "grey"}, {"context_mm": 2.0, "windows": [[0, 1], [1, 2], [2, 3]]}, {"pixel_mm": -1}):
        with pytest.raises(InputError):
            PreprocessConfig.from_dict(bad)


def test_fused_adds_the_density_rarity_to_a_feature_detector(tmp_path):
    image, roi, _ = synthetic_slices(16, seed=0)
    fused = create_detector("fused", image_size=SIZE, detector="patchcore", detector_hparams={"coreset_ratio": 0.1},
                            intensity_hparams={"pixel_mm": 1.5})  # fmt: skip
    fused.fit({"image": image[i : i + 8], "roi": roi[i : i + 8]} for i in range(0, 16, 8))
    held_out, held_roi, _ = synthetic_slices(8, seed=5)
    fused.calibrate([{"image": held_out, "roi": held_roi}], n_scans=1)
    assert torch.all(fused.feature_tail[1:] > fused.feature_tail[:-1])  # a strictly increasing tail table
    lesion_image, lesion_roi, lesion = synthetic_slices(6, seed=2, lesion=True)
    scores = fused.score(lesion_image, lesion_roi)
    inside = lesion_roi[:, 0].numpy()
    density = log_beyond(fused.density.score(lesion_image, lesion_roi).pixel, float(fused.density.rarity[-1])).numpy()
    assert np.all(scores.pixel.numpy()[inside] >= density[inside] - 1e-5)  # the feature rarity only adds
    assert roc_auc_score(lesion[inside].astype(int), scores.pixel.numpy()[inside]) > 0.9
    fused.save(tmp_path / "fused.pt")
    loaded = AnomalyDetector.load(tmp_path / "fused.pt")
    assert "feature.features.backbone" not in str(list(torch.load(tmp_path / "fused.pt", weights_only=True)["state"]))
    assert torch.allclose(loaded.score(lesion_image, lesion_roi).pixel, scores.pixel, atol=1e-5)


def test_liver_spread_becomes_the_reference_and_the_median_stays():
    rng = np.random.default_rng(0)
    hu = torch.as_tensor(rng.normal(90.0, 37.0, (1, 20, 20, 10)), dtype=torch.float32)  # MAD ≈ 25 HU
    roi = torch.zeros_like(hu, dtype=torch.uint8)
    roi[:, 2:18, 2:18] = 1
    out = NormalizeLiverSpread(reference_mad_hu=10.0)(hu, roi)
    inside, before = out[roi > 0], hu[roi > 0]
    assert float(inside.median()) == pytest.approx(float(before.median()), abs=1e-3)
    assert float((inside - inside.median()).abs().median()) == pytest.approx(10.0, rel=1e-3)


def test_fused_scores_only_once_calibrated():
    image, roi, _ = synthetic_slices(8, seed=0)
    fused = create_detector("fused", image_size=SIZE, detector="patchcore", detector_hparams={"coreset_ratio": 0.1})
    fused.fit([{"image": image, "roi": roi}])
    with pytest.raises(InputError, match="calibrate"):
        fused.score(image, roi)


def test_calibration_skips_batches_without_liver(fitted):
    image, roi, _ = synthetic_slices(6, seed=7)
    empty = torch.zeros_like(roi)
    thresholds = fitted.calibrate([{"image": image, "roi": empty}, {"image": image, "roi": roi}], n_scans=1)
    assert thresholds["n_slices"] == 6 and thresholds["extent"] <= thresholds["pixel"]


def test_a_lesion_must_be_wider_than_a_vessel():
    """The same density change scores high as a disc 13.5 mm across and low as a line 6 mm wide (a vessel, fat
    in a fissure); without the opening (``min_width_mm=0``) the line scores about as high as the disc."""
    normal, normal_roi, _ = synthetic_slices(16, seed=0)
    image, roi, _ = synthetic_slices(1, seed=7)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centre = SIZE // 2
    disc = (yy - centre) ** 2 + (xx - centre + 20) ** 2 <= 4**2  # 9 px = 13.5 mm across at 1.5 mm pixels
    line = (xx >= centre + 15) & (xx <= centre + 18) & ((yy - centre).abs() <= 12)  # 4 px = 6 mm wide, 37 mm long
    assert bool(roi[0, 0][disc].all() and roi[0, 0][line].all())
    painted = image.clone()
    painted[0, 0][disc | line] -= 0.15
    peaks = {}
    for width in (6.0, 0.0):
        detector = create_detector("intensity", image_size=SIZE, pixel_mm=1.5, min_width_mm=width)
        detector.fit([{"image": normal, "roi": normal_roi}])
        pixel = detector.score(painted, roi).pixel[0]
        peaks[width] = (float(pixel[disc].max()), float(pixel[line].max()))
    disc_peak, line_peak = peaks[6.0]
    assert disc_peak > 4.0 and line_peak < 0.25 * disc_peak
    disc_raw, line_raw = peaks[0.0]
    assert line_raw > 0.5 * disc_raw


def test_width_filters_read_a_disc_as_their_names_say():
    """``rank`` at quantile 0 is the grey erosion; ``disc_mean`` is the mean of the disc's liver pixels; each is
    spread back over the disc, so a disc-shaped change is covered whole and a line narrower than the disc is not."""
    from monai_ad.detectors.intensity.detector import _erode, dilate, disc_mean_inside, disc_quantile

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 24, 24, generator=g)
    assert torch.equal(disc_quantile(x, 2, 0.0)[..., 2:-2, 2:-2], _erode(x, 2)[..., 2:-2, 2:-2])
    ordered = disc_quantile(x, 2, 0.5)
    assert bool((ordered >= disc_quantile(x, 2, 0.0)).all() and (ordered <= dilate(x, 2)).all())
    roi = torch.zeros_like(x, dtype=torch.bool)
    roi[..., 4:20, 4:20] = True
    mean = disc_mean_inside(torch.where(roi, x, 100.0), roi, 1)
    assert float(mean[0, 0, 10, 10]) == pytest.approx(float(x[0, 0, 9:12, 9:12].mean()), rel=1e-5)
    assert float(mean[0, 0, 4, 4]) == pytest.approx(float(x[0, 0, 4:6, 4:6].mean()), rel=1e-5)  # liver pixels only
    disc_and_line = torch.zeros(1, 1, 40, 40)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    disc = (yy - 12) ** 2 + (xx - 12) ** 2 <= 3**2
    line = (xx == 30) & (yy >= 5) & (yy <= 35)
    disc_and_line[0, 0][disc | line] = 1.0
    for filtered in (dilate(disc_quantile(disc_and_line, 2, 0.25), 2), dilate(disc_mean_inside(disc_and_line, torch.ones_like(disc_and_line, dtype=torch.bool), 2), 2)):
        assert float(filtered[0, 0][disc].min()) > 0.5 and float(filtered[0, 0][line].max()) < 0.5


def test_every_width_filter_fits_and_ranks_a_disc_above_normal_liver():
    normal, normal_roi, _ = synthetic_slices(16, seed=0)
    image, roi, _ = synthetic_slices(2, seed=7)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disc = (yy - SIZE // 2) ** 2 + (xx - SIZE // 2) ** 2 <= 4**2
    painted = image.clone()
    painted[0, 0][disc] -= 0.15
    for kind in ("opening", "rank", "disc_mean"):
        detector = create_detector("intensity", image_size=SIZE, pixel_mm=1.5, width_filter=kind)
        detector.fit([{"image": normal, "roi": normal_roi}])
        scores = detector.score(painted, roi)
        assert float(scores.pixel[0][disc].mean()) > 2 * float(scores.pixel[1][roi[1, 0]].mean()), kind
        assert float(scores.slice[0]) > float(scores.slice[1]), kind


def _disc(radius: float, centre: tuple[int, int] = (SIZE // 2, SIZE // 2)) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_blob_contrast_reads_dots_not_lines_or_edges():
    """A darker dot curves up both ways (negative contrast), a brighter one down (positive); a line of the same
    width and depth, and a straight edge, read as far weaker than either dot."""
    from monai_ad.components.smoothing import smooth_inside
    from monai_ad.detectors.intensity import blob_contrast, gaussian_kernel

    image = torch.full((1, 1, SIZE, SIZE), 0.5)
    image[0, 0][_disc(3, (24, 24))] -= 0.2
    image[0, 0][_disc(3, (24, 72))] += 0.2
    image[0, 0, 70:73, 10:60] -= 0.2  # a dark line 3 pixels wide
    image[0, 0, :, 80:] += 0.2  # an edge
    roi = torch.ones_like(image, dtype=torch.bool)
    contrast = blob_contrast(smooth_inside(image, roi, gaussian_kernel(2.0)), 2.0)[0, 0]
    dark, bright = float(contrast[24, 24]), float(contrast[24, 72])
    assert dark < 0 < bright
    assert float(contrast[60:84, 20:50].abs().max()) < 0.25 * abs(dark)
    assert float(contrast[30:60, 84:].abs().max()) < 0.25 * bright


def test_blob_readings_find_a_dot_the_width_filter_removes():
    """A 2-pixel dark dot is erased by a 6 mm opening of the density readings; a blob reading at its scale
    scores it above the whole of a normal slice."""
    normal, normal_roi, _ = synthetic_slices(16, seed=0)
    image, roi, _ = synthetic_slices(2, seed=7)
    dot = _disc(2)
    painted = image.clone()
    painted[0, 0][dot] -= 0.15
    scored = {}
    for blobs in ([], [1.0]):
        detector = create_detector("intensity", image_size=SIZE, pixel_mm=1.0, min_width_mm=6.0, blob_sigma_mm=blobs)
        detector.fit([{"image": normal, "roi": normal_roi}])
        scored[len(blobs)] = detector.score(painted, roi)
    without, with_blobs = scored[0], scored[1]
    dot_peak = float(with_blobs.pixel[0][dot].max())
    assert dot_peak > float(with_blobs.pixel[1][roi[1, 0]].max())  # above everything the normal slice holds
    assert float(with_blobs.slice[0]) > float(with_blobs.slice[1])
    assert dot_peak > 2 * float(without.pixel[0][dot].max())
    with pytest.raises(InputError, match="blob_sigma_mm"):
        create_detector("intensity", blob_sigma_mm=[0.0])
