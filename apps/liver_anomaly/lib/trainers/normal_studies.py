"""Fit a bundle's detector on the studies a user marked normal in the datastore.

MONAI Label runs ``/train/<model>`` in a child process and streams its output into the server log and the
``/train`` status (``details``: the last lines), so progress is logged line by line here. The bundle's
``configs/train.json`` supplies the detector and its hyper-parameters; the request may override its
``network_def#...`` and ``preprocessing_config#...`` entries with plain values (e.g. ``{"network_def#image_size": 64}``). The model is written atomically to the path the
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


OVERRIDABLE = ("network_def#", "preprocessing_config#")  # detector hyper-parameters and pre-processing only


def config_overrides(request: dict[str, Any]) -> dict[str, Any]:
    """The request's ``train.json`` overrides (keys with ``#``), limited to hyper-parameters and plain values:
    a remote request must not redirect outputs or run config expressions (``$...``, ``@...``, ``%...``)."""
    overrides = {}
    for key, value in request.items():
        if "#" not in key:
            continue
        if not key.startswith(OVERRIDABLE):
            raise InputError(f"training option {key!r} cannot be set from a request (allowed: {', '.join(p + '...' for p in OVERRIDABLE)})")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float, bool)) or (isinstance(v, str) and not v.startswith(("$", "@", "%"))) for v in values):
            raise InputError(f"training option {key!r}: only numbers, booleans, plain strings or lists of them")
        overrides[key] = value
    return overrides


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
            parser["trainer"]["output"] = str(self.model_path)
            device = str(request.get("device") or "auto")
            parser["device"] = "cuda" if device == "auto" and _cuda() else ("cpu" if device == "auto" else device)
            if self.roi_label is not None:
                parser["roi_labels"] = [self.roi_label]
            for key, value in config_overrides(request).items():
                parser[key] = value
            if "quantile" in request and "quantile" in parser["trainer"]:
                parser["trainer"]["quantile"] = float(request["quantile"])
            parser.parse()
            logger.info("[%s] fitting on %d normal studies (device %s)", self.name, len(normals), parser["device"])
            detector = parser.get_parsed_content("trainer").run()
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
