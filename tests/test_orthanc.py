"""Integration: Orthanc (DICOMweb) ← ingest of the real CT series → the app on Orthanc → infer by SeriesInstanceUID →
final label stored as DICOM SEG → OHIF renders the study in headless Chromium, and runs the detector from its
MONAI Label panel. About a minute on 2 CPU cores;
skipped where Orthanc, Chromium or the real CT sample are missing (``scripts/setup_env.sh`` installs the tools)."""

import importlib.util
import json

import pytest

from monai_ad import dicomweb, label_server

SCRIPT = label_server.PROJECT_ROOT / "scripts" / "ohif_check.py"


def _check_module():
    spec = importlib.util.spec_from_file_location("ohif_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uid_repair_is_deterministic_and_fills_only_what_is_missing(real_ct):
    series = real_ct / "example_ct_dicom"
    first, second = dicomweb.read_series(series), dicomweb.read_series(series)
    assert all(not ds.get("StudyInstanceUID") for ds in first)  # the sample really lacks them
    frame_of_reference = str(first[0].FrameOfReferenceUID)
    a, b = dicomweb.repair_uids(first), dicomweb.repair_uids(second)
    assert (a.study, a.series, a.instances) == (b.study, b.series, b.instances)
    assert a.study != a.series and len(set(a.instances)) == len(first)
    assert all(str(ds.StudyInstanceUID) == a.study and str(ds.SeriesInstanceUID) == a.series for ds in first)
    assert all(str(ds.SOPClassUID) == dicomweb.CT_IMAGE_STORAGE for ds in first)
    assert str(first[0].FrameOfReferenceUID) == frame_of_reference  # present UIDs are kept
    assert not first[0].file_meta.TransferSyntaxUID.is_compressed


def test_ingest_rejects_a_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(dicomweb.InputError, match="no DICOM image files"):
        dicomweb.read_series(tmp_path)


def test_orthanc_app_ohif_end_to_end(real_ct, tmp_path):
    check = _check_module()
    missing = check.missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    summary = check.run_check(tmp_path)
    assert summary["ingest"]["instances"] == 20 and summary["ingest"]["deterministic"]
    assert summary["datastore_stats"]["total"] >= 1
    infer = summary["infer"]
    assert infer["label_shape"] == [512, 512, 20] and infer["label_names"] == {"anomaly": 1}
    assert infer["slices_scored"] > 0
    assert summary["after_save"]["modalities"] == ["CT", "SEG"]  # the final label went back as DICOM SEG
    assert summary["feedback"]["cases"] == [summary["ingest"]["SeriesInstanceUID"]]  # and counts as a correction
    assert summary["feedback"]["dice_after"] >= summary["feedback"]["dice_before"]
    assert summary["ohif"]["rendered"], json.dumps(summary["ohif"])
    assert (tmp_path / "ohif_viewer.png").stat().st_size > 10_000
    in_ohif = summary["ohif_monai_label"]  # the detector run from OHIF's MONAI Label panel
    assert in_ohif["listed"] and in_ohif["ran"], json.dumps(in_ohif)
    assert in_ohif["viewport_changed"] > 0.002  # the anomaly segment is drawn over the CT
