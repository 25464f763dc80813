"""Command-line values: ``KEY=VALUE`` pairs, volume folders, and the checks every option passes before any work."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai_ad.errors import InputError


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_values(pairs: Sequence[str] | None, what: str) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"{what} must be KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def roi_labels(values: Sequence[int] | None):
    return None if not values else list(values)


def volumes_in(path: Path) -> list[Path]:
    """A file, a DICOM series folder, or a folder of volumes (files, or one sub-folder per DICOM series)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError("not found", path)
    from monai_ad.io import VOLUME_SUFFIXES

    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))
    if files:
        return files
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if subdirs:
        return subdirs
    if any(p.is_file() for p in path.iterdir()):
        return [path]  # a DICOM series folder
    raise InputError("folder holds no volumes", path)


def match_rois(images: list[Path], roi: Path | None) -> list[Path | None]:
    if roi is None:
        return [None] * len(images)
    if roi.is_file() or len(images) == 1:
        return [roi] * len(images)
    if not roi.is_dir():
        raise InputError("not found", roi)
    from monai_ad.data.datalists import case_name

    masks = {case_name(p): p for p in volumes_in(roi)}
    missing = [str(p) for p in images if case_name(p) not in masks]
    if missing:
        raise InputError(f"no mask with the same name for {len(missing)} image(s), e.g. {missing[0]}", roi)
    return [masks[case_name(p)] for p in images]


def check_writable(path: str | os.PathLike, what: str, is_file: bool = False) -> None:
    """``path`` (a folder, or with ``is_file`` a file) can be written: not the wrong kind of thing, and its nearest
    existing folder accepts a new file. Nothing is created."""
    path = Path(path)
    if is_file and path.is_dir():
        raise InputError(f"{what} is a folder; give the file to write", path)
    if not is_file and path.exists() and not path.is_dir():
        raise InputError(f"{what} is a file, not a folder", path)
    existing = path.parent if is_file else path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} cannot be created: {existing} is a file, not a folder", path)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"{what} is not writable ({exc.strerror or exc})", path) from None


def check_range(what: str, value: Any, low: float | None = None, high: float | None = None, open_ends: bool = False) -> None:
    """A numeric option within ``[low, high]`` (``(low, high)`` with ``open_ends``); None (not given) passes."""
    if value is None:
        return
    below = low is not None and (value <= low if open_ends else value < low)
    above = high is not None and (value >= high if open_ends else value > high)
    if not math.isfinite(value) or below or above:
        if low is not None and high is not None:
            bounds = f"between {low:g} and {high:g}" + (" (exclusive)" if open_ends else "")
        elif low is not None:
            bounds = f"{'above' if open_ends else 'at least'} {low:g}"
        else:
            bounds = "a finite number"
        raise InputError(f"{what} must be {bounds}, got {value:g}")


OUT_IS_FILE = {"train"}  # --out names a file (the model); for every other command a folder


def check_options(args: argparse.Namespace) -> None:
    """The options every command takes, checked before it starts work (one line each, exit 2)."""
    if getattr(args, "out", None):
        check_writable(args.out, "--out", is_file=args.command in OUT_IS_FILE)
    if getattr(args, "repaired", None):
        check_writable(args.repaired, "--repaired")
    for label in getattr(args, "roi_label", None) or []:
        if label <= 0:
            raise InputError(f"--roi-label must be a positive label value (0 is the background), got {label}")
    check_range("--quantile", getattr(args, "quantile", None), 0.0, 1.0, open_ends=True)
    check_range("--threshold", getattr(args, "threshold", None))
    check_range("--slice-threshold", getattr(args, "slice_threshold", None))
    check_range("--min-lesion-mm3", getattr(args, "min_lesion_mm3", None), 0.0)
    check_range("--validation-fraction", getattr(args, "validation_fraction", None), 0.0, 1.0, open_ends=True)
    for name in ("normal", "abnormal", "phantom_anomalies"):
        check_range(f"--{name.replace('_', '-')}", getattr(args, name, None), 0)
    check_range("--epochs", getattr(args, "epochs", None), 1)
    check_range("--folds", getattr(args, "folds", None), 2)
    if args.command in ("phantom", "demo"):
        from monai_ad.data.phantom import PRESETS

        if args.preset not in PRESETS:
            raise InputError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")


def check_detector_options(
    detector: str, hparams: Mapping[str, Any], preprocessing: Mapping[str, Any] | None = None, grid: Mapping[str, list] | None = None
) -> None:
    """Hyper-parameters (``--set``, a config's ``hparams``, each ``--grid`` value) and pre-processing options, checked
    against the detector's constructor and the accepted ranges before any data is read or model fitted."""
    from monai_ad.detectors.base import check_hparams, detector_class
    from monai_ad.transforms.pipeline import PreprocessConfig

    check_hparams(detector, hparams)
    for key, values in (grid or {}).items():
        for value in values:
            check_hparams(detector, {**hparams, key: value})
    PreprocessConfig.with_defaults(detector_class(detector).default_preprocessing, preprocessing)


def grid_values(pairs: Sequence[str] | None) -> dict[str, list[Any]]:
    """``--grid KEY=V1,V2`` (each value read as JSON when it parses) or ``--grid KEY=[JSON list]``."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--grid must be KEY=V1,V2,..., got {pair!r}")
        key, text = (s.strip() for s in pair.split("=", 1))
        if text.startswith("["):
            values = parse_value(text)
            if not isinstance(values, list):
                raise InputError(f"--grid {key}: not a JSON list: {text!r}")
        else:
            values = [parse_value(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise InputError(f"--grid {key} has no values")
        grid[key] = values
    return grid


def detector_settings(args: argparse.Namespace, default: str, grid: Mapping[str, list] | None = None) -> tuple[str, dict, dict]:
    """A command's detector, hyper-parameters and pre-processing options, checked before any work: the detector from
    ``--detector``, else the ``--config`` file's, else ``default``; hyper-parameters from its ``--schedule`` (where the
    command has one; else the config's ``schedule``), under the config's ``hparams``, under ``--set`` (and ``--backbone`` / ``--weights`` /
    ``--allow-random-weights`` where given); pre-processing from the config's, under ``--preprocess``."""
    from monai_ad.detectors.base import detector_class
    from monai_ad.run_config import load_run_config

    config = load_run_config(getattr(args, "config", None))
    detector = getattr(args, "detector", None) or config.get("detector", default)
    schedule_name = getattr(args, "schedule", None) or config.get("schedule")
    schedule = detector_class(detector).schedule(schedule_name) if schedule_name else {}
    hparams = {**schedule, **config.get("hparams", {}), **key_values(getattr(args, "set", None), "--set")}
    for option in ("backbone", "weights", "allow_random_weights"):
        if getattr(args, option, None):
            hparams[option] = getattr(args, option)
    preprocessing = {**config.get("preprocessing", {}), **key_values(getattr(args, "preprocess", None), "--preprocess")}
    check_detector_options(detector, hparams, preprocessing, grid)
    return detector, hparams, preprocessing
