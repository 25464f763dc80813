"""How the app reads a datastore: where a study's liver ROI comes from, which studies are normal, which labels a
radiologist corrected.

Conventions (the same for a local folder and for DICOMweb):

- **Liver ROI**: the study's label saved with tag ``liver`` (a folder datastore keeps it as
  ``<studies>/labels/liver/<image id>.nii.gz``), else a file ``<roi_dir>/<image id>.nii.gz`` when the app runs with
  ``--conf roi_dir <folder>`` (an ROI source for DICOMweb stores, named by SeriesInstanceUID). Any non-zero voxel
  is liver unless ``roi_label`` names the liver's value (5 for a TotalSegmentator organ map).
- **Normal study**: image info ``{"normal": true}`` (``PUT /datastore/image/info`` or ``upload_image(...,
  params={"normal": true})``), or a ``final`` label that holds no anomaly voxel: a radiologist looked and found
  nothing.
- **Corrected case**: any study with a ``final`` label (1 = anomaly); these drive the operating threshold. With
  DICOMweb, the labels saved through this server count (MONAI Label keeps a NIfTI copy in its cache beside the
  DICOM SEG it stores).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from monai_ad.io import VOLUME_SUFFIXES
from monai_ad.label_server import LIVER_TAG

logger = logging.getLogger(__name__)

FINAL_TAG = DefaultLabelTag.FINAL.value
ANOMALY_NAMES = {"anomaly": 1}


@dataclass
class Study:
    image_id: str
    roi: str | None  # liver mask file
    final: str | None  # corrected anomaly label file
    datastore: Datastore = field(repr=False)

    @cached_property
    def image(self) -> str:
        """A file the pipeline can read (a DICOMweb store downloads the series only now, when it is needed)."""
        return self.datastore.get_image_uri(self.image_id)


def _label_uri(datastore: Datastore, image_id: str, tag: str) -> str | None:
    try:
        label_id = datastore.get_label_by_image_id(image_id, tag)
        if isinstance(datastore, DICOMWebDatastore):
            # the NIfTI kept in the local cache when the label was saved through this server (its DICOMweb
            # lookup expects the SEG's own series UID, which the image does not give)
            uri = LocalDatastore.get_label_uri(datastore, label_id, tag) if label_id else ""
        else:
            uri = datastore.get_label_uri(label_id, tag) if label_id else ""
    except Exception as exc:  # a remote store may not know the tag at all
        logger.debug("no %s label for %s: %s", tag, image_id, exc)
        return None
    return uri if uri and os.path.exists(uri) else None


def liver_roi(datastore: Datastore | None, image_id: str, roi_dir: str | None = None) -> str | None:
    """The liver mask of a study: its ``liver`` label, else ``<roi_dir>/<image id>.nii[.gz]``, else None."""
    if datastore is not None and image_id:
        uri = _label_uri(datastore, image_id, LIVER_TAG)
        if uri:
            return uri
    if roi_dir and image_id:
        for suffix in VOLUME_SUFFIXES:
            candidate = Path(roi_dir) / f"{image_id}{suffix}"
            if candidate.is_file():
                return str(candidate)
    return None


def label_is_empty(path: str | os.PathLike) -> bool:
    return not bool(np.any(np.asarray(nib.load(str(path)).dataobj) > 0))


def is_marked_normal(datastore: Datastore, image_id: str, final: str | None) -> bool:
    try:
        info: dict[str, Any] = datastore.get_image_info(image_id) or {}
    except Exception:
        info = {}
    if str(info.get("normal", "")).lower() in ("true", "1", "yes"):
        return True
    if final is None:
        return False
    try:
        return label_is_empty(final)
    except Exception as exc:  # a torn or foreign file: reported, and this study is left out
        logger.warning("the 'final' label of %s cannot be read (%s): study not counted as normal", image_id, type(exc).__name__)
        return False


def studies(datastore: Datastore, roi_dir: str | None = None) -> list[Study]:
    """Every study of the datastore with its ROI and ``final`` label (either may be None)."""
    return [
        Study(image_id, liver_roi(datastore, image_id, roi_dir), _label_uri(datastore, image_id, FINAL_TAG), datastore)
        for image_id in datastore.list_images()
    ]


def normal_studies(datastore: Datastore, roi_dir: str | None = None) -> list[Study]:
    """Studies marked normal that have a liver ROI (those without one are logged and skipped)."""
    chosen = []
    for study in studies(datastore, roi_dir):
        if not is_marked_normal(datastore, study.image_id, study.final):
            continue
        if study.roi is None:
            logger.warning("normal study %s has no liver ROI (label tag %r): skipped", study.image_id, LIVER_TAG)
            continue
        chosen.append(study)
    return chosen


def unlabelled_studies(datastore: Datastore, roi_dir: str | None = None) -> list[Study]:
    """Studies with a liver ROI that are not marked normal (reviewed or not): the normal and abnormal mix that a
    detector learning from unlabelled studies (DDAD) takes beside the normals."""
    return [s for s in studies(datastore, roi_dir)
            if s.roi is not None and not is_marked_normal(datastore, s.image_id, s.final)]  # fmt: skip


def corrected_studies(datastore: Datastore, roi_dir: str | None = None) -> list[Study]:
    """Studies with a ``final`` label and a liver ROI."""
    return [s for s in studies(datastore, roi_dir) if s.final is not None and s.roi is not None]
