"""One anomaly detector bundle as a MONAI Label infer task.

Each request is read by a ``monai_ad.prediction.Predictor`` (the one the command line and the bundle's own
``inference`` run use), built from the model with the settings the bundle's ``configs/inference.json`` gives its
``predictor`` and the request's options; its stages are what ``BasicInferTask`` runs. The study's CT and liver
ROI in, a label map (1 = ``anomaly``) in the image's geometry out, with per-slice scores, abnormal slices and
lesions in the result params. Registered as a segmentation task, so the 3D Slicer plugin lists it and names the
segment from ``label_names``.

Request params (all optional; Slicer shows them as the model's config): ``pixel_threshold`` and
``slice_threshold`` (empty: the model's stored operating point), or ``false_alarm_rate`` (the share of normal
studies allowed to raise an alarm: the thresholds from the model's conformal calibration), ``min_lesion_mm3``,
``roi_label`` (the liver's value in the ROI; empty: any non-zero voxel). The result holds the study score, its
conformal p-value, each region's p-value and diameter, and warnings when the study is unlike the model's normals.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import MapTransform, SqueezeDimd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monai_ad.detectors.base import AnomalyDetector
from monai_ad.dicom_results import build_results, model_version, read_source_series
from monai_ad.dicomweb import store_datasets
from monai_ad.errors import InputError
from monai_ad.postprocess import MIN_LESION_MM3
from monai_ad.prediction import Predictor, VolumeResult, calibration_record
from monai_ad.settings import Range, check_setting

from lib.studies import ANOMALY_NAMES

logger = logging.getLogger(__name__)

PREDICTOR = "_anomaly_predictor"  # the request's predictor, carried in the data dict between stages
DICOM_SERIES, DICOM_STORE = "dicom_series", "dicom_store"  # set by the app for a study of a DICOMweb store
BUNDLE_SETTINGS = ("roi_labels", "min_lesion_mm3", "batch_size")  # what a bundle's inference.json may set
OPTIONS = {"pixel_threshold": "", "slice_threshold": "", "false_alarm_rate": "", "min_lesion_mm3": MIN_LESION_MM3, "roi_label": ""}


# the request options' accepted values: thresholds are heatmap scores (any finite number; a client may set one far
# below the model's to outline everything), a region's smallest volume lies between nothing and a whole liver
OPTION_RANGES = {
    "pixel_threshold": Range(-1e12, 1e12),
    "slice_threshold": Range(-1e12, 1e12),
    "false_alarm_rate": Range(1e-6, 0.999),  # a share of normal studies: the conformal operating point instead of thresholds
    "min_lesion_mm3": Range(0.0, 1e7),
    "roi_label": Range(0, 65535, integer=True),
}


def _number(value: Any, name: str) -> Any:
    """A request option: None when empty, else a finite number in ``OPTION_RANGES[name]`` (an ``InputError``
    naming the option otherwise)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"option {name} must be a number, got {value[:40]!r}") from None
    return check_setting(name, value, OPTION_RANGES, "infer option")


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The request's numeric options, parsed and range-checked (empty ones left out)."""
    checked = {key: _number(options.get(key), key) for key in OPTION_RANGES}
    return {key: value for key, value in checked.items() if value is not None}


def bundle_settings(bundle: str | os.PathLike) -> dict[str, Any]:
    """The predictor settings the bundle's ``configs/inference.json`` states (its ``predictor`` entry; the model
    itself is not loaded). Read again only when the file changes."""
    config = Path(bundle) / "configs" / "inference.json"
    return dict(_bundle_settings(str(config), os.stat(config).st_mtime_ns))


@functools.lru_cache(maxsize=32)
def _bundle_settings(config: str, stamp: int) -> dict[str, Any]:
    parser = ConfigParser()
    parser.read_config(config)
    parser["bundle_root"] = str(Path(config).parents[1])
    stated = parser.get("predictor") or {}
    return {key: parser.get_parsed_content(f"predictor#{key}") for key in BUNDLE_SETTINGS if key in stated}


def bundle_predictor(bundle: str | os.PathLike, network: AnomalyDetector, options: dict | None = None) -> Predictor:
    """The predictor for one request: the loaded detector, the bundle's settings, the request's options
    (``pixel_threshold``, ``slice_threshold``, ``min_lesion_mm3``, ``roi_label``; empty: not set)."""
    options = options or {}
    settings = bundle_settings(bundle)
    checked = check_options(options)
    if "roi_label" in checked:
        settings["roi_labels"] = [checked.pop("roi_label")]
    settings.update(checked)
    return Predictor(network, **settings)


class SummaryToResultd(MapTransform):
    """Put the post-processing's ``anomaly_summary`` (slice scores, abnormal slices, lesions) and the model's
    operating point into ``result``, the params MONAI Label returns beside the label file."""

    def __init__(self, summary_key: str = "anomaly_summary", result_key: str = "result", extra: dict | None = None):
        super().__init__(keys=[summary_key])
        self.summary_key, self.result_key, self.extra = summary_key, result_key, dict(extra or {})

    def __call__(self, data):
        d = dict(data)
        # the summary holds the study's place on the triage worklist: its study score and (calibrated) p-value
        d[self.result_key] = {**dict(d.get(self.result_key) or {}), **d.pop(self.summary_key), **self.extra}
        d.pop("heatmap", None)  # the label map is the answer; the float heatmap stays on the server
        return d


