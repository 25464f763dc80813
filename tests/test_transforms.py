import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from monai_ad.errors import InputError
from monai_ad.postprocess import axial_axis, label_lesions, slice_scores_along_axis
from monai_ad.transforms import (
    IMAGE,
    ROI,
    CheckCTVolume,
    CropROI,
    HistogramEqualize,
    HUWindow,
    HUWindowd,
    NormalizeLiverHU,
    PadToSquare,
    SelectROI,
    TrimROIBorder,
    axial_slices,
    build_preprocessing,
    run_pipeline,
    stack_axial_slices,
)


def meta(array, spacing=(1.0, 1.0, 1.0)):
    return MetaTensor(torch.as_tensor(array), affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def test_hu_window_maps_window_to_unit_range():
    img = torch.tensor([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    out = HUWindow((-160, 240))(img)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    d = HUWindowd("image", window=(0, 100))({"image": torch.tensor([50.0])})
    assert float(d["image"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        HUWindow((100, 0))


def test_normalize_liver_hu_moves_roi_median():
    img = torch.full((1, 4, 4, 2), 70.0)
    roi = torch.zeros_like(img)
    roi[:, :2] = 1
    out = NormalizeLiverHU(110.0)(img, roi)
    assert torch.allclose(out, torch.full_like(img, 110.0))


def test_the_liver_mode_and_its_width_ignore_a_fifth_of_dark_tumour():
    from monai_ad.transforms.array import NormalizeLiverSpread, liver_level

    g = torch.Generator().manual_seed(0)
    parenchyma = 100 + 15 * torch.randn(200_000, generator=g)
    vessels = 150 + 15 * torch.randn(20_000, generator=g)
    tumour = 50 + 15 * torch.randn(55_000, generator=g)  # a fifth of the liver, 50 HU darker
    liver = torch.cat([parenchyma, vessels, tumour])
    mad = 0.6745 * 15  # the parenchyma's own median absolute deviation
    median, median_spread = liver_level(liver, "median")
    mode, mode_spread = liver_level(liver, "mode")
    assert median < 98.0 and median_spread > 1.4 * mad  # the median and MAD follow the tumour
    assert mode == pytest.approx(100.0, abs=1.0) and mode_spread == pytest.approx(mad, rel=0.1)
    assert liver_level(parenchyma, "mode") == pytest.approx(liver_level(parenchyma, "median"), rel=0.03)
    # the transforms read the same level: the parenchyma lands on the reference, its spread on the reference spread
    img, roi = liver.view(1, -1, 1, 1), torch.ones(1, liver.numel(), 1, 1)
    shifted = NormalizeLiverHU(110.0, level="mode")(img, roi)
    assert float(shifted[0, :200_000].median()) == pytest.approx(110.0, abs=1.0)
    scaled = NormalizeLiverSpread(10.0, level="mode")(shifted, roi)
    parenchyma_out = scaled[0, :200_000].flatten()
    assert float((parenchyma_out - parenchyma_out.median()).abs().median()) == pytest.approx(10.0, rel=0.1)
    assert liver_level(torch.full((100,), 7.0), "mode") == (7.0, 0.0)  # a constant liver: nothing to estimate
    with pytest.raises(ValueError, match="estimator"):
        liver_level(liver, "mean")


def test_pixel_noise_reads_white_noise_and_ignores_a_smooth_dark_lesion():
    from monai_ad.transforms.array import NormalizeLiverSpread, pixel_noise

    g = torch.Generator().manual_seed(0)
    noise = 12.0 * torch.randn(1, 96, 96, 6, generator=g)
    roi = torch.zeros_like(noise)
    roi[:, 8:88, 8:88] = 1
    assert pixel_noise(100 + noise, roi) == pytest.approx(0.6745 * 12.0, rel=0.05)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    lesion = -50.0 * torch.exp(-((yy - 48) ** 2 + (xx - 48) ** 2) / (2 * 12.0**2))  # a broad, smooth hypodensity
    with_lesion = 100 + noise + lesion[None, :, :, None]
    assert pixel_noise(with_lesion, roi) == pytest.approx(pixel_noise(100 + noise, roi), rel=0.03)
    scaled = NormalizeLiverSpread(10.0, spread="noise")(with_lesion, roi)
    assert pixel_noise(scaled, roi) == pytest.approx(10.0, rel=0.01)
    assert pixel_noise(noise, torch.zeros_like(roi)) == 0.0
    with pytest.raises(ValueError, match="spread"):
        NormalizeLiverSpread(10.0, spread="mad")
    from monai_ad.errors import InputError
    from monai_ad.transforms.pipeline import PreprocessConfig

    with pytest.raises(InputError, match="liver_spread"):
        PreprocessConfig.from_dict({"liver_spread": "mad"})


def test_histogram_equalize_flattens_roi_histogram_and_keeps_outside():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.beta(8, 2, size=(1, 32, 32, 3)).astype(np.float32))
    roi = torch.zeros_like(img)
    roi[:, 4:28, 4:28] = 1
    out = HistogramEqualize()(img, roi)
    inside = out[roi > 0].numpy()
    assert abs(np.median(inside) - 0.5) < 0.06  # equalised: uniform-like over [0, 1]
    assert torch.equal(out[roi == 0], img[roi == 0])


def test_select_roi_by_label_and_empty_roi_error():
    seg = meta(np.array([[[[0, 5, 6], [5, 0, 1]]]], dtype=np.float32))
    assert SelectROI(5)(seg).sum() == 2
    assert SelectROI(None)(seg).sum() == 4
    with pytest.raises(InputError, match="liver ROI is empty"):
        SelectROI(9)(seg)


def test_crop_roi_margin_in_mm_and_inverse_fills_lowest_value():
    roi = meta(np.zeros((1, 20, 20, 10), dtype=np.float32), spacing=(0.5, 0.5, 2.0))
    roi[:, 8:12, 8:12, 4:6] = 1
    crop = CropROI(margin_mm=2.0)  # 4 voxels in-plane, 1 slice along z
    out = crop(roi.clone(), roi)
    assert tuple(out.shape[1:]) == (12, 12, 4)
    heat = out.clone() + 3.0  # lowest value 3
    back = crop.inverse(heat)
    assert tuple(back.shape) == (1, 20, 20, 10)
    assert float(back[0, 0, 0, 0]) == 3.0
    assert torch.allclose(back.affine, roi.affine)


def test_pad_to_square_and_inverse():
    img = meta(np.ones((1, 6, 10, 3), dtype=np.float32))
    pad = PadToSquare()
    out = pad(img)
    assert tuple(out.shape) == (1, 10, 10, 3)
    assert tuple(pad.inverse(out).shape) == (1, 6, 10, 3)


def test_axial_slicing_round_trip():
    vol = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    s = axial_slices(vol)
    assert s.shape == (5, 2, 3, 4)
    assert torch.equal(s[2], vol[..., 2])
    assert torch.equal(stack_axial_slices(s), vol)


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((1, 8, 8), dtype=np.float32), "is 2-D"),
        (np.zeros((1, 8, 8, 1), dtype=np.float32), "single slice"),
        (np.zeros((3, 8, 8, 8), dtype=np.float32), "channels/time points"),
        (np.full((1, 8, 8, 8), np.nan, dtype=np.float32), "NaN"),
        (np.random.default_rng(0).random((1, 8, 8, 8)).astype(np.float32), "do not look like CT"),
        (np.random.default_rng(0).integers(0, 4096, (1, 8, 8, 8)).astype(np.float32), "do not look like CT"),
    ],
)
def test_check_ct_volume_rejects(array, message):
    with pytest.raises(InputError, match=message):
        CheckCTVolume()(meta(array) if array.ndim == 4 else MetaTensor(torch.as_tensor(array)))


def test_check_ct_volume_accepts_ct():
    array = np.random.default_rng(0).normal(40, 30, (1, 8, 8, 8)).astype(np.float32)
    array[0, 0] = -1000
    CheckCTVolume()(meta(array))


def test_pipeline_round_trip_restores_geometry_and_lesion_position(oblique_case):
    """Heatmap computed on the pre-processed slices → Invertd → the input's exact shape and affine, and the
    bright lesion lands at its true world position."""
    pipeline = build_preprocessing({"image_size": 48, "normalize_liver_hu": None}, roi_labels=None)
    data = run_pipeline(pipeline, {IMAGE: str(oblique_case["image"]), ROI: str(oblique_case["label"])})
    assert tuple(data[IMAGE].shape[:3]) == (1, 48, 48)
    data["heatmap"] = data[IMAGE].clone()  # the windowed image itself, as a stand-in heatmap
    inverted = Invertd(keys="heatmap", transform=pipeline, orig_keys=IMAGE, nearest_interp=False)(data)["heatmap"]
    assert tuple(inverted.shape[1:]) == oblique_case["shape"]
    assert np.allclose(np.asarray(inverted.affine), oblique_case["affine"], atol=1e-5)

    heat = inverted.as_tensor()[0].numpy()
    label_map, lesions = label_lesions(heat, np.asarray(inverted.affine), threshold=0.7, min_volume_mm3=10)
    assert len(lesions) == 1
    assert np.linalg.norm(np.asarray(lesions[0]["centroid_mm"]) - oblique_case["world_center"]) < 1.5
    overlap = (label_map > 0) & oblique_case["sphere"]
    dice = 2 * overlap.sum() / ((label_map > 0).sum() + oblique_case["sphere"].sum())
    assert dice > 0.7

    # a per-slice channel (the RAS slice index here) comes back along the source's own slice axis (axis 0)
    n = data[IMAGE].shape[-1]
    index_channel = torch.arange(n, dtype=torch.float32).expand(1, 48, 48, n)
    data["heatmap"] = MetaTensor(index_channel.clone(), meta=data[IMAGE].meta, applied_operations=data[IMAGE].applied_operations)
    back = Invertd(keys="heatmap", transform=pipeline, orig_keys=IMAGE, nearest_interp=False)(data)["heatmap"]
    assert axial_axis(oblique_case["affine"]) == 0
    roi = np.ones(oblique_case["shape"], dtype=bool)
    per_source_slice = slice_scores_along_axis(back.as_tensor()[0].numpy(), roi, axis=0)
    ras = [int(round(v)) for v in per_source_slice]
    assert sorted(np.abs(np.diff(ras)).tolist()) == [1] * (len(ras) - 1)  # one RAS slice per source slice
    lesion_area = (data[IMAGE][0] > 0.8).sum(dim=(0, 1)).numpy()  # per RAS slice
    assert per_source_slice[9] == pytest.approx(float(np.argmax(lesion_area)))  # the sphere's centre slice


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_load_with_the_same_geometry_as_nifti(oblique_case, tmp_path, suffix):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(oblique_case["image"]))
    label = sitk.ReadImage(str(oblique_case["label"]))
    sitk.WriteImage(image, str(tmp_path / f"case{suffix}"))
    sitk.WriteImage(label, str(tmp_path / f"label{suffix}"))
    pipeline = build_preprocessing({"image_size": 48})
    a = run_pipeline(pipeline, {IMAGE: str(oblique_case["image"]), ROI: str(oblique_case["label"])})
    b = run_pipeline(pipeline, {IMAGE: str(tmp_path / f"case{suffix}"), ROI: str(tmp_path / f"label{suffix}")})
    assert a[IMAGE].shape == b[IMAGE].shape
    assert np.allclose(np.asarray(a[IMAGE].affine), np.asarray(b[IMAGE].affine), atol=1e-4)
    assert torch.allclose(a[IMAGE].as_tensor(), b[IMAGE].as_tensor(), atol=1e-4)


