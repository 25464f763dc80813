"""DICOM series in a folder datastore: MONAI Label's local datastore lists image files only, so each sub-folder
that holds a DICOM series becomes ``<folder name>.nii.gz`` beside it at start-up (once; the folder is kept). The
NIfTI is read with ITK as the CLI reads series (RAS affine), so label maps saved for it share its geometry."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from monai_ad.io import atomic_path, save_nifti

logger = logging.getLogger(__name__)

SKIPPED = {"labels", "logs", "bin", "model"}


def holds_dicom(folder: Path) -> bool:
    for path in folder.iterdir():
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    f.seek(128)
                    if f.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def convert_dicom_series(studies_dir: str | os.PathLike) -> list[Path]:
    """Write ``<name>.nii.gz`` for every DICOM series sub-folder that has none yet; returns the files written."""
    from monai.transforms import LoadImage

    root = Path(studies_dir)
    if not root.is_dir():
        return []
    written = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in SKIPPED and not p.name.startswith(".")):
        target = root / f"{folder.name}.nii.gz"
        if target.exists() or not holds_dicom(folder):
            continue
        try:
            image = LoadImage(reader="ITKReader", image_only=True)(str(folder))
        except Exception as exc:  # one unreadable series must not stop the server
            logger.warning("cannot read the DICOM series in %s (%s): not served", folder, str(exc).splitlines()[-1][:200])
            continue
        with atomic_path(target) as tmp:
            save_nifti(np.asarray(image), np.asarray(image.affine, dtype=np.float64), tmp)
        logger.info("DICOM series %s served as %s", folder.name, target.name)
        written.append(target)
    return written
