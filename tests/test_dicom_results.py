"""DICOM results of a DICOM series (SEG, Parametric Map, TID 1500 SR) from ``monai-ad infer``, read back with pydicom:
their references point to the input instances and their values are the reading's; the NIfTI label map's name is one
3D Slicer loads as a label map; a real Orthanc stores them and serves them back (skipped where it is missing)."""

import random
import re
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from liver_slices import synthetic_slices
from monai_ad import dicom_results, dicomweb
from monai_ad.cli import main
from monai_ad.detectors import create_detector
from monai_ad.errors import InputError

SEG_STORAGE, PM_STORAGE, COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.33"
ROWS, COLUMNS, SLICES, PIXEL_MM, SLICE_MM = 80, 80, 20, 1.5, 2.5
ORIGIN = np.array([-60.0, -50.0, 100.0])  # ImagePositionPatient of the first slice (LPS, mm)
LIVER_CENTRE = ORIGIN + np.array([60.0, 60.0, 0.0])  # in-plane centre of the liver block (LPS)
LESIONS = [(LIVER_CENTRE + [-10.0, -10.0, 25.0], 9.0), (LIVER_CENTRE + [13.0, 12.0, 20.0], 6.0)]  # (centre LPS, radius mm)


def write_ct_series(folder, seed=0):
    """A synthetic axial CT series (one file per slice, written in shuffled order under unrelated names): a body at
    60 HU with a 60 × 60 mm liver block over slices 2..17 and two hypodense (0 HU) spheres inside it."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rows, columns = np.meshgrid(np.arange(ROWS), np.arange(COLUMNS), indexing="ij")
    x, y = ORIGIN[0] + columns * PIXEL_MM, ORIGIN[1] + rows * PIXEL_MM
    order = list(range(SLICES))
    random.Random(seed).shuffle(order)
    for k in order:
        z = ORIGIN[2] + k * SLICE_MM
        hu = np.full((ROWS, COLUMNS), -1000.0)
        body = (np.abs(x - LIVER_CENTRE[0]) < 55) & (np.abs(y - LIVER_CENTRE[1]) < 55)
        hu[body] = 60.0
        for centre, radius in LESIONS:
            hu[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2] = 0.0
        hu[body] += rng.normal(0, 4, int(body.sum()))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = dicomweb.CT_IMAGE_STORAGE, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Liver", "SYN001", "", "O"
        ds.Modality, ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "CT", "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, k + 1
        ds.ImagePositionPatient = [float(ORIGIN[0]), float(ORIGIN[1]), float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [PIXEL_MM, PIXEL_MM], SLICE_MM
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"img{rng.integers(1e9):09d}.dcm"), write_like_original=False)
    return folder


def liver_mask_for(series, path):
    """The liver block as a NIfTI mask on the voxel grid the pipeline reads the series on."""
    image = LoadImage(image_only=True)(str(series))
    affine = np.asarray(image.affine, dtype=float)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)
    lps = (grid @ affine[:3, :3].T + affine[:3, 3]) * [-1, -1, 1]
    inside = (np.abs(lps[..., 0] - LIVER_CENTRE[0]) < 30) & (np.abs(lps[..., 1] - LIVER_CENTRE[1]) < 30)
    inside &= (lps[..., 2] >= ORIGIN[2] + 2 * SLICE_MM - 0.1) & (lps[..., 2] <= ORIGIN[2] + 17 * SLICE_MM + 0.1)
    nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), str(path))
    return path


@pytest.fixture(scope="module")
def reading(tmp_path_factory):
    """``monai-ad infer`` of the synthetic series with a fitted density detector (thresholds at 30 HU)."""
    root = tmp_path_factory.mktemp("dicom_results")
    series = write_ct_series(root / "series")
    roi = liver_mask_for(series, root / "liver.nii.gz")
    detector = create_detector("density", image_size=64)
    slices, masks, _ = synthetic_slices(4, seed=3, size=64)
    detector.fit([{"image": slices, "roi": masks}], progress=False)
    detector.thresholds = {"pixel": 30.0, "slice": 30.0}
    model = detector.save(root / "density.pt")
    out = root / "out"
    assert main(["--quiet", "infer", "--model", str(model), "--image", str(series), "--roi", str(roi), "--out", str(out)]) == 0
    summary = __import__("json").loads((out / "series_summary.json").read_text())
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(str(p)) for p in series.iterdir())}
    objects = {kind: pydicom.dcmread(str(path)) for kind, path in dicom_results.result_paths(out, "series").items()}
    return {"root": root, "series": series, "roi": roi, "model": model, "out": out, "summary": summary, "sources": sources,
            "objects": objects, "label_map": nib.load(str(out / "series_anomaly-label.nii.gz")),
            "heatmap": nib.load(str(out / "series_heatmap.nii.gz"))}  # fmt: skip


def map_frame(volume: nib.Nifti1Image, source) -> np.ndarray:
    """A NIfTI map's values under each pixel of a source instance: pixel (r, c) lies at IPP + c·Δ·row direction +
    r·Δ·column direction (LPS), taken to the map's voxels by the inverse of its (RAS) affine."""
    rows, columns = np.meshgrid(np.arange(source.Rows), np.arange(source.Columns), indexing="ij")
    iop = np.asarray(source.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in source.PixelSpacing)
    lps = np.asarray(source.ImagePositionPatient, dtype=float) + columns[..., None] * dc * iop[:3] + rows[..., None] * dr * iop[3:]
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(volume.affine), lps * [-1, -1, 1])).astype(int)
    return np.asarray(volume.dataobj)[ijk[..., 0], ijk[..., 1], ijk[..., 2]]


