"""A detector's reading of a DICOM series as standard DICOM objects, referencing the series' own instances.

- **DICOM SEG** (binary): one segment per lesion of the summary (segment number = lesion id), category
  "Morphologically Abnormal Structure", type "Lesion", in the liver; algorithm monai_ad + detector. One segment
  per lesion is what 3D Slicer's QuantitativeReporting and OHIF's SEG viewport list segment by segment, and what
  lets each SR measurement group reference its lesion alone. No lesion: no SEG (a SEG needs a segment).
- **Parametric Map** (float pixels): the heatmap, with a real-world value mapping (identity) over the score's range.
- **Comprehensive SR, TID 1500** measurement report: per lesion a volumetric ROI group referencing its SEG
  segment (volume, largest diameter, peak score, p-value when there is one, centroid in patient coordinates) and,
  with the same tracking UID (one finding), a planar group holding its long axis: a "Length" measurement (the
  longest in-plane diameter, RECIST style, on the axial source slice where it is largest) with a two-point
  SCOORD POLYLINE on that source image. Then one study group (study score, its p-value, abnormal slice count;
  qualitative evaluation normal / abnormal), all with the algorithm's name (monai_ad + detector) and version
  (monai_ad's version, the model's as a parameter). Comprehensive SR, not Comprehensive 3D SR: nothing in it
  needs 3-D coordinates, and OHIF's SR viewport draws image-plane regions of a Comprehensive SR over their
  source image (it sends a Comprehensive 3D SR to its 3-D point display instead, which leaves the viewport
  black); 3D Slicer's QuantitativeReporting reads both.

The maps of a ``VolumeResult`` are in the scan's geometry as the pipeline read it (MONAI's RAS affine); each
source instance's frame is taken from them by its own ImagePositionPatient / ImageOrientationPatient /
PixelSpacing, so the instances' order in the folder never matters.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import monai_ad
from monai_ad.errors import InputError
from monai_ad.io import atomic_paths
from monai_ad.postprocess import farthest_pair

LOCAL_SCHEME = "99MONAIAD"  # a private coding scheme (DICOM's "99" prefix) for what no standard code names
SERIES_NUMBERS = {"segmentation": 901, "parametric_map": 902, "report": 903}
FILE_SUFFIXES = {"segmentation": "seg", "parametric_map": "pm", "report": "sr"}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _codes():
    """The coded concepts used (imported lazily: highdicom is only needed for DICOM results)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    local = lambda value, meaning: CodedConcept(value, LOCAL_SCHEME, meaning)  # noqa: E731
    return {
        "category": codes.SCT.MorphologicallyAbnormalStructure,
        "lesion": codes.SCT.Lesion,
        "liver": codes.SCT.Liver,
        "volume": codes.SCT.Volume,
        "diameter": codes.SCT.Diameter,
        "length": codes.SCT.Length,
        "maximum": codes.SCT.Maximum,
        "anomaly_score": local("ANOMALY_SCORE", "Anomaly score"),
        "p_value": local("P_VALUE", "Conformal p-value"),
        "abnormal_slices": local("ABNORMAL_SLICES", "Number of abnormal slices"),
        "centroid": [local(f"CENTROID_{axis}", f"Centroid {axis} (patient)") for axis in "XYZ"],
        "finding": codes.DCM.Finding,
        "normal": CodedConcept("17621005", "SCT", "Normal"),
        "abnormal": codes.SCT.Abnormal,
        "mm": codes.UCUM.Millimeter,
        "mm3": codes.UCUM.CubicMillimeter,
        "score_unit": CodedConcept("{score}", "UCUM", "score"),
        "no_units": codes.UCUM.NoUnits,
        "ai": codes.DCM.ArtificialIntelligence,
        "procedure": codes.LN.CTUnspecifiedBodyRegion,
    }


@dataclass
class DicomResults:
    """The three objects of one reading (``segmentation`` is None when there is no lesion)."""

    segmentation: Any
    parametric_map: Any
    report: Any

    def datasets(self) -> dict[str, Any]:
        return {k: v for k, v in (("segmentation", self.segmentation), ("parametric_map", self.parametric_map),
                                  ("report", self.report)) if v is not None}  # fmt: skip


