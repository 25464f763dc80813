"""Training: fit a detector on normal volumes, calibrate its thresholds, save it; and the device it runs on."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import torch

from monai_ad import distributed
from monai_ad.calibration import calibrate_on_scans
from monai_ad.data.datalists import load_datalist, load_unlabelled, roi_source
from monai_ad.data.slices import SliceBatches, collect_slices
from monai_ad.detectors.base import AnomalyDetector, create_detector, detector_class
from monai_ad.errors import InputError
from monai_ad.transforms.pipeline import IMAGE, PreprocessConfig

logger = logging.getLogger(__name__)


def train(
    detector: str | AnomalyDetector,
    datalist: str | os.PathLike,
    output: str | os.PathLike,
    hparams: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    roi_labels: Sequence[int] | int | None = None,
    quantile: float | None = None,
    device: str | None = None,
    progress: bool = True,
    false_regions_per_scan: float = 1.0,
    use_unlabelled: bool = True,
) -> AnomalyDetector:
    """Fit a detector on the datalist's ``training`` normals, set thresholds on its ``validation`` normals
    (or on a held-out fifth of the training volumes when there is none), save it to ``output``.

    A detector that learns from unlabelled studies (``uses_unlabelled``, e.g. DDAD) is also given the datalist's
    ``unlabelled`` section when it has one (``load_unlabelled``) and ``use_unlabelled`` is left on; other detectors
    never read it.

    The operating thresholds allow about ``false_regions_per_scan`` false alarms per normal validation scan
    (``AnomalyDetector.calibrate``); ``quantile`` sets them as a plain quantile of normal slices instead. The
    validation scans are then read whole, as inference reads a scan, for the conformal calibration behind p-values
    and operating points at a target false-alarm rate (``monai_ad.calibration.calibrate_on_scans``)."""
    kind = type(detector) if isinstance(detector, AnomalyDetector) else detector_class(detector)
    config = detector_preprocessing(kind, preprocessing)
    detector = detector_for(detector, config, hparams).to(resolve_device(device))
    config.image_size = detector.image_size
    training = load_datalist(datalist, "training")
    unlabelled = load_unlabelled(datalist)
    try:
        validation = load_datalist(datalist, "validation")
    except InputError:
        n_hold = max(1, len(training) // 5) if len(training) > 1 else 0
        validation, training = training[:n_hold], training[n_hold:] or training
    train_slices = collect_slices(distributed.shard(training), config, roi_labels, progress, desc="training volumes")
    unlabelled_slices = None
    if unlabelled and not (detector.uses_unlabelled and use_unlabelled):
        logger.info("%s: the datalist's %d unlabelled studies are not used", detector.name, len(unlabelled))
    elif unlabelled and (mine := distributed.shard(unlabelled)):
        try:  # studies a hospital has in abundance: one that cannot be read is left out, not the whole training
            unlabelled_slices = collect_slices(mine, config, roi_labels, progress, desc="unlabelled volumes",
                                               skip_unreadable=True)  # fmt: skip
        except InputError as exc:
            logger.warning("%s: no unlabelled study could be used (%s); fitting on the normals only", detector.name, exc)
    valid_slices = functools.partial(collect_slices, validation, config, roi_labels, progress, desc="validation volumes")
    fit_and_calibrate(
        detector, train_slices, valid_slices, config, quantile=quantile,
        false_regions_per_scan=false_regions_per_scan, n_scans=len(validation), progress=progress,
        unlabelled_slices=unlabelled_slices,
    )  # fmt: skip
    if validation and distributed.is_main_process():  # the held-out normal scans once more, whole, as inference reads them
        from monai_ad.prediction import Predictor

        scans = [(item[IMAGE], roi_source(item)) for item in validation]
        detector.thresholds["conformal"] = calibrate_on_scans(Predictor(detector, roi_labels=roi_labels), scans, progress)
    if distributed.is_main_process():
        detector.save(output)
    distributed.barrier()
    return detector


def detector_preprocessing(
    detector: str | type[AnomalyDetector], preprocessing: Mapping[str, Any] | None, image_size: int | None = None
) -> PreprocessConfig:
    """The pipeline settings a detector is fitted and scored with: ``preprocessing`` over its defaults."""
    kind = detector_class(detector) if isinstance(detector, str) else detector
    config = PreprocessConfig.with_defaults(kind.default_preprocessing, preprocessing)
    if image_size is not None:
        config.image_size = int(image_size)
    return config


def detector_for(
    detector: str | AnomalyDetector, config: PreprocessConfig, hparams: Mapping[str, Any] | None = None
) -> AnomalyDetector:
    """``detector`` (a registry name, built with ``hparams``, or a detector) taking the slices ``config`` makes."""
    if isinstance(detector, str):
        detector = create_detector(detector, **{"in_channels": config.in_channels, **dict(hparams or {})})
    if detector.in_channels != config.in_channels:
        raise InputError(
            f"the {detector.name} detector takes {detector.in_channels}-channel slices but the pre-processing gives "
            f"{config.in_channels} (set the detector's in_channels to match)"
        )
    return detector


def fit_and_calibrate(
    detector: AnomalyDetector,
    train_slices: Mapping[str, torch.Tensor],
    valid_slices: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]],
    config: PreprocessConfig,
    quantile: float | None = None,
    false_regions_per_scan: float = 1.0,
    n_scans: int | None = None,
    progress: bool = True,
    unlabelled_slices: Mapping[str, torch.Tensor] | None = None,
) -> AnomalyDetector:
    """The one fitting path (``train``, ``select``, the bundles, the app and the benchmarks): fit on the normal
    ``train_slices`` with the pipeline settings that made them, then set the operating thresholds on the
    held-out normal ``valid_slices`` (or a function that collects them, called after fitting), and keep the
    ``scan_profiles`` of both (``collect_slices``) as the model's ``normal_profiles``. ``unlabelled_slices``
    (slices of unlabelled studies) go to a detector that learns from them (``AnomalyDetector.uses_unlabelled``)."""
    logger.info("fitting %s on %d normal slices", detector.name, train_slices["image"].shape[0])
    batch_size = int(detector.hparams.get("batch_size", 16))
    extra = {}
    if unlabelled_slices is not None:
        logger.info("%s: also %d unlabelled slices", detector.name, unlabelled_slices["image"].shape[0])
        extra["unlabelled"] = SliceBatches(unlabelled_slices, batch_size=batch_size)
    batches = SliceBatches(train_slices, batch_size=batch_size)
    detector.fit(batches, progress=progress, preprocessing=config.to_dict(), **extra)
    valid = valid_slices() if callable(valid_slices) else valid_slices
    detector.calibrate(
        SliceBatches(valid, batch_size=32), quantile=quantile,
        false_regions_per_scan=false_regions_per_scan, n_scans=n_scans,
    )  # fmt: skip
    profiles = [*train_slices.get("scan_profiles", []), *valid.get("scan_profiles", [])]
    if profiles:  # what the normals' scans are like, for warnings on scans unlike them (monai_ad.calibration)
        detector.thresholds["normal_profiles"] = profiles
    return detector


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``: this process's GPU when there is one (under torchrun, the one for its local rank), else the CPU."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
