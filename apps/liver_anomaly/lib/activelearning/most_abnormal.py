"""``/activelearning/most_abnormal``: the most abnormal study not yet reviewed, by the served model.

The order is ``monai-ad triage``'s: studies are scored with ``monai_ad.triage.score_studies`` and ranked with
``rank_rows`` (by the conformal p-value of the study score where the model is calibrated, then by the study
score). A study is reviewed once it has a ``final`` label; studies marked normal (the training normals) are not
handed out either. Scores are kept per model file: a study scored once is not scored again until training
replaces the model (or its liver ROI changes), so a next-sample request after the first is quick.

The model that scores is the app's ``triage_model`` (``--conf triage_model <bundle>``; default: the first bundle,
by name, with a trained model). The answer holds ``score``, ``p_value``, ``model`` and ``studies_left`` (not yet
reviewed, this one included) beside ``id``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.strategy import Strategy

from monai_ad.triage import OK, StudyPredictor, rank_rows, score_studies

from lib import studies as study_rules
from lib.infers.anomaly import bundle_settings

logger = logging.getLogger(__name__)


class MostAbnormalUnreviewed(Strategy):
    def __init__(self, detectors: dict[str, Any], roi_dir: str | None = None, roi_label: str | None = None, model: str | None = None):
        if model and model not in detectors:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"triage_model {model!r} is not served; models: {sorted(detectors)}")
        self.model = model or None
        super().__init__("The study not yet reviewed that the model finds most abnormal (the triage worklist's order)")
        self.detectors, self.roi_dir = detectors, roi_dir
        self.roi_labels = [int(float(roi_label))] if str(roi_label or "").strip() else None
        self._lock = threading.Lock()
        self._scores: dict[tuple[str, str, int], dict[tuple[str, str], dict[str, Any]]] = {}  # model version -> rows

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        name, model = self._model()
        if model is None:
            logger.info("most_abnormal: no detector has a trained model yet")
            return None
        pending = [s for s in study_rules.studies(datastore, self.roi_dir)
                   if s.final is None and not study_rules.is_marked_normal(datastore, s.image_id, None)]  # fmt: skip
        if not pending:
            return None
        with self._lock:  # one scoring run at a time; a second request waits and then reads the cache
            rows = self._rows(name, model, pending)
        ranked = [row for row in rank_rows(rows) if row["status"] == OK]
        if not ranked:
            logger.warning("most_abnormal: none of the %d studies not yet reviewed could be scored", len(pending))
            return None
        best = ranked[0]
        logger.info("most_abnormal: %s (score %s, p-value %s, by %s)", best["study"], best["study_score"], best["p_value"], name)
        return {"id": best["study"], "score": best["study_score"], "p_value": best["p_value"], "model": name,
                "studies_left": len(pending)}  # fmt: skip

    def _model(self) -> tuple[str | None, Path | None]:
        """The ``triage_model`` bundle (else the first with a trained model) and its model file."""
        for name in [self.model] if self.model else sorted(self.detectors):
            existing = [Path(p) for p in self.detectors[name].path if os.path.isfile(p)]
            if existing:
                return name, existing[-1]  # the app's trained model over the bundle's own, as the infer task serves
        return self.model, None

    def _rows(self, name: str, model: Path, pending: list) -> list[dict[str, Any]]:
        version = (name, str(model), os.stat(model).st_mtime_ns)
        cache = self._scores.setdefault(version, {})
        for stale in [v for v in self._scores if v[:2] == version[:2] and v != version]:
            del self._scores[stale]  # the model file was replaced: its scores no longer hold
        todo = [s for s in pending if (s.image_id, str(s.roi)) not in cache]
        if todo:
            settings = bundle_settings(self.detectors[name].bundle)
            if self.roi_labels:
                settings["roi_labels"] = self.roi_labels
            predictor = StudyPredictor(str(model), **settings)
            rows = score_studies(predictor, [s.image for s in todo], [s.roi for s in todo], pictures=False, progress=False)
            for study, row in zip(todo, rows):  # in the order given (one process)
                if row["status"] == OK:  # a failure (no ROI yet, ...) is tried again next time
                    cache[(study.image_id, str(study.roi))] = {**row, "study": study.image_id}
                else:
                    logger.info("most_abnormal: %s not scored (%s)", study.image_id, row["status"])
        return [cache[key] for key in ((s.image_id, str(s.roi)) for s in pending) if key in cache]
