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


# the optional section of studies with no label (normal and abnormal mixed), for detectors that learn from them
UNLABELLED = "unlabelled"


def _read(path: str | os.PathLike) -> tuple[Path, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError("datalist not found", path)
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"is not valid JSON ({exc})", path) from None


def _absolute(path: Path, entries: list) -> list[dict[str, Any]]:
    items = []
    for item in entries:
        item = dict(item)
        for k in (IMAGE, ROI, "label"):
            if isinstance(item.get(k), str):
                item[k] = str((path.parent / item[k]).resolve())
        items.append(item)
    return items


def load_datalist(path: str | os.PathLike, key: str) -> list[dict[str, Any]]:
    """Items of one section of a MONAI datalist JSON, with paths made absolute against the file's folder."""
    path, content = _read(path)
    if not isinstance(content, dict) or not isinstance(content.get(key), list) or not content[key]:
        raise InputError(f"has no non-empty {key!r} list", path)
    return _absolute(path, content[key])


def load_unlabelled(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The datalist's optional ``unlabelled`` section: studies without a lesion label, normal and abnormal mixed
    (DDAD's unlabelled images). Each item is ``{"image": ..., "roi": ...}`` (a liver mask, as every section's; a
    LiTS-style ``label`` may stand in for it, and only its liver is read); paths are made absolute against the
    file's folder. An empty list when the section is missing or empty."""
    path, content = _read(path)
    if not isinstance(content, dict) or content.get(UNLABELLED) in (None, []):
        return []
    entries = content[UNLABELLED]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get(IMAGE), str) for e in entries):
        raise InputError(f"its {UNLABELLED!r} section must be a list of items with an 'image' path", path)
    return _absolute(path, entries)


def unlabelled_count(n_cases: int, fraction: float) -> int:
    """How many of ``n_cases`` (at least 2) a share ``fraction`` of them moves to the unlabelled section: at least
    one, and at least one left behind."""
    return min(n_cases - 1, max(1, int(round(float(fraction) * n_cases))))


def with_unlabelled_section(
    datalist: str | os.PathLike,
    fraction: float,
    seed: int = 0,
    source: str = "test",
    out: str | os.PathLike | None = None,
) -> str:
    """A copy of ``datalist`` whose ``unlabelled`` section holds a seeded share ``fraction`` of the ``source``
    section's cases (at least one), which leave ``source`` (so that nothing is scored that was trained on): each as
    ``{"case_id", "image", "roi"}``, its liver mask being its ``roi`` or else its ``label``; lesion labels and
    "abnormal" flags are dropped. Written to ``out`` (default: ``<name>_unlabelled.json`` beside it, paths relative
    as they were) and returned. For data generated with lesions (the phantoms) this is how a demonstration gets its
    unlabelled studies; ``monai-ad prepare --unlabelled-fraction`` does the same for the real datasets."""
    import numpy as np

    from monai_ad.io import write_json

    path, content = _read(datalist)
    if not 0 < float(fraction) < 1:
        raise InputError(f"the unlabelled fraction must be above 0 and below 1, got {fraction}")
    cases = content.get(source) if isinstance(content, dict) else None
    if not isinstance(cases, list) or len(cases) < 2:
        raise InputError(f"needs a {source!r} section of at least 2 cases to take unlabelled ones from", path)
    target = Path(out) if out is not None else path.with_name(f"{path.stem}_unlabelled.json")
    count = unlabelled_count(len(cases), fraction)
    chosen = set(np.random.default_rng(int(seed)).permutation(len(cases))[:count].tolist())
    moved = [cases[i] for i in sorted(chosen)]
    relocate = target.parent.resolve() != path.parent.resolve()
    unlabelled = []
    for item in moved:
        entry = {k: item[k] for k in ("case_id",) if k in item}
        entry[IMAGE], entry[ROI] = item[IMAGE], roi_source(item)
        if relocate:
            entry = _absolute(path, [entry])[0]
        unlabelled.append(entry)
    kept = [c for i, c in enumerate(cases) if i not in chosen]
    if relocate:
        content = {k: (_absolute(path, v) if isinstance(v, list) and all(isinstance(e, dict) for e in v) else v)
                   for k, v in content.items()}  # fmt: skip
        kept = _absolute(path, kept)
    return str(write_json(target, {**content, source: kept, UNLABELLED: unlabelled}))


def roi_source(item: Mapping[str, Any]) -> Any:
    """A case's liver mask: its ``roi`` entry, else its label (LiTS style: liver + lesion)."""
    return item.get(ROI) or item.get("label")


def case_name(image_path: str | os.PathLike) -> str:
    name = Path(image_path).name
    for suffix in (*VOLUME_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