def test_trim_roi_border_drops_fat_at_the_capsule_only():
    """Fat inside the mask's outer 3 mm leaves the ROI; a fat-dense voxel deep inside, and a hypodense lesion
    at the border, stay."""
    shape = (1, 40, 40, 20)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    roi = torch.zeros(shape)
    roi[0, 5:35, 5:35, 3:17] = 1
    image = torch.full(shape, 60.0)
    shell = roi.clone()
    shell[0, 7:33, 7:33, 4:16] = 0  # the mask's outer 2 voxels in-plane, one slice (2 mm) through-plane
    image[shell > 0] = -100.0  # perihepatic fat taken in by the segmentation
    image[0, 20, 20, 10] = -100.0  # deep inside: scored as anything else
    image[0, 5, 18:22, 10] = 10.0  # a hypodense lesion at the capsule: no fat
    trimmed = TrimROIBorder(min_hu=-30.0, border_mm=3.0)(MetaTensor(roi, affine=torch.as_tensor(affine)), MetaTensor(image, affine=torch.as_tensor(affine)))
    kept = trimmed[0] > 0
    assert not kept[(shell[0] > 0) & (image[0] < -30)].any()
    assert kept[20, 20, 10] and kept[5, 18:22, 10].all()
    assert int(kept.sum()) == int(((roi[0] > 0) & ~((shell[0] > 0) & (image[0] < -30))).sum())
    assert isinstance(trimmed, MetaTensor) and torch.equal(trimmed.affine, torch.as_tensor(affine).to(trimmed.affine.dtype))


def test_the_pipeline_trims_the_roi_only_when_asked(oblique_case):
    case = {"image": oblique_case["image"], "roi": oblique_case["label"]}
    plain = run_pipeline(build_preprocessing({"image_size": 64}), case)
    trimmed = run_pipeline(build_preprocessing({"image_size": 64, "trim_border_hu": 1000.0}), case)  # every border voxel
    assert 0 < int(trimmed["roi"].sum()) < int(plain["roi"].sum())
    with pytest.raises(InputError, match="trim_border_mm"):
        build_preprocessing({"trim_border_hu": -30.0, "trim_border_mm": 0.0})
