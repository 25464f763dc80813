"""Fit a bundle's detector on the studies a user marked normal in the datastore.

MONAI Label runs ``/train/<model>`` in a child process and streams its output into the server log and the
``/train`` status (``details``: the last lines), so progress is logged line by line here. The bundle's
``configs/train.json`` supplies the detector and its hyper-parameters; the request may set the named
hyper-parameters of ``HYPER_PARAMETERS`` that the bundle has, as typed, range-checked plain values (e.g.
``{"network_def#image_size": 64}``); the server checks a request before a training process starts. The model is written atomically to the path the
infer task serves, which reloads it on its next request (no restart).

After fitting, when corrected studies exist (``final`` labels), the operating threshold is chosen on them
(``lib.scoring.feedback_threshold``) unless the request says ``select_threshold: false``.
"""

from __future__ import annotations

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

from monai_ad.errors import InputError
from monai_ad.io import write_json

from lib import studies as study_rules

logger = logging.getLogger(__name__)

MIN_NORMAL_STUDIES = 2  # one to fit on, one held out to calibrate the thresholds


# The hyper-parameters a request may set: (type, lowest, highest). A key must also be in the bundle's train.json.
# Nothing else of the config can be reached from a request (no ``_target_``, no other ``#`` path, no expression).
INT, FLOAT, BOOL = "int", "float", "bool"
HYPER_PARAMETERS: dict[str, tuple[str, float, float]] = {
    "network_def#image_size": (INT, 16, 1024),
    "network_def#coreset_ratio": (FLOAT, 1e-4, 1.0),
    "network_def#num_neighbors": (INT, 1, 64),
    "network_def#dim": (INT, 1, 4096),
    "network_def#epochs": (INT, 1, 10_000),
    "network_def#batch_size": (INT, 1, 1024),
    "network_def#lr": (FLOAT, 1e-8, 1.0),
    "network_def#meta_epochs": (INT, 1, 10_000),
    "network_def#gan_epochs": (INT, 1, 1000),
    "network_def#start_resolution": (INT, 4, 1024),
    "network_def#latent_dim": (INT, 1, 4096),
    "network_def#latent_resolution": (INT, 1, 64),
    "network_def#inner_dims": (INT, 1, 4096),
    "network_def#transition_iters": (INT, 0, 1_000_000),
    "network_def#stable_iters": (INT, 0, 1_000_000),
    "network_def#final_iters": (INT, 0, 1_000_000),
    "network_def#prompt_length": (INT, 1, 256),
    "network_def#bottleneck": (INT, 1, 4096),
    "network_def#memory_size": (INT, 1, 10_000_000),
    "preprocessing_config#margin_mm": (FLOAT, 0.0, 200.0),
    "preprocessing_config#normalize_liver_hu": (FLOAT, -1000.0, 3000.0),
    "preprocessing_config#histogram_equalization": (BOOL, 0, 1),
    "preprocessing_config#mask_outside_roi": (BOOL, 0, 1),
    "preprocessing_config#window": ("window", -1024.0, 3071.0),
}
REQUEST_OPTIONS = ("model", "device", "select_threshold", "quantile", "client_id")  # besides the hyper-parameters
DEVICES = ("auto", "cpu", "cuda") + tuple(f"cuda:{i}" for i in range(16))


def _plain(value, kind: str, low: float, high: float, key: str):
    def fail(what: str):
        raise InputError(f"training option {key!r}: {what}, got {str(value)[:60]!r}")

    if kind == BOOL:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind == "window":
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            fail("a [low, high] pair of numbers")
        if not (low <= value[0] < value[1] <= high):
            fail(f"low < high, within [{low:g}, {high:g}] HU")
        return [float(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == INT and not float(value).is_integer()):
        fail("an integer" if kind == INT else "a number")
    if not (low <= value <= high):
        fail(f"within [{low:g}, {high:g}]")
    return int(value) if kind == INT else float(value)


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
        overrides[key] = _plain(value, *HYPER_PARAMETERS[key], key)
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
        _plain(request["quantile"], FLOAT, 0.5, 0.9999, "quantile")
    if "select_threshold" in request and not isinstance(request["select_threshold"], (bool, str)):
        raise InputError("training option 'select_threshold' must be true or false")
    return config_overrides(request, bundle_keys)


def bundle_hyper_parameters(bundle: str | os.PathLike) -> set[str]:
    """The ``HYPER_PARAMETERS`` the bundle's ``train.json`` has."""
    config = json.loads((Path(bundle) / "configs" / "train.json").read_text())
    keys = set()
    for key in HYPER_PARAMETERS:
        section, name = key.split("#", 1)
        if isinstance(config.get(section), dict) and name in config[section]:
            keys.add(key)
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
        with tempfile.TemporaryDirectory(prefix="monai_ad_train_") as work:
            datalist = write_json(Path(work) / "datalist.json", {"training": [{"image": s.image, "roi": s.roi} for s in normals]})
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
                parser["train"]["trainer"]["quantile"] = _plain(request["quantile"], FLOAT, 0.5, 0.9999, "quantile")
            parser.parse()
            logger.info("[%s] fitting on %d normal studies (device %s)", self.name, len(normals), parser["device"])
            detector = parser.get_parsed_content("train#trainer").run()
        result: dict[str, Any] = {
            "model": self.name,
            "path": str(self.model_path),
            "normal_studies": [s.image_id for s in normals],
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