def referenced_instances(ds) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}


def test_segmentation_has_one_segment_per_lesion_on_the_input_instances(reading):
    seg, summary, sources = reading["objects"]["segmentation"], reading["summary"], reading["sources"]
    source = next(iter(sources.values()))
    assert len(summary["lesions"]) >= 2  # several segments: each must land on its own lesion
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced_instances(seg) <= set(sources)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == sorted(lesion["id"] for lesion in summary["lesions"])
    for segment in seg.SegmentSequence:
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Morphologically Abnormal Structure"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "monai_ad density" and algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    voxel_mm3 = abs(np.linalg.det(reading["label_map"].affine[:3, :3]))
    counts = {}
    union = {}
    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = str(groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source = sources[uid]  # the frame's source instance, at the frame's own position
        assert np.allclose(groups.PlanePositionSequence[0].ImagePositionPatient, source.ImagePositionPatient)
        number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(frame.sum())
        union[uid] = union.get(uid, 0) | frame.astype(bool)
    for lesion in summary["lesions"]:
        assert counts[lesion["id"]] * voxel_mm3 == pytest.approx(lesion["volume_mm3"], rel=1e-6)
    for uid, source in sources.items():  # all segments together are the label map, instance by instance
        expected = map_frame(reading["label_map"], source) > 0
        assert np.array_equal(union.get(uid, np.zeros_like(expected)), expected), source.InstanceNumber
    assert sum(counts.values()) == int(np.count_nonzero(np.asarray(reading["label_map"].dataobj)))


def test_parametric_map_holds_the_heatmap_with_its_value_mapping(reading):
    pm, sources = reading["objects"]["parametric_map"], reading["sources"]
    heat = np.asarray(reading["heatmap"].dataobj, dtype=np.float32)
    assert pm.SOPClassUID == PM_STORAGE and "FloatPixelData" in pm
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "{score}"
    assert (float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)) == (1.0, 0.0)
    first, last = (mapping.get(f"RealWorldValue{end}ValueMapped", mapping.get(f"DoubleFloatRealWorldValue{end}ValueMapped")) for end in ("First", "Last"))
    assert (float(first), float(last)) == pytest.approx((float(heat.min()), float(heat.max())), abs=1e-5)
    frames = pm.pixel_array.reshape(-1, pm.Rows, pm.Columns)
    assert len(frames) == len(sources)
    assert {str(i.ReferencedSOPInstanceUID) for i in pm.SourceImageSequence} == set(sources)
    by_position = {tuple(np.round(np.asarray(ds.ImagePositionPatient, dtype=float), 3)): ds for ds in sources.values()}
    for frame, groups in zip(frames, pm.PerFrameFunctionalGroupsSequence):
        source = by_position[tuple(np.round(np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, dtype=float), 3))]
        assert np.array_equal(frame, map_frame(reading["heatmap"], source).astype(np.float32)), source.InstanceNumber