class StoreDicomResultsd(MapTransform):
    """For a study of a DICOMweb store (``dicom_series``: its cached DICOM folder; ``dicom_store``: the store's
    DICOMweb root, both set by the app, never by a client): the reading as DICOM SEG, Parametric Map and TID 1500
    SR (``monai_ad.dicom_results``), stored back to the store, their UIDs in the result params under
    ``dicom_results``. A failure is logged and reported there; the label map is returned all the same."""

    def __init__(self, detector: str, model_path: str, summary_key: str = "anomaly_summary", result_key: str = "result"):
        super().__init__(keys=[summary_key])
        self.detector, self.model_path, self.summary_key, self.result_key = detector, model_path, summary_key, result_key

    def __call__(self, data):
        d = dict(data)
        series, store = d.get(DICOM_SERIES), d.get(DICOM_STORE)
        if not (series and store):
            return d
        try:
            heatmap = d["heatmap"]
            result = VolumeResult(
                Path(series).name, torch.as_tensor(heatmap)[0].detach().cpu().numpy(),
                torch.as_tensor(d["pred"])[0].detach().cpu().numpy().astype("uint8"), np.asarray(heatmap.affine, dtype=np.float64),
                {"detector": self.detector, **d[self.summary_key]},
            )  # fmt: skip
            results = build_results(read_source_series(series), result, model_version(self.model_path))
            store_datasets(list(results.datasets().values()), store, "the DICOM results")
            stored = {kind: {"SeriesInstanceUID": str(ds.SeriesInstanceUID), "SOPInstanceUID": str(ds.SOPInstanceUID)}
                      for kind, ds in results.datasets().items()}  # fmt: skip
            logger.info("DICOM results stored: %s", ", ".join(stored))
        except Exception as exc:  # the label map still goes back to the client; the params say what failed
            logger.warning("DICOM results not stored: %s", exc)
            stored = {"error": str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}
        d[self.result_key] = {**dict(d.get(self.result_key) or {}), "dicom_results": stored}
        return d


class AnomalyInfer(BasicInferTask):
    """Infer task over one bundle; the model file is reloaded whenever training replaces it."""

    def __init__(
        self, bundle: str | os.PathLike, model_paths: Sequence[str], description: str, defaults: dict | None = None, **kwargs: Any
    ):
        super().__init__(
            path=list(model_paths),  # the last existing path wins: the app's trained model over the bundle's own
            network=None,
            type=InferType.SEGMENTATION,
            labels=dict(ANOMALY_NAMES),
            dimension=3,
            description=description,
            config={**OPTIONS, **dict(defaults or {}), "result_extension": ".nii.gz", "result_dtype": "uint8"},
            **kwargs,
        )
        self.bundle = Path(bundle)
        self._lock = threading.Lock()

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        """Refuse a request's out-of-range options before it is queued (an ``InputError``)."""
        check_options(options)

    # ------------------------------------------------------------------ the model, reloaded when its file changes
    def _get_network(self, device, data):
        path = self.get_path()
        if not path:
            raise InputError(f"{self.bundle.name} has no trained model yet: train it first (POST /train/{self.bundle.name})")
        stamp = os.stat(path).st_mtime_ns
        with self._lock:
            cached = self._networks.get(str(device))
            if cached is None or cached[1] != stamp:
                if cached is not None:
                    logger.info("model file %s changed: reloading", path)
                self._networks[str(device)] = (AnomalyDetector.load(path, device=device), stamp)
            return self._networks[str(device)][0]

    def _predictor(self, data: dict) -> Predictor:
        """The request's predictor (built once per request, cached in ``data``)."""
        if PREDICTOR not in data:
            network = self._get_network(data.get("device", "cpu"), data)
            data[PREDICTOR] = bundle_predictor(self.bundle, network, data)
        return data[PREDICTOR]

    # ------------------------------------------------------------------ what BasicInferTask runs: the predictor's stages
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return self._predictor(data).pre_transforms()

    def inferer(self, data=None):
        return self._predictor(data).inferer

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        with torch.no_grad():
            return self._predictor(data).score(data)

    def inverse_transforms(self, data=None):
        return None  # the predictor's post transforms take the maps back to the scan's geometry

    def post_transforms(self, data=None) -> Sequence[Callable]:
        predictor = self._predictor(data)
        network = predictor.detector
        extra = {
            "detector": network.name,
            "bundle": self.bundle.name,
            "model": {"path": str(self.get_path()), "modified": os.path.getmtime(self.get_path())},
            "operating_point": {**calibration_record(network.thresholds), **(predictor.operating_point or {})},
        }
        # the label map without its channel: MONAI Label's writer expects a 3-D array
        store = StoreDicomResultsd(network.name, str(self.get_path()))
        return [*predictor.post_transforms(), store, SummaryToResultd(extra=extra), SqueezeDimd(self.output_label_key, dim=0)]

    def writer(self, data, extension=None, dtype=None):
        data.pop(PREDICTOR, None)
        return super().writer(data, extension, dtype)