def read_source_series(folder: str | os.PathLike) -> list:
    """The instances of one DICOM image series (missing UIDs filled in as ``monai_ad.dicomweb`` does), or an
    ``InputError`` naming the folder: not a folder of DICOM files, several series, not single-frame axial images."""
    from monai_ad.dicomweb import read_series, repair_uids

    datasets = read_series(folder)
    try:
        repair_uids(datasets)
    except InputError as exc:
        raise InputError(exc.problem, folder) from None
    if len({str(ds.SeriesInstanceUID) for ds in datasets}) > 1:
        raise InputError("holds more than one DICOM series: DICOM results need the one series that was read", folder)
    for ds in datasets:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID") if k not in ds]
        if missing or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            problem = f"lacks {', '.join(missing)}" if missing else "is multi-frame"
            raise InputError(f"instance {ds.get('InstanceNumber', '?')} {problem}: DICOM results need single-frame images with a position", folder)
    return datasets


def frame_indices(source, affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Voxel indices (one array per map axis, each ``[Rows, Columns]``) of the map voxels under a source
    instance's pixels: its pixel (row i, column j) lies at ImagePositionPatient + j·Δc·X + i·Δr·Y (patient LPS),
    taken to the map's RAS voxel grid through ``affine``. An ``InputError`` when the instance is not on that grid."""
    position = np.asarray(source.ImagePositionPatient, dtype=float)
    orientation = np.asarray(source.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=float))
    voxel = lambda lps: to_voxel[:3, :3] @ (RAS_TO_LPS @ lps) + to_voxel[:3, 3]  # noqa: E731  (LPS ↔ RAS: its own inverse)
    origin = voxel(position)
    along_column = voxel(position + column_spacing * orientation[:3]) - origin  # one column to the right
    along_row = voxel(position + row_spacing * orientation[3:]) - origin  # one row down
    where = f"instance {source.get('InstanceNumber', '?')} ({source.SOPInstanceUID})"
    for step in (origin, along_column, along_row):
        if np.abs(step - np.round(step)).max() > 0.05:
            raise InputError(f"{where} does not lie on the voxel grid of the maps (not the series that was read)")
    if not all(np.abs(np.round(step)).sum() == 1 for step in (along_column, along_row)):
        raise InputError(f"{where} is not a plane of the maps' voxel grid")
    rows, columns = np.meshgrid(np.arange(int(source.Rows)), np.arange(int(source.Columns)), indexing="ij")
    indices = [int(round(o)) + rows * int(round(r)) + columns * int(round(c)) for o, r, c in zip(origin, along_row, along_column)]
    for index, size in zip(indices, shape):
        if index.min() < 0 or index.max() >= size:
            raise InputError(f"{where} lies outside the maps (not the series that was read)")
    return tuple(indices)


def frames_of(volume: np.ndarray, sources: Sequence, affine: np.ndarray) -> np.ndarray:
    """``volume`` (a map in the scan's geometry) as one ``[Rows, Columns]`` frame per source instance, in the
    sources' order."""
    return np.stack([volume[frame_indices(ds, affine, volume.shape)] for ds in sources])


def lesion_segments(label_map: np.ndarray, lesions: Sequence[dict]) -> np.ndarray:
    """The label map with each lesion's voxels set to its id (its connected region whose centroid is the
    summary's ``centroid_voxel``; the regions are those ``monai_ad.postprocess.label_lesions`` made)."""
    from scipy import ndimage

    components, n = ndimage.label(label_map > 0, structure=np.ones((3, 3, 3), dtype=bool))
    dtype = np.uint8 if len(lesions) < 256 else np.uint16
    segments = np.zeros(label_map.shape, dtype=dtype)
    if n == 0 or not lesions:
        return segments
    centroids = np.asarray(ndimage.center_of_mass(components > 0, components, np.arange(1, n + 1)), dtype=float).reshape(n, -1)
    for lesion in lesions:
        nearest = int(np.argmin(np.linalg.norm(centroids - np.asarray(lesion["centroid_voxel"], dtype=float), axis=1)))
        segments[components == nearest + 1] = int(lesion["id"])
    return segments


