"""Fit a bundle's detector on the studies a user marked normal in the datastore.

MONAI Label runs ``/train/<model>`` in a child process and streams its output into the server log and the
``/train`` status (``details``: the last lines), so progress is logged line by line here. The bundle's
``configs/train.json`` supplies the detector and its hyper-parameters; the request may set the named
hyper-parameters of ``HYPER_PARAMETERS`` that the bundle has, as typed, range-checked plain values (e.g.
``{"network_def#image_size": 64}``); the server checks a request before a training process starts. The model is written atomically to the path the
infer task serves, which reloads it on its next request (no restart).

A detector that learns from unlabelled studies (DDAD) also gets every study with a liver ROI that is not marked
normal. After fitting, when corrected studies exist (``final`` labels), the operating threshold is chosen on them
(``lib.scoring.feedback_threshold``) unless the request says ``select_threshold: false``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from monai_ad.detectors.base import detector_class
from monai_ad.errors import InputError
from monai_ad.io import write_json
from monai_ad.settings import HPARAM_RANGES, PREPROCESS_RANGES, Range, check_setting

from lib import studies as study_rules

logger = logging.getLogger(__name__)

MIN_NORMAL_STUDIES = 2  # one to fit on, one held out to calibrate the thresholds


# The hyper-parameters a request may set, checked against the library's own ranges (monai_ad.settings) and, where
# a request could otherwise ask for hours of training or more memory than the machine has, the service's stricter
# limits (``SERVICE_LIMITS``, each within the library's range). A key must also be a parameter of the bundle's
# detector. Nothing else of the config can be reached from a request (no ``_target_``, no other ``#`` path, no
# expression).
REQUEST_HPARAMS = (
    "image_size", "coreset_ratio", "num_neighbors", "dim", "epochs", "batch_size", "lr", "meta_epochs", "gan_epochs",
    "start_resolution", "latent_dim", "latent_resolution", "transition_iters", "stable_iters", "final_iters",
    "prompt_length", "memory_size", "steps",
)  # fmt: skip
REQUEST_PREPROCESSING = ("margin_mm", "normalize_liver_hu", "histogram_equalization", "mask_outside_roi", "window")
SERVICE_LIMITS: dict[str, Range] = {
    "image_size": Range(16, 1024, integer=True),
    "coreset_ratio": Range(1e-4, 1.0),
    "num_neighbors": Range(1, 64, integer=True),
    "batch_size": Range(1, 1024, integer=True),
    "epochs": Range(1, 10_000, integer=True),
    "lr": Range(1e-8, 1.0),
    "meta_epochs": Range(1, 10_000, integer=True),
    "gan_epochs": Range(1, 1000, integer=True),
    "transition_iters": Range(0, 1_000_000, integer=True),
    "stable_iters": Range(0, 1_000_000, integer=True),
    "final_iters": Range(1, 1_000_000, integer=True),
    "steps": Range(1, 1_000_000, integer=True),
}
HYPER_PARAMETERS: dict[str, Range] = {
    **{f"network_def#{name}": SERVICE_LIMITS.get(name, HPARAM_RANGES[name]) for name in REQUEST_HPARAMS},
    **{f"preprocessing_config#{name}": PREPROCESS_RANGES[name] for name in REQUEST_PREPROCESSING},
}
QUANTILE = Range(0.5, 0.9999)
REQUEST_OPTIONS = ("model", "device", "select_threshold", "quantile", "client_id")  # besides the hyper-parameters
DEVICES = ("auto", "cpu", "cuda") + tuple(f"cuda:{i}" for i in range(16))


def _plain(value: Any, accepted: Range, key: str) -> Any:
    """A plain JSON value the range accepts, as the library would take it; else a one-line error naming the option."""
    try:
        return check_setting(key, value, {key: accepted})
    except InputError as exc:
        raise InputError(f"training option {exc}") from None


def config_overrides(request: dict[str, Any], bundle_keys: set[str] | None = None) -> dict[str, Any]:
    """The request's ``train.json`` overrides (keys with ``#``): only the named hyper-parameters of
    ``HYPER_PARAMETERS`` (and of the bundle, when ``bundle_keys`` is given), typed and range-checked plain values."""
    overrides = {}
    for key, value in request.items():
        if "#" not in str(key):
            continue
        if key not in HYPER_PARAMETERS:
            raise InputError(f"training option {str(key)[:80]!r} cannot be set from a request: only named hyper-parameters can (e.g. network_def#image_size)")
        if bundle_keys is not None and key not in bundle_keys:
            raise InputError(f"training option {key!r} is not a hyper-parameter of this detector (its own: {', '.join(sorted(bundle_keys)) or 'none'})")
        overrides[key] = _plain(value, HYPER_PARAMETERS[key], key)
    return overrides


def check_request(request: dict[str, Any], bundle_keys: set[str] | None = None, model: str | None = None) -> dict[str, Any]:
    """A training request from a client: the hyper-parameter overrides (checked), and only the known options."""
    for key in request:
        if "#" not in str(key) and key not in REQUEST_OPTIONS:
            raise InputError(f"training option {str(key)[:80]!r} is not accepted (options: {', '.join(REQUEST_OPTIONS)} and hyper-parameters)")
    if model is not None and request.get("model", model) != model:
        raise InputError("training option 'model' must name the model of the URL")
    if str(request.get("device", "auto")) not in DEVICES:
        raise InputError(f"training option 'device' must be auto, cpu, cuda or cuda:N, got {str(request.get('device'))[:40]!r}")
    if "quantile" in request:
        _plain(request["quantile"], QUANTILE, "quantile")
    if "select_threshold" in request and not isinstance(request["select_threshold"], (bool, str)):
        raise InputError("training option 'select_threshold' must be true or false")
    return config_overrides(request, bundle_keys)


def _train_config(bundle: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(bundle) / "configs" / "train.json").read_text())


def bundle_detector(bundle: str | os.PathLike) -> type:
    """The detector class the bundle's ``train.json`` builds."""
    return detector_class(_train_config(bundle)["network_def"]["name"])


