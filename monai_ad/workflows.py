"""Runnable components for MONAI bundle configs (``_target_``): each holds its settings and does its work in
``run()``, so a bundle's ``training`` / ``inference`` / ``evaluating`` id is one expression. Each hands its work
to one library call (``training.train``, ``prediction.infer``, ``evaluation.evaluate``), as the command line does."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.data import Dataset
from monai.transforms import Compose

from monai_ad import distributed
from monai_ad.allocator import keep_freed_memory
from monai_ad.data.datalists import load_datalist, roi_source
from monai_ad.detectors.base import AnomalyDetector
from monai_ad.errors import InputError
from monai_ad.evaluation import evaluate
from monai_ad.prediction import Predictor, infer
from monai_ad.training import train
from monai_ad.transforms.pipeline import IMAGE, ROI

logger = logging.getLogger(__name__)


def _run_by_bundle_command() -> bool:
    """True inside ``python -m monai.bundle ...`` (also under torchrun), where this module's components are the
    whole program."""
    return Path(sys.argv[0]).parts[-2:] == ("bundle", "__main__.py")


@contextlib.contextmanager
def one_line_errors():
    """Bad input ends a ``monai.bundle`` command with one line on stderr and exit code 2, as the ``monai-ad``
    command does; anywhere else (a program, the MONAI Label app) the ``InputError`` goes to the caller."""
    try:
        yield
    except InputError as exc:
        if not _run_by_bundle_command():
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def phantom_datalist(
    dataset_dir: str | os.PathLike, n_normal: int = 6, n_abnormal: int = 3, preset: str = "tiny", seed: int = 0
) -> str:
    """The datalist of a phantom dataset in ``dataset_dir``, written first if it is not there yet."""
    datalist = Path(dataset_dir) / "datalist.json"
    if not datalist.is_file() and distributed.is_main_process():
        from monai_ad.data.phantom import write_phantom_dataset

        logger.info("writing a %s phantom dataset to %s", preset, dataset_dir)
        write_phantom_dataset(dataset_dir, n_normal, n_abnormal, seed=seed, preset=preset, progress=False)
    distributed.barrier()
    return str(datalist)


def volume_dataset(items: Sequence[Mapping[str, Any]], transform: Any = None) -> Dataset:
    """A datalist section's volumes as a MONAI ``Dataset`` of ``{"image", "roi"}`` (the liver mask, or the
    label it comes from): what a bundle's ``dataset`` / ``train_dataset`` property names."""
    return Dataset([{IMAGE: item[IMAGE], ROI: roi_source(item)} for item in items], transform=transform)


def load_detector(path: str | os.PathLike, device: str | torch.device | None = None) -> AnomalyDetector:
    """A trained detector from its file, on ``device`` (the bundle's ``network_def``)."""
    with one_line_errors():
        return AnomalyDetector.load(path, device=device)


class DetectorTrainer:
    """Fit ``detector`` on a datalist's normal volumes, calibrate its thresholds, save it to ``output``."""

    def __init__(
        self,
        detector: AnomalyDetector,
        datalist: str | os.PathLike,
        output: str | os.PathLike,
        preprocessing: Mapping[str, Any] | None = None,
        roi_labels: Sequence[int] | int | None = None,
        quantile: float | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        max_epochs: int | None = None,
    ):
        epochs = int(detector.hparams.get("epochs", 1))
        if max_epochs is not None and int(max_epochs) != epochs:
            raise InputError(f"max_epochs {max_epochs} disagrees with the detector's epochs {epochs}: set network_def#epochs")
        self.max_epochs = epochs  # what MONAI's trainer property reads; the schedule itself is the detector's
        self.detector, self.datalist, self.output = detector, datalist, output
        self.preprocessing, self.roi_labels, self.quantile = preprocessing, roi_labels, quantile
        self.device, self.progress = None if device is None else str(device), progress

    @property
    def dataset(self) -> Dataset:
        """The normal volumes it fits on (the datalist's ``training`` section)."""
        with one_line_errors():
            return volume_dataset(load_datalist(self.datalist, "training"))

    def run(self) -> AnomalyDetector:
        with one_line_errors():
            return self._run()

    def _run(self) -> AnomalyDetector:
        keep_freed_memory()
        Path(self.output).parent.mkdir(parents=True, exist_ok=True)
        detector = train(
            self.detector, self.datalist, self.output, preprocessing=self.preprocessing, roi_labels=self.roi_labels,
            quantile=self.quantile, device=self.device, progress=self.progress,
        )  # fmt: skip
        if distributed.is_main_process():
            logger.info("saved %s to %s (thresholds %s)", detector.name, self.output, detector.thresholds)
        return detector


class BatchInference:
    """Read every volume of a datalist section (or explicit ``images``/``rois``) with the bundle's ``predictor``;
    heatmaps, label maps and summaries go to ``output_dir``."""

    def __init__(
        self,
        predictor: Predictor,
        output_dir: str | os.PathLike,
        datalist: str | os.PathLike | None = None,
        key: str = "test",
        images: Sequence[str] | None = None,
        rois: Sequence[str] | None = None,
        progress: bool = True,
    ):
        self.predictor, self.output_dir, self.progress = predictor, output_dir, progress
        if images is None:
            items = load_datalist(datalist, key)
            images, rois = [item[IMAGE] for item in items], [roi_source(item) for item in items]
        self.images, self.rois = list(images), list(rois or [None] * len(images))

    @property
    def dataset(self) -> Dataset:
        """The volumes it reads, through the predictor's loading and pre-processing."""
        items = [{IMAGE: image, ROI: roi} for image, roi in zip(self.images, self.rois)]
        return volume_dataset(items, Compose(self.predictor.pre_transforms()))

    def run(self) -> list[dict[str, Any]]:
        with one_line_errors():
            return self._run()

    def _run(self) -> list[dict[str, Any]]:
        keep_freed_memory()
        results = infer(self.predictor, self.images, self.rois, self.output_dir, progress=self.progress)
        return [r.summary for r in results]


class DetectorEvaluator:
    """Metrics (JSON, CSV) and the PNG report of a trained detector on a labelled datalist section."""

    def __init__(
        self,
        network: AnomalyDetector,
        datalist: str | os.PathLike,
        output_dir: str | os.PathLike,
        key: str = "test",
        roi_labels: Sequence[int] | int | None = None,
        progress: bool = True,
    ):
        self.network, self.datalist, self.output_dir, self.key, self.progress = network, datalist, output_dir, key, progress
        self.roi_labels = roi_labels
        with one_line_errors():
            self.predictor = Predictor(network, roi_labels=roi_labels)

    @property
    def inferer(self):
        """How it scores a pre-processed volume (its predictor's slice inferer)."""
        return self.predictor.inferer

    @property
    def dataset(self) -> Dataset:
        """The labelled volumes it measures (the datalist's ``key`` section)."""
        with one_line_errors():
            return volume_dataset(load_datalist(self.datalist, self.key))

    def run(self) -> dict[str, Any]:
        with one_line_errors():
            return self._run()

    def _run(self) -> dict[str, Any]:
        keep_freed_memory()
        values = evaluate(self.predictor, self.datalist, self.output_dir, key=self.key, progress=self.progress)
        logger.info("metrics: %s", {k: v for k, v in values.items() if isinstance(v, float)})
        return values