def model_version(model: str | os.PathLike | None) -> str:
    """A model file's identity: the first 12 hex digits of its SHA-256 ("unsaved" without a file)."""
    if model is None or not Path(model).is_file():
        return "unsaved"
    digest = hashlib.sha256()
    with open(model, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def build_results(sources: Sequence, result, model_version: str = "unsaved", workers: int = 0) -> DicomResults:
    """SEG, Parametric Map and TID 1500 SR of ``result`` (a ``VolumeResult`` with its maps) read from the DICOM
    series ``sources`` (pydicom datasets with their pixel data and UIDs, e.g. ``read_source_series``)."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    if result.heatmap is None or result.label_map is None:
        raise InputError(f"{result.case}: the reading holds no maps (read it with the Predictor itself to write DICOM results)")
    sources = list(sources)
    code = _codes()
    summary = result.summary
    detector = str(summary.get("detector", "detector"))
    algorithm_name = f"monai_ad {detector}"
    common = dict(manufacturer="monai_ad", manufacturer_model_name=algorithm_name, software_versions=monai_ad.__version__,
                  device_serial_number=model_version)  # fmt: skip
    lesions = list(summary.get("lesions", []))

    segmentation, segments = None, None
    if lesions:
        segments = frames_of(lesion_segments(result.label_map, lesions), sources, result.affine)
        algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=code["ai"], version=monai_ad.__version__,
                                                       parameters={"model": model_version})  # fmt: skip
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=int(lesion["id"]), segment_label=f"Lesion {lesion['id']}",
                segmented_property_category=code["category"], segmented_property_type=code["lesion"],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
                tracking_uid=generate_uid(), tracking_id=f"Lesion {lesion['id']}", anatomic_regions=[code["liver"]],
            )  # fmt: skip
            for lesion in sorted(lesions, key=lambda lesion: int(lesion["id"]))
        ]
        segmentation = hd.seg.Segmentation(
            source_images=sources, pixel_array=segments, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["segmentation"],
            sop_instance_uid=generate_uid(), instance_number=1, series_description=f"Anomaly lesions ({detector})",
            content_label="LESIONS", content_description=f"Anomaly regions found by {algorithm_name}", workers=workers, **common,
        )  # fmt: skip

    heat = np.nan_to_num(frames_of(result.heatmap, sources, result.affine).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(heat.min()), float(heat.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly score", lut_explanation=f"{algorithm_name} anomaly score (higher is more abnormal)",
        unit=code["score_unit"], value_range=(low, high), slope=1.0, intercept=0.0, quantity_definition=code["anomaly_score"],
    )  # fmt: skip
    threshold = (summary.get("calibration") or {}).get("pixel")
    parametric_map = hd.pm.ParametricMap(
        source_images=sources, pixel_array=heat, series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["parametric_map"],
        sop_instance_uid=generate_uid(), instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], window_center=(low + high) / 2, window_width=max(high - low, 1e-6),
        series_description=f"Anomaly heatmap ({detector})", content_label="HEATMAP",
        content_description=f"Anomaly score map of {algorithm_name}" + (f"; operating threshold {threshold:g}" if threshold is not None else ""),
        **common,
    )  # fmt: skip

    report = build_report(sources, segmentation, segments, summary, algorithm_name, model_version, code)
    return DicomResults(segmentation, parametric_map, report)


def _measurement(name, value: float, unit, algorithm, derivation=None):
    from highdicom.sr import Measurement

    return Measurement(name=name, value=float(value), unit=unit, derivation=derivation, algorithm_id=algorithm)


def build_report(sources: Sequence, segmentation, segments: np.ndarray | None, summary: dict, algorithm_name: str,
                 model_version: str, code: dict):  # fmt: skip
    """The TID 1500 measurement report (Comprehensive SR) of a summary; lesion groups reference ``segmentation``,
    and their long axes are taken from ``segments`` (one frame per source instance, lesion ids as values)."""
    from highdicom.sr import (
        AlgorithmIdentification, ComprehensiveSR, FindingSite, MeasurementReport, MeasurementsAndQualitativeEvaluations,
        ObservationContext, ObserverContext, PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
        ReferencedSegment, TrackingIdentifier,
        DeviceObserverIdentifyingAttributes, VolumetricROIMeasurementsAndQualitativeEvaluations,
    )  # fmt: skip
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = AlgorithmIdentification(name=algorithm_name, version=monai_ad.__version__, parameters=[f"model {model_version}"])
    groups = []
    for lesion in sorted(summary.get("lesions", []), key=lambda lesion: int(lesion["id"])):
        measurements = [_measurement(code["volume"], lesion["volume_mm3"], code["mm3"], algorithm)]
        if lesion.get("max_diameter_mm") is not None:
            measurements.append(_measurement(code["diameter"], lesion["max_diameter_mm"], code["mm"], algorithm, code["maximum"]))
        measurements.append(_measurement(code["anomaly_score"], lesion["peak_score"], code["score_unit"], algorithm, code["maximum"]))
        if lesion.get("p_value") is not None:
            measurements.append(_measurement(code["p_value"], lesion["p_value"], code["no_units"], algorithm))
        centroid_lps = RAS_TO_LPS @ np.asarray(lesion["centroid_mm"], dtype=float)
        measurements += [_measurement(name, value, code["mm"], algorithm) for name, value in zip(code["centroid"], centroid_lps)]
        finding = dict(finding_type=code["lesion"], finding_category=code["category"], finding_sites=[FindingSite(code["liver"])],
                       algorithm_id=algorithm)  # fmt: skip
        tracking_uid = generate_uid()  # one finding: its long axis and its volumetric group share it
        axis = long_axis(sources, segments, int(lesion["id"])) if segments is not None else None
        if axis is not None:  # first: OHIF merges one finding's groups and lists the first one's measurements first
            length = _measurement(code["length"], axis.length_mm, code["mm"], algorithm)
            groups.append(
                PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=f"Lesion {lesion['id']} long axis"),
                    referenced_region=axis.region(), measurements=[length], **finding,
                )  # fmt: skip
            )
        groups.append(
            VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=f"Lesion {lesion['id']}"),
                referenced_segment=ReferencedSegment.from_segmentation(segmentation, int(lesion["id"])),
                measurements=measurements, **finding,
            )  # fmt: skip
        )
    study = []
    score = summary.get("study_score")
    if score is not None:
        study.append(_measurement(code["anomaly_score"], score, code["score_unit"], algorithm, code["maximum"]))
    if summary.get("p_value") is not None:
        study.append(_measurement(code["p_value"], summary["p_value"], code["no_units"], algorithm))
    abnormal = summary.get("abnormal_slices", [])
    study.append(_measurement(code["abnormal_slices"], len(abnormal), code["no_units"], algorithm))
    verdict = code["abnormal"] if abnormal or summary.get("lesions") else code["normal"]
    groups.append(
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier="Study"), finding_sites=[FindingSite(code["liver"])],
            algorithm_id=algorithm, measurements=study, qualitative_evaluations=[QualitativeEvaluation(code["finding"], verdict)],
        )  # fmt: skip
    )
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(uid=generate_uid(), name=algorithm_name,
                                                                            manufacturer_name="monai_ad", model_name=model_version),
    )  # fmt: skip
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer), procedure_reported=code["procedure"],
        imaging_measurements=groups, referenced_images=library_entries(sources),
    )  # fmt: skip
    evidence = [*sources, *([segmentation] if segmentation is not None else [])]
    return ComprehensiveSR(
        evidence=evidence, content=content[0], series_instance_uid=generate_uid(), series_number=SERIES_NUMBERS["report"],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="monai_ad", is_complete=True,
        series_description=f"Anomaly findings ({algorithm_name.split(' ', 1)[-1]})",
    )  # fmt: skip


@dataclass
class LongAxis:
    """A lesion's longest in-plane diameter: its two ends (pixel centres, ``(row, column)``) on one source image."""

    source: Any
    ends: np.ndarray  # [2, 2]: (row, column) of each end
    length_mm: float

    def region(self):
        """The axis as a POLYLINE in the image's pixel coordinates (column, row; DICOM's origin is the top-left
        pixel's outer corner, so a pixel's centre is at +0.5)."""
        from highdicom.sr import GraphicTypeValues, ImageRegion, SourceImageForRegion

        return ImageRegion(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=self.ends[:, ::-1].astype(float) + 0.5,
                           source_image=SourceImageForRegion.from_source_image(self.source))  # fmt: skip


def long_axis(sources: Sequence, segments: np.ndarray, lesion_id: int) -> LongAxis | None:
    """The lesion's long axis (RECIST): on each source image the farthest pair of its boundary pixels (distance
    in mm by the image's PixelSpacing, between pixel centres), and of those the longest. None when the lesion has
    fewer than two pixels on every image."""
    from scipy import ndimage

    best = None
    for source, frame in zip(sources, segments):
        mask = frame == lesion_id
        if np.count_nonzero(mask) < 2:
            continue
        boundary = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        spacing = np.asarray(source.PixelSpacing, dtype=float)  # (between rows, between columns)
        first, second = farthest_pair(boundary * spacing)
        length = float(np.linalg.norm((boundary[first] - boundary[second]) * spacing))
        if best is None or length > best.length_mm:
            best = LongAxis(source, boundary[[first, second]], length)
    return best


def library_entries(sources: Sequence) -> list:
    """The sources as the SR's image library takes them: without pixel data, and with SpacingBetweenSlices (which
    highdicom's library entry reads, but a CT image need not carry) from the instances' positions when missing."""
    from pydicom.dataset import Dataset

    orientation = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    depths = np.sort([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in sources])
    spacing = float(np.median(np.diff(depths))) if len(depths) > 1 else float(sources[0].get("SliceThickness", 1.0) or 1.0)
    entries = []
    for ds in sources:
        entry = Dataset()
        for element in ds:
            if element.keyword != "PixelData":
                entry.add(element)
        if "SpacingBetweenSlices" not in entry:
            entry.SpacingBetweenSlices = round(spacing, 6)
        entries.append(entry)
    return entries


def result_paths(output_dir: str | os.PathLike, case: str) -> dict[str, Path]:
    """Where the objects of ``case`` go: ``<case>_seg.dcm``, ``<case>_pm.dcm``, ``<case>_sr.dcm`` (the SR last)."""
    return {kind: Path(output_dir) / f"{case}_{suffix}.dcm" for kind, suffix in FILE_SUFFIXES.items()}


def write_results(results: DicomResults, output_dir: str | os.PathLike, case: str) -> dict[str, str]:
    """Write the objects beside the other outputs, all or nothing (the SR, which references the rest, last)."""
    datasets = results.datasets()
    paths = {kind: path for kind, path in result_paths(output_dir, case).items() if kind in datasets}
    stale = result_paths(output_dir, case)["segmentation"]
    if "segmentation" not in datasets and stale.exists():  # a SEG of an earlier run must not pass for this one's
        stale.unlink()
    with atomic_paths(paths) as tmp:
        for kind, path in tmp.items():
            datasets[kind].save_as(str(path), write_like_original=False)
    return {kind: str(path) for kind, path in paths.items()}


def with_maps_from_files(result):
    """A copy of a ``VolumeResult`` whose heatmap and label map are read back from the NIfTI files it wrote."""
    import dataclasses

    import nibabel as nib

    heatmap, label_map = (nib.load(result.files[kind]) for kind in ("heatmap", "label_map"))
    return dataclasses.replace(result, heatmap=np.asarray(heatmap.dataobj, dtype=np.float32),
                               label_map=np.asarray(label_map.dataobj, dtype=np.uint8))  # fmt: skip


def dicom_results_for(series_folder: str | os.PathLike, result, output_dir: str | os.PathLike, model: Any = None,
                      store_url: str | None = None) -> dict[str, str]:  # fmt: skip
    """The command line's step: read the series again, build the three objects, write them (and STOW them to
    ``store_url`` when given). Returns the written files by kind."""
    sources = read_source_series(series_folder)
    if result.heatmap is None and {"heatmap", "label_map"} <= set(result.files):  # streamed: its maps are on disk only
        result = with_maps_from_files(result)
    results = build_results(sources, result, model_version(model if isinstance(model, (str, os.PathLike)) else None))
    files = write_results(results, output_dir, result.case)
    if store_url:
        from monai_ad.dicomweb import store_datasets

        store_datasets(list(results.datasets().values()), store_url)
    return files
