"""DICOM series into a DICOMweb store (Orthanc), with missing UIDs filled in deterministically.

Some exported series carry empty Study/Series/SOP Instance/SOP Class UIDs; a DICOM server rejects them. The
repair fills only what is missing, from the files' own content, so ingesting the same files twice gives the same
UIDs (and the server sees the same instances, not duplicates):

- SOP Instance UID: the file meta's Media Storage SOP Instance UID when it is valid, else a UID derived from the
  file's pixel data, instance number and position;
- SOP Class UID: the file meta's Media Storage SOP Class UID, else CT Image Storage for a CT;
- Study Instance UID: derived from the study-level attributes (patient, study date/time/ID, accession number,
  frame of reference), the same for every file of the study;
- Series Instance UID: derived from those and the series-level attributes (modality, series number and
  description, frame of reference).

Derived UIDs use DICOM's UUID-derived ``2.25`` form of a name-based UUID (``uuid5``) of those attributes.
Compressed pixel data is decoded on the way (stored uncompressed, Explicit VR Little Endian), so any viewer reads it.

``start_orthanc`` runs a local Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback for tests and
demos: HTTP only, no DICOM port, no remote access.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from monai_ad.errors import InputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime", "StudyID", "AccessionNumber")
SERIES_KEYS = ("Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime", "FrameOfReferenceUID")
UID_NAMESPACE = uuid.UUID("5b0f4a8e-1f0d-4a53-9a55-6d6f6e61695f")  # fixed: the same files always give the same UIDs
ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class SeriesUIDs:
    study: str
    series: str
    instances: list[str]


def _value(ds, key: str) -> str:
    return str(ds.get(key, "") or "")


def _derived_uid(*parts: str) -> str:
    """A UUID-derived UID (``2.25.<integer>``, DICOM PS3.5 B.2) of a name-based (SHA-1) UUID of ``parts``."""
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def _valid(uid: str) -> bool:
    from pydicom.uid import UID

    return bool(uid) and UID(uid).is_valid


def read_series(folder: str | os.PathLike) -> list:
    """The DICOM files of a folder (recursively), read with pydicom; a clear error when there are none."""
    import pydicom

    root = Path(folder)
    if not root.is_dir():
        raise InputError("not a folder of DICOM files", root)
    datasets = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path))
        except Exception:
            continue  # not DICOM (a README, DICOMDIR remnants)
        if "PixelData" in ds:
            datasets.append(ds)
    if not datasets:
        raise InputError("holds no DICOM image files", root)
    return datasets


def repair_uids(datasets: Sequence) -> SeriesUIDs:
    """Fill missing UIDs in place (see the module docstring); decode compressed pixel data."""
    from pydicom.uid import ExplicitVRLittleEndian

    first = datasets[0]
    study_parts = [_value(first, k) for k in STUDY_KEYS] + [_value(first, "FrameOfReferenceUID")]
    study_uid = _value(first, "StudyInstanceUID")
    study_uid = study_uid if _valid(study_uid) else _derived_uid("study", *study_parts)
    series_uid = _value(first, "SeriesInstanceUID")
    series_uid = series_uid if _valid(series_uid) else _derived_uid("series", *study_parts, *(_value(first, k) for k in SERIES_KEYS))
    instances = []
    for ds in datasets:
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            try:
                ds.decompress()
            except Exception as exc:
                raise InputError(f"cannot decode the pixel data of instance {_value(ds, 'InstanceNumber')} ({exc})") from None
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.is_little_endian, ds.is_implicit_VR = True, False
        if not _valid(_value(ds, "StudyInstanceUID")):
            ds.StudyInstanceUID = study_uid
        if not _valid(_value(ds, "SeriesInstanceUID")):
            ds.SeriesInstanceUID = series_uid
        sop_class = _value(ds, "SOPClassUID")
        if not _valid(sop_class):
            meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
            ds.SOPClassUID = meta_class if _valid(meta_class) else CT_IMAGE_STORAGE if _value(ds, "Modality") == "CT" else ""
            if not ds.SOPClassUID:
                raise InputError(f"instance {_value(ds, 'InstanceNumber')} has no SOP Class UID and is not a CT")
        sop = _value(ds, "SOPInstanceUID")
        if not _valid(sop):
            meta_sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
            if _valid(meta_sop):
                sop = meta_sop
            else:
                digest = hashlib.sha256(bytes(ds.PixelData)).hexdigest()
                sop = _derived_uid("instance", series_uid, _value(ds, "InstanceNumber"), _value(ds, "ImagePositionPatient"), digest)
            ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        instances.append(str(ds.SOPInstanceUID))
    if len(set(instances)) != len(instances):
        raise InputError("two files of the series share one SOP Instance UID")
    return SeriesUIDs(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), instances)


def write_series(datasets: Sequence, out_dir: str | os.PathLike) -> list[Path]:
    from monai_ad.io import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(str(tmp), write_like_original=False)
        paths.append(path)
    return paths


def ingest_series(folder: str | os.PathLike, dicomweb_url: str, repaired_dir: str | os.PathLike | None = None) -> SeriesUIDs:
    """Repair a series' UIDs and store it through DICOMweb STOW-RS (``<url>/studies``); returns its UIDs."""
    datasets = read_series(folder)
    uids = repair_uids(datasets)
    if repaired_dir is not None:
        write_series(datasets, repaired_dir)
    store_datasets(datasets, dicomweb_url, "the series")
    return uids


def store_datasets(datasets: Sequence, dicomweb_url: str, what: str = "the DICOM objects") -> None:
    """Store datasets through DICOMweb STOW-RS (``<url>/studies``); a one-line ``InputError`` when it fails."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=dicomweb_url.rstrip("/"))
    try:
        client.store_instances(datasets=list(datasets))
    except Exception as exc:
        raise InputError(f"storing {what} failed ({type(exc).__name__}: {str(exc)[:200]})", dicomweb_url) from None


# ----------------------------------------------------------------------------- a local Orthanc
def orthanc_config(work_dir: str | os.PathLike, http_port: int) -> Path:
    work = Path(work_dir)
    (work / "storage").mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "monai_ad",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "storage"),
        "HttpPort": int(http_port),
        "DicomServerEnabled": False,  # DICOMweb needs no DICOM port
        "RemoteAccessAllowed": False,  # Orthanc 1.10 cannot bind to loopback only; this refuses other hosts
        "AuthenticationEnabled": False,
        "Plugins": [ORTHANC_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_orthanc(work_dir: str | os.PathLike, http_port: int, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start Orthanc with DICOMweb on ``http_port``; returns the process and the DICOMweb root URL."""
    exe = shutil.which("Orthanc")
    if exe is None or not Path(ORTHANC_PLUGIN).is_file():
        raise InputError("Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    config = orthanc_config(work_dir, http_port)
    log = open(Path(work_dir) / "orthanc.log", "ab")
    process = subprocess.Popen([exe, str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode}; see {Path(work_dir) / 'orthanc.log'}")
        try:
            with urllib.request.urlopen(base + "/dicom-web/studies", timeout=3):
                return process, base + "/dicom-web"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    process.terminate()
    raise TimeoutError(f"Orthanc did not answer on port {http_port} within {timeout:.0f} s")