def bundle_hyper_parameters(bundle: str | os.PathLike) -> set[str]:
    """The ``HYPER_PARAMETERS`` the bundle's detector takes (its constructor's parameters) and its pipeline has."""
    config = _train_config(bundle)
    takes = set(inspect.signature(detector_class(config["network_def"]["name"]).__init__).parameters)
    keys = {f"network_def#{name}" for name in REQUEST_HPARAMS if name in takes}
    if isinstance(config.get("preprocessing_config"), dict):
        keys |= {f"preprocessing_config#{name}" for name in REQUEST_PREPROCESSING}
    return keys


def stats_path(model_path: str | os.PathLike) -> Path:
    return Path(str(model_path).removesuffix(".pt") + ".train_stats.json")


class NormalStudiesTrain(TrainTask):
    def __init__(
        self, name: str, bundle: str | os.PathLike, model_path: str, description: str, roi_dir: str | None = None, roi_label: Any = None
    ):
        super().__init__(f"Fit {name} on the studies marked normal ({description[:80]})")
        self.name, self.bundle, self.model_path, self.roi_dir = name, Path(bundle), model_path, roi_dir
        self.roi_label = None if roi_label in (None, "") else int(roi_label)

    def config(self) -> dict[str, Any]:
        return {"device": "auto", "select_threshold": True, "quantile": 0.99}

    def stats(self) -> dict[str, Any]:
        path = stats_path(self.model_path)
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        start = time.time()
        normals = study_rules.normal_studies(datastore, self.roi_dir)
        logger.info("[%s] %d studies marked normal with a liver ROI: %s", self.name, len(normals), [s.image_id for s in normals])
        if len(normals) < MIN_NORMAL_STUDIES:
            raise InputError(
                f"{self.name}: {len(normals)} normal studies with a liver ROI; need at least {MIN_NORMAL_STUDIES} "
                "(mark a study normal with image info {\"normal\": true} or an empty 'final' label, and save its liver mask with tag 'liver')"
            )
        sections = {"training": [{"image": s.image, "roi": s.roi} for s in normals]}
        unlabelled = []
        if bundle_detector(self.bundle).uses_unlabelled:
            unlabelled = study_rules.unlabelled_studies(datastore, self.roi_dir)
            logger.info("[%s] %d studies not marked normal, as unlabelled studies: %s", self.name, len(unlabelled),
                        [s.image_id for s in unlabelled])  # fmt: skip
            sections["unlabelled"] = [{"image": s.image, "roi": s.roi} for s in unlabelled]
        with tempfile.TemporaryDirectory(prefix="monai_ad_train_") as work:
            datalist = write_json(Path(work) / "datalist.json", sections)
            parser = ConfigParser()
            parser.read_config(self.bundle / "configs" / "train.json")
            parser["bundle_root"] = str(self.bundle)
            parser["datalist"] = str(datalist)
            parser["train"]["trainer"]["output"] = str(self.model_path)
            device = str(request.get("device") or "auto")
            if device not in DEVICES:
                raise InputError(f"training option 'device' must be auto, cpu, cuda or cuda:N, got {device[:40]!r}")
            parser["device"] = "cuda" if device == "auto" and _cuda() else ("cpu" if device == "auto" else device)
            if self.roi_label is not None:
                parser["roi_labels"] = [self.roi_label]
            for key, value in config_overrides(request, bundle_hyper_parameters(self.bundle)).items():
                parser[key] = value
            if "quantile" in request and "quantile" in parser["train"]["trainer"]:
                parser["train"]["trainer"]["quantile"] = _plain(request["quantile"], QUANTILE, "quantile")
            parser.parse()
            logger.info("[%s] fitting on %d normal studies (device %s)", self.name, len(normals), parser["device"])
            detector = parser.get_parsed_content("train#trainer").run()
        result: dict[str, Any] = {
            "model": self.name,
            "path": str(self.model_path),
            "normal_studies": [s.image_id for s in normals],
            **({"unlabelled_studies": [s.image_id for s in unlabelled]} if unlabelled else {}),
            "thresholds": detector.thresholds,
            "seconds": round(time.time() - start, 1),
        }
        logger.info("[%s] saved %s (thresholds %s) in %.1f s", self.name, self.model_path, detector.thresholds, result["seconds"])
        if str(request.get("select_threshold", True)).lower() not in ("false", "0", "no"):
            from lib.scoring.feedback_threshold import select_threshold

            feedback = select_threshold(
                self.name, self.bundle, self.model_path, datastore, self.roi_dir, device=parser["device"], roi_label=self.roi_label
            )
            if feedback:
                result["feedback"] = feedback
        write_json(stats_path(self.model_path), {**result, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
