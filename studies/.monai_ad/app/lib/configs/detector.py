"""One ``DetectorConfig`` per bundle under ``bundles/``: where its trained model lives and its task factories.

A bundle qualifies when it has ``configs/inference.json`` and ``configs/train.json`` (the project's bundle layout).
The app's own training writes ``<models_dir>/<bundle>.pt``; until then a model the bundle trained itself
(``<bundle>/models/model.pt``) is served.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from monailabel.interfaces.config import TaskConfig

from lib.infers.anomaly import AnomalyInfer
from lib.trainers.normal_studies import NormalStudiesTrain

logger = logging.getLogger(__name__)


def find_bundles(bundles_dir: str | os.PathLike) -> list[Path]:
    root = Path(bundles_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "configs" / "inference.json").is_file() and (p / "configs" / "train.json").is_file())


class DetectorConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.bundle = Path(kwargs["bundle"])
        self.roi_dir = conf.get("roi_dir") or None
        self.app_model = Path(model_dir) / f"{name}.pt"
        self.path = [str(self.bundle / "models" / "model.pt"), str(self.app_model)]
        try:
            meta = json.loads((self.bundle / "configs" / "metadata.json").read_text())
            self.description = f"{meta.get('name', name)}: {meta.get('description', '')}".strip()
        except (OSError, json.JSONDecodeError):
            self.description = f"anomaly detector bundle {name}"

    def infer(self):
        defaults = {"roi_label": self.conf.get("roi_label", "")}
        return {self.name: AnomalyInfer(self.bundle, self.path, self.description, defaults=defaults)}

    def trainer(self):
        return NormalStudiesTrain(
            self.name, self.bundle, str(self.app_model), self.description, roi_dir=self.roi_dir, roi_label=self.conf.get("roi_label") or None
        )
