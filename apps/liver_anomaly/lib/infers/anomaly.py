"""One anomaly detector bundle as a MONAI Label infer task.

The bundle's ``configs/inference.json`` supplies the components (pre-processing, slice inferer, post-processing);
this task only feeds them a request: the study's CT and liver ROI in, a label map (1 = ``anomaly``) in the
image's geometry out, with per-slice scores, abnormal slices and lesions in the result params. Registered as a
segmentation task, so the 3D Slicer plugin lists it and names the segment from ``label_names``.

Request params (all optional; Slicer shows them as the model's config): ``pixel_threshold`` and
``slice_threshold`` (empty: the model's stored operating point), ``min_lesion_mm3``, ``roi_label`` (the liver's
value in the ROI; empty: any non-zero voxel).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from monai.bundle import ConfigParser
from monai.transforms import MapTransform, SqueezeDimd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monai_ad.detectors.base import AnomalyDetector
from monai_ad.errors import InputError
from monai_ad.postprocess import MIN_LESION_MM3

from lib.studies import ANOMALY_NAMES

logger = logging.getLogger(__name__)

COMPONENTS = "_anomaly_components"  # per-request components, carried in the data dict between stages
OPTIONS = {"pixel_threshold": "", "slice_threshold": "", "min_lesion_mm3": MIN_LESION_MM3, "roi_label": ""}


def _number(value: Any, name: str, kind: Callable = float) -> Any:
    """A request option: None when empty, else a number (a clear error otherwise)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InputError(f"option {name} must be a number, got {value!r}") from None


def bundle_components(bundle: str | os.PathLike, network: AnomalyDetector, options: dict | None = None) -> dict[str, Any]:
    """A bundle's inference components around a loaded detector, with the request's options applied."""
    options = options or {}
    parser = ConfigParser()
    parser.read_config(Path(bundle) / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    parser["network_def"] = network
    roi_label = _number(options.get("roi_label"), "roi_label", int)
    if roi_label is not None:
        parser["roi_labels"] = [roi_label]
    post = parser["postprocessing"]
    for key in ("pixel_threshold", "slice_threshold", "min_lesion_mm3"):
        value = _number(options.get(key), key)
        if value is not None and key in post:
            post[key] = value
            if key == "pixel_threshold" and "extent_threshold" in post:
                post["extent_threshold"] = None  # a threshold set by hand outlines regions at itself, as in the CLI
    parser.parse()
    return {
        "network": network,
        **{key: parser.get_parsed_content(key) for key in ("preprocessing", "inferer", "postprocessing")},
    }


class SummaryToResultd(MapTransform):
    """Put the post-processing's ``anomaly_summary`` (slice scores, abnormal slices, lesions) and the model's
    operating point into ``result``, the params MONAI Label returns beside the label file."""

    def __init__(self, summary_key: str = "anomaly_summary", result_key: str = "result", extra: dict | None = None):
        super().__init__(keys=[summary_key])
        self.summary_key, self.result_key, self.extra = summary_key, result_key, dict(extra or {})

    def __call__(self, data):
        d = dict(data)
        d[self.result_key] = {**dict(d.get(self.result_key) or {}), **d.pop(self.summary_key), **self.extra}
        d.pop("heatmap", None)  # the label map is the answer; the float heatmap stays on the server
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

    def _components(self, data: dict) -> dict[str, Any]:
        """The bundle's components for this request (built once per request, cached in ``data``)."""
        if COMPONENTS not in data:
            network = self._get_network(data.get("device", "cpu"), data)
            data[COMPONENTS] = bundle_components(self.bundle, network, data)
        return data[COMPONENTS]

    # ------------------------------------------------------------------ what BasicInferTask runs
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return list(self._components(data)["preprocessing"].transforms)

    def inferer(self, data=None):
        return self._components(data)["inferer"]

    def inverse_transforms(self, data=None):
        return None  # Invertd is part of the bundle's post-processing

    def post_transforms(self, data=None) -> Sequence[Callable]:
        components = self._components(data)
        network = components["network"]
        extra = {
            "detector": network.name,
            "bundle": self.bundle.name,
            "model": {"path": str(self.get_path()), "modified": os.path.getmtime(self.get_path())},
            "operating_point": network.thresholds,
        }
        # the label map without its channel: MONAI Label's writer expects a 3-D array
        return [*components["postprocessing"].transforms, SummaryToResultd(extra=extra), SqueezeDimd(self.output_label_key, dim=0)]

    def writer(self, data, extension=None, dtype=None):
        data.pop(COMPONENTS, None)
        return super().writer(data, extension, dtype)
