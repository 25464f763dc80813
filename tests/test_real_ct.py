"""The volumetric pipeline on the real CT sample (NIfTI with its organ segmentation, and the DICOM series)."""

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.transforms import Invertd
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

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


LESION_HU = 2500  # brighter than anything in the scan (its maximum is about 1440 HU)


def with_marker(series, out, world_lps, radius_px=3):
    """A copy of a DICOM series, uncompressed, with a small disc of LESION_HU centred on ``world_lps`` (mm, the
    DICOM patient frame) in the slice nearest to it; its place is found from the DICOM tags alone."""
    out.mkdir()
    slices = [pydicom.dcmread(path) for path in sorted(series.iterdir())]
    nearest = min(slices, key=lambda d: abs(float(d.ImagePositionPatient[2]) - world_lps[2]))
    for i, d in enumerate(slices):
        pixels = d.pixel_array.copy()
        if d is nearest:
            position = np.asarray(d.ImagePositionPatient, dtype=float)
            along_row, along_column = np.asarray(d.ImageOrientationPatient, dtype=float).reshape(2, 3)
            row_mm, column_mm = (float(v) for v in d.PixelSpacing)
            offset = np.asarray(world_lps) - position
            column, row = offset @ along_row / column_mm, offset @ along_column / row_mm
            rr, cc = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
            pixels[(rr - row) ** 2 + (cc - column) ** 2 <= radius_px**2] = round((LESION_HU - float(d.RescaleIntercept)) / float(d.RescaleSlope))
        d.PixelData = pixels.tobytes()
        d.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        d.is_implicit_VR, d.is_little_endian = False, True
        d.save_as(out / f"slice_{i:03d}.dcm", write_like_original=False)
    return out


def test_real_dicom_series_loads_and_matches_its_segmentation(real_ct, tmp_path):
    series, segmentation = real_ct / "example_ct_dicom", real_ct / "example_seg_dicom.nii.gz"
    data = LoadVolumed([IMAGE])({IMAGE: str(series)})
    image = data[IMAGE]
    assert tuple(image.shape) == (1, 512, 512, 20)
    assert np.allclose(image.pixdim.numpy(), [0.9766, 0.9766, 2.0], atol=1e-3)
    assert float(image.min()) <= -1000 and float(image.max()) > 1000  # HU, rescale applied

    # a marker at the deepest point of the segmentation's liver in its largest axial section (the segmentation's
    # own affine, read by nibabel; RAS world)
    seg = nib.load(str(segmentation))
    liver = np.asarray(seg.dataobj) == TS_LIVER
    assert nib.aff2axcodes(seg.affine)[2] == "S"
    z = int(liver.sum((0, 1)).argmax())
    depth = ndimage.distance_transform_edt(liver[..., z], sampling=seg.header.get_zooms()[:2])
    deepest = (*np.unravel_index(np.argmax(depth), depth.shape), z)
    assert depth[deepest[:2]] > 20  # mm inside the liver
    world_ras = (seg.affine @ [*deepest, 1.0])[:3]
    marked = with_marker(series, tmp_path / "marked", world_ras * [-1, -1, 1])  # RAS → the DICOM patient frame (LPS)

    # read by the library: the marker sits where the DICOM tags put it, in the loader's own world coordinates
    loaded = LoadVolumed([IMAGE])({IMAGE: str(marked)})[IMAGE]
    assert tuple(loaded.shape) == (1, 512, 512, 20) and np.allclose(np.asarray(loaded.affine), np.asarray(image.affine), atol=1e-4)
    voxels = np.argwhere(loaded.numpy()[0] > LESION_HU - 10)
    assert 20 <= len(voxels) <= 40  # the one disc (29 pixels), nothing else that bright
    found = (np.asarray(loaded.affine) @ [*voxels.mean(0), 1.0])[:3]
    assert np.linalg.norm(found - world_ras) < 2.0, (found, world_ras)  # within a slice spacing
    assert np.array_equal(loaded.numpy()[0] > LESION_HU - 10, (loaded - image).numpy()[0] != 0)  # only the marker changed

    # through the pipeline, with the segmentation stored in another axis order: the marker lands in the liver ROI
    pipeline = build_preprocessing({"image_size": 64}, roi_labels=TS_LIVER)
    out = run_pipeline(pipeline, {IMAGE: str(series), ROI: str(segmentation)})
    out_marked = run_pipeline(pipeline, {IMAGE: str(marked), ROI: str(segmentation)})
    assert out[IMAGE].shape[-1] == 20 and int(out[ROI].sum()) > 1000
    assert torch.equal(out[ROI], out_marked[ROI])
    changed = (out_marked[IMAGE] - out[IMAGE]).abs()[0] > 0.05
    assert changed.any() and bool((out[ROI][0][changed] > 0).all())  # every changed voxel lies in the liver
    assert changed.nonzero()[:, -1].unique().numel() <= 3  # on the marker's slice (and its neighbours' context)
