"""Datalists: MONAI datalist JSON files, the cases they list, and each case's liver mask."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from monai_ad.errors import InputError
from monai_ad.io import VOLUME_SUFFIXES
from monai_ad.transforms.pipeline import IMAGE, ROI

LESION_LABEL = 2  # LiTS convention: 0 background, 1 liver, 2 lesion


def load_datalist(path: str | os.PathLike, key: str) -> list[dict[str, Any]]:
    """Items of one section of a MONAI datalist JSON, with paths made absolute against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError("datalist not found", path)
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"is not valid JSON ({exc})", path) from None
    if not isinstance(content, dict) or not isinstance(content.get(key), list) or not content[key]:
        raise InputError(f"has no non-empty {key!r} list", path)
    items = []
    for item in content[key]:
        item = dict(item)
        for k in (IMAGE, ROI, "label"):
            if isinstance(item.get(k), str):
                item[k] = str((path.parent / item[k]).resolve())
        items.append(item)
    return items


def roi_source(item: Mapping[str, Any]) -> Any:
    """A case's liver mask: its ``roi`` entry, else its label (LiTS style: liver + lesion)."""
    return item.get(ROI) or item.get("label")


def case_name(image_path: str | os.PathLike) -> str:
    name = Path(image_path).name
    for suffix in (*VOLUME_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
