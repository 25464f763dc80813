"""The volumetric pipeline on the real CT sample (NIfTI with its organ segmentation, and the DICOM series)."""

import numpy as np
from monai.transforms import Invertd

from monai_ad.transforms import IMAGE, ROI, build_preprocessing, run_pipeline
from monai_ad.transforms.pipeline import LoadVolumed

TS_LIVER = 5  # TotalSegmentator's liver label


def test_real_nifti_with_organ_mask_crops_liver_and_inverts(real_ct):
    pipeline = build_preprocessing({"image_size": 96}, roi_labels=TS_LIVER)
    data = run_pipeline(
        pipeline, {IMAGE: str(real_ct / "example_ct.nii.gz"), ROI: str(real_ct / "example_seg_fast_force_split.nii.gz")}
    )
    image, roi = data[IMAGE], data[ROI]
    assert tuple(image.shape[:3]) == (1, 96, 96)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    liver = image[roi > 0]
    # normalised liver parenchyma sits at 110 HU → (110 + 160) / 400 in the abdominal window
    assert abs(float(liver.median()) - 270 / 400) < 0.05

    data["heatmap"] = roi.float().clone()
    back = Invertd(keys="heatmap", transform=pipeline, orig_keys=IMAGE, nearest_interp=True)(data)["heatmap"]
    source = LoadVolumed([ROI])({ROI: str(real_ct / "example_seg_fast_force_split.nii.gz")})[ROI]
    assert back.shape == source.shape
    assert np.allclose(np.asarray(back.affine), np.asarray(source.affine), atol=1e-4)
    truth = source.numpy()[0] == TS_LIVER
    got = back.numpy()[0] > 0.5
    assert 2 * (truth & got).sum() / (truth.sum() + got.sum()) > 0.9


def test_real_dicom_series_loads_and_matches_its_segmentation(real_ct):
    data = LoadVolumed([IMAGE])({IMAGE: str(real_ct / "example_ct_dicom")})
    image = data[IMAGE]
    assert tuple(image.shape) == (1, 512, 512, 20)
    assert np.allclose(image.pixdim.numpy(), [0.9766, 0.9766, 2.0], atol=1e-3)
    assert float(image.min()) <= -1000 and float(image.max()) > 1000  # HU, rescale applied

    # the segmentation is stored in another axis order: after re-orientation both share one grid
    pipeline = build_preprocessing({"image_size": 64}, roi_labels=TS_LIVER)
    out = run_pipeline(pipeline, {IMAGE: str(real_ct / "example_ct_dicom"), ROI: str(real_ct / "example_seg_dicom.nii.gz")})
    assert out[IMAGE].shape[-1] == 20
    assert int(out[ROI].sum()) > 1000