def content_items(item, code=None):
    """The content items below ``item`` (recursively) whose concept name has CodeValue ``code`` (any without it)."""
    for child in getattr(item, "ContentSequence", []):
        if code is None or ("ConceptNameCodeSequence" in child and child.ConceptNameCodeSequence[0].CodeValue == code):
            yield child
        yield from content_items(child, code)


def numbers(group) -> dict[str, float]:
    return {item.ConceptNameCodeSequence[0].CodeMeaning: float(item.MeasuredValueSequence[0].NumericValue)
            for item in group.ContentSequence if item.ValueType == "NUM"}  # fmt: skip


def test_report_has_a_measurement_group_per_lesion_referencing_its_segment(reading):
    sr, seg, summary = reading["objects"]["report"], reading["objects"]["segmentation"], reading["summary"]
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}  # fmt: skip
    assert set(reading["sources"]) | {str(seg.SOPInstanceUID)} <= evidence
    groups = list(content_items(sr, "125007"))  # Measurement Group
    by_name = {next(i.TextValue for i in g.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039"): g for g in groups}
    lesion_names = {f"Lesion {lesion['id']}" for lesion in summary["lesions"]}
    assert set(by_name) == lesion_names | {f"{name} long axis" for name in lesion_names} | {"Study"}
    for lesion in summary["lesions"]:
        group = by_name[f"Lesion {lesion['id']}"]
        segment = next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121191")  # Referenced Segment
        assert segment.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(segment.ReferencedSOPSequence[0].ReferencedSegmentNumber) == lesion["id"]
        centroid_lps = np.asarray(lesion["centroid_mm"]) * [-1, -1, 1]  # RAS → LPS
        uid = lambda g: next(i.UID for i in g.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040")  # noqa: E731
        assert uid(by_name[f"Lesion {lesion['id']} long axis"]) == uid(group)  # one finding
        values = numbers(group)
        assert values["Volume"] == pytest.approx(lesion["volume_mm3"], rel=1e-9)
        assert values["Diameter"] == pytest.approx(lesion["max_diameter_mm"], rel=1e-9)
        assert values["Anomaly score"] == pytest.approx(lesion["peak_score"], rel=1e-9)
        assert ("Conformal p-value" in values) == (lesion.get("p_value") is not None)
        centroid = [values[f"Centroid {axis} (patient)"] for axis in "XYZ"]
        assert np.allclose(centroid, centroid_lps, atol=1e-6)
    study = numbers(by_name["Study"])
    expected_score = summary.get("study_score")
    if expected_score is None:
        expected_score = max(s for s in summary["slice_scores"] if s is not None)
    assert study["Anomaly score"] == pytest.approx(expected_score, rel=1e-9)
    assert study["Number of abnormal slices"] == len(summary["abnormal_slices"]) > 0
    verdict = next(content_items(by_name["Study"], "121071"))  # Finding
    assert verdict.ConceptCodeSequence[0].CodeMeaning == "Abnormal"
    names = {i.TextValue for i in content_items(sr, "111001")}  # Algorithm Name
    assert names == {"monai_ad density"}
    parameters = {i.TextValue for i in content_items(sr, "111002")}
    assert parameters == {f"model {dicom_results.model_version(reading['model'])}"}


def test_report_draws_each_lesions_long_axis_on_its_source_slice(reading):
    """Per lesion a planar group OHIF draws: a Length (mm) with a two-point POLYLINE on one source image, both ends on
    the lesion there, the length their distance by PixelSpacing, and no longer in-plane diameter of the lesion on
    any slice (found here by brute force over all its pixels)."""
    from scipy import ndimage
    from scipy.spatial.distance import pdist

    sr, summary, sources = reading["objects"]["report"], reading["summary"], reading["sources"]
    groups = list(content_items(sr, "125007"))
    identifier = lambda g: next(i.TextValue for i in g.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039")  # noqa: E731
    axes = {identifier(g): g for g in groups if identifier(g).endswith(" long axis")}
    assert len(axes) == len(summary["lesions"]) >= 2
    label = np.asarray(reading["label_map"].dataobj) > 0
    components, _ = ndimage.label(label, structure=np.ones((3, 3, 3), dtype=bool))
    component_map = nib.Nifti1Image(components.astype(np.int32), reading["label_map"].affine)
    lengths = []
    for lesion in summary["lesions"]:
        group = axes[f"Lesion {lesion['id']} long axis"]
        region = next(i for i in group.ContentSequence if i.ValueType == "SCOORD")
        assert region.GraphicType == "POLYLINE" and region.RelationshipType == "CONTAINS"
        assert region.ConceptNameCodeSequence[0].CodeMeaning == "Image Region"
        image = sources[str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
        ends = np.asarray(region.GraphicData, dtype=float).reshape(2, 2) - 0.5  # (column, row) of each end's pixel centre
        assert np.allclose(ends, np.round(ends))
        columns, rows = np.round(ends).astype(int).T
        lesion_here = map_frame(component_map, image)
        component = lesion_here[rows[0], columns[0]]
        assert component > 0 and lesion_here[rows[1], columns[1]] == component  # both ends on one lesion, on that slice
        assert np.allclose(map_frame(reading["label_map"], image)[rows, columns], 1)
        row_mm, column_mm = (float(v) for v in image.PixelSpacing)
        expected = float(np.hypot((columns[1] - columns[0]) * column_mm, (rows[1] - rows[0]) * row_mm))
        length = next(i for i in group.ContentSequence if i.ValueType == "NUM")
        assert length.ConceptNameCodeSequence[0].CodeValue == "410668003"  # SCT Length
        assert length.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"
        assert float(length.MeasuredValueSequence[0].NumericValue) == pytest.approx(expected, abs=1e-6)
        longest = 0.0
        for source in sources.values():
            pixels = np.argwhere(map_frame(component_map, source) == component) * [row_mm, column_mm]
            if len(pixels) > 1:
                longest = max(longest, float(pdist(pixels).max()))
        assert expected == pytest.approx(longest, abs=1e-6)
        assert expected <= lesion["max_diameter_mm"] + 1e-6  # in-plane, centre to centre: within the 3-D diameter
        lengths.append(expected)
    assert lengths[0] > lengths[1]  # the 9 mm sphere's axis is longer than the 6 mm one's


def test_long_axis_of_a_line_a_single_pixel_and_an_anisotropic_grid():
    from pydicom.dataset import Dataset

    def image(row_mm, column_mm):
        ds = Dataset()
        ds.PixelSpacing = [row_mm, column_mm]
        return ds

    frames = np.zeros((2, 8, 8), dtype=np.uint8)
    frames[0, 2, 1:5] = 1  # a one-row lesion: collinear pixels, no convex hull
    frames[1, 4, 4] = 2  # one pixel: no axis
    frames[1, 1:4, 6] = 1  # three rows of one column, on a slice with rows 2 mm apart
    sources = [image(1.0, 1.0), image(2.0, 0.5)]
    axis = dicom_results.long_axis(sources, frames, 1)
    assert axis.source is sources[1] and axis.length_mm == pytest.approx(4.0)  # 2 rows × 2 mm beat 3 columns × 1 mm
    assert sorted(map(tuple, axis.ends)) == [(1, 6), (3, 6)]
    assert dicom_results.long_axis(sources, frames, 2) is None
    assert dicom_results.long_axis(sources[:1], frames[:1], 1).length_mm == pytest.approx(3.0)  # the line alone


def test_label_map_file_is_named_as_3d_slicer_recognises_a_label_map(reading):
    def slicer_loads_as_label_map(path) -> bool:  # 3D Slicer's volume loader: the base name without its extension
        base = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        return bool(re.search(r"(\b|_)([Ll]abel(s)?)(\b|_)", base) or re.search(r"(\b|_)([Ss]eg)(\b|_)", base))

    out = reading["out"]
    assert slicer_loads_as_label_map(out / "series_anomaly-label.nii.gz")
    assert not slicer_loads_as_label_map(out / "series_heatmap.nii.gz")  # the heatmap stays a scalar volume
    label = reading["label_map"]
    assert np.issubdtype(label.get_data_dtype(), np.integer) and label.header.get_intent()[0] == "label"


def test_no_lesion_gives_no_segmentation_and_removes_an_earlier_one(reading, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(dicom_results.result_paths(reading["out"], "series")["segmentation"], dicom_results.result_paths(out, "series")["segmentation"])
    args = ["--quiet", "infer", "--model", str(reading["model"]), "--image", str(reading["series"]), "--roi", str(reading["roi"]),
            "--out", str(out), "--threshold", "1e6", "--slice-threshold", "1e6"]  # fmt: skip
    assert main(args) == 0
    paths = dicom_results.result_paths(out, "series")
    assert not paths["segmentation"].exists() and paths["parametric_map"].exists()
    sr = pydicom.dcmread(str(paths["report"]))
    groups = list(content_items(sr, "125007"))
    assert len(groups) == 1 and numbers(groups[0])["Number of abnormal slices"] == 0
    assert next(content_items(groups[0], "121071")).ConceptCodeSequence[0].CodeMeaning == "Normal"


def test_bad_inputs_are_one_line_errors(reading, tmp_path):
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError, match="no DICOM image files") as err:
        dicom_results.read_source_series(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="not a folder"):
        dicom_results.read_source_series(reading["roi"])
    # an instance that is not on the maps' grid (another series' geometry): named, not silently misplaced
    sources = dicom_results.read_source_series(reading["series"])
    sources[3].ImagePositionPatient = [float(v) + d for v, d in zip(sources[3].ImagePositionPatient, (0.7, 0.0, 0.0))]
    result = dicom_results.with_maps_from_files(_streamed_result(reading))
    with pytest.raises(InputError, match=f"instance {sources[3].InstanceNumber} .*voxel grid"):
        dicom_results.build_results(sources, result)
    code = main(["--quiet", "infer", "--model", str(reading["model"]), "--image", str(reading["roi"]), "--roi", str(reading["roi"]),
                 "--out", str(tmp_path / "x"), "--dicom-store", "http://127.0.0.1:9/dicom-web"])  # fmt: skip
    assert code != 0 and not (tmp_path / "x").exists()


def test_missing_uids_are_filled_as_ingest_fills_them(reading, tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for path in reading["series"].iterdir():
        ds = pydicom.dcmread(str(path))
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
        ds.save_as(str(series / path.name))
    expected = dicomweb.repair_uids(dicomweb.read_series(series))
    results = dicom_results.build_results(dicom_results.read_source_series(series), dicom_results.with_maps_from_files(_streamed_result(reading)))
    for ds in results.datasets().values():
        assert ds.StudyInstanceUID == expected.study
    assert results.segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID == expected.series
    assert referenced_instances(results.segmentation) <= set(expected.instances)


def _streamed_result(reading):
    """The reading as ``infer`` returns it (summary and files, no maps)."""
    from monai_ad.prediction import VolumeResult

    files = {"heatmap": str(reading["out"] / "series_heatmap.nii.gz"), "label_map": str(reading["out"] / "series_anomaly-label.nii.gz")}
    return VolumeResult("series", None, None, reading["heatmap"].affine, reading["summary"], files)


def test_a_real_orthanc_stores_and_serves_the_results(reading, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    if shutil.which("Orthanc") is None or not __import__("os").path.isfile(dicomweb.ORTHANC_PLUGIN):
        pytest.skip("Orthanc with its DICOMweb plugin is not installed")
    from monai_ad import label_server

    orthanc, url = dicomweb.start_orthanc(tmp_path / "orthanc", label_server.free_port())
    try:
        uids = dicomweb.ingest_series(reading["series"], url)
        out = tmp_path / "out"
        args = ["--quiet", "infer", "--model", str(reading["model"]), "--image", str(reading["series"]), "--roi", str(reading["roi"]),
                "--out", str(out), "--dicom-store", url]  # fmt: skip
        assert main(args) == 0
        client = DICOMwebClient(url=url)
        series = client.search_for_series(uids.study)
        modalities = sorted(s["00080060"]["Value"][0] for s in series)
        assert len(series) == 4 and modalities.count("SEG") == 1 and modalities.count("SR") == 1 and "CT" in modalities
        written = {kind: pydicom.dcmread(str(path)) for kind, path in dicom_results.result_paths(out, "series").items()}
        for kind, ds in written.items():
            back = client.retrieve_instance(uids.study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            assert back.SOPClassUID == ds.SOPClassUID, kind
        seg = client.retrieve_instance(uids.study, written["segmentation"].SeriesInstanceUID, written["segmentation"].SOPInstanceUID)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids.series
        assert referenced_instances(seg) <= set(uids.instances)
        assert np.array_equal(seg.pixel_array, written["segmentation"].pixel_array)
    finally:
        orthanc.terminate()
        orthanc.wait(20)


def test_the_apps_infer_step_stores_the_results_in_a_real_orthanc(reading, tmp_path):
    """The MONAI Label app's post-transform on a study of a DICOMweb store: the reading as the predictor's stages leave
    it (maps in the scan's geometry, summary) → SEG, PM and SR in Orthanc, their UIDs in the result params."""
    import os
    import sys

    from dicomweb_client.api import DICOMwebClient

    from monai_ad import label_server
    from monai_ad.prediction import Predictor

    if shutil.which("Orthanc") is None or not os.path.isfile(dicomweb.ORTHANC_PLUGIN):
        pytest.skip("Orthanc with its DICOMweb plugin is not installed")
    sys.path.insert(0, str(label_server.APP_DIR))
    from lib.infers.anomaly import DICOM_SERIES, DICOM_STORE, StoreDicomResultsd

    predictor = Predictor(str(reading["model"]))
    data = predictor.prepare(str(reading["series"]), str(reading["roi"]))
    data.pop("source")
    data = predictor.labelling(predictor.reassembly(predictor.score(data)))
    orthanc, url = dicomweb.start_orthanc(tmp_path / "orthanc", label_server.free_port())
    try:
        uids = dicomweb.ingest_series(reading["series"], url)
        step = StoreDicomResultsd("density", str(reading["model"]))
        unchanged = step(dict(data))  # a study of a folder datastore: nothing stored
        assert "dicom_results" not in (unchanged.get("result") or {})
        stored = step({**data, DICOM_SERIES: str(reading["series"]), DICOM_STORE: url})["result"]["dicom_results"]
        assert set(stored) == {"segmentation", "parametric_map", "report"}, stored
        client = DICOMwebClient(url=url)
        for kind, ids in stored.items():
            ds = client.retrieve_instance(uids.study, ids["SeriesInstanceUID"], ids["SOPInstanceUID"])
            assert ds.SOPClassUID == {"segmentation": SEG_STORAGE, "parametric_map": PM_STORAGE, "report": COMPREHENSIVE_SR}[kind]
        seg = client.retrieve_instance(uids.study, stored["segmentation"]["SeriesInstanceUID"], stored["segmentation"]["SOPInstanceUID"])
        assert len(seg.SegmentSequence) == len(data["anomaly_summary"]["lesions"]) == len(reading["summary"]["lesions"])
        failed = step({**data, DICOM_SERIES: str(reading["series"]), DICOM_STORE: "http://127.0.0.1:9/dicom-web"})
        assert "storing the DICOM results failed" in failed["result"]["dicom_results"]["error"]
    finally:
        orthanc.terminate()
        orthanc.wait(20)
