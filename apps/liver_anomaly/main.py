"""MONAI Label app: liver anomaly detection with every monai_ad bundle.

Assembles only (the radiology sample app's shape): one ``DetectorConfig`` per bundle found under ``bundles/``
gives an infer task (segmentation, label ``anomaly``) and a training task (fit on studies marked normal); one
scoring method re-selects operating thresholds from corrected (``final``) labels. Options (``--conf KEY VALUE``):

- ``bundles``: folder of bundles (default: the project's ``bundles/``, or ``$MONAI_AD_BUNDLES``)
- ``models``: comma-separated bundle names to serve (default: all)
- ``model_dir``: where the app's trained models go (default: ``model/`` in this folder)
- ``roi_dir``: folder of liver masks named ``<image id>.nii.gz`` (an ROI source beside the ``liver`` labels)
- ``roi_label``: the liver's value in the ROI masks (default: any non-zero voxel; 5 for TotalSegmentator)
- ``train_on_start``: ``true`` (or a comma-separated list of bundle names) trains, at start-up, the detectors that
  have no model yet, one after another

A folder datastore may hold NIfTI/NRRD files and DICOM series sub-folders (served as ``<folder>.nii.gz``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from monai_ad.allocator import keep_freed_memory

from lib import studies as study_rules
from lib.configs.detector import DetectorConfig, find_bundles
from lib.dicom_folder import convert_dicom_series
from lib.errors import http_error
from lib.scoring.feedback_threshold import FeedbackThreshold

logger = logging.getLogger(__name__)

PROJECT_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


class LiverAnomalyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        keep_freed_memory()
        conf = dict(conf or {})
        self.roi_dir = conf.get("roi_dir") or None
        bundles_dir = conf.get("bundles") or os.environ.get("MONAI_AD_BUNDLES") or str(PROJECT_BUNDLES)
        model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        os.makedirs(model_dir, exist_ok=True)
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        bundles = find_bundles(bundles_dir)
        if "all" not in wanted:
            unknown = sorted(set(wanted) - {b.name for b in bundles})
            if unknown:
                raise MONAILabelException(
                    MONAILabelError.APP_INIT_ERROR,
                    f"unknown bundle(s) {unknown}; found in {bundles_dir}: {[b.name for b in bundles]}",
                )
            bundles = [b for b in bundles if b.name in wanted]
        if not bundles:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"no bundles found in {bundles_dir}")
        self.detectors: dict[str, DetectorConfig] = {}
        for bundle in bundles:
            config = DetectorConfig()
            config.init(bundle.name, model_dir, conf, None, bundle=bundle)
            self.detectors[bundle.name] = config
        logger.info("detectors: %s (models in %s)", list(self.detectors), model_dir)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Liver anomaly detection (monai_ad)",
            description="Unsupervised liver anomaly detectors trained on normal CT; abnormal regions as an editable segment",
            version="0.1.0",
            labels=list(study_rules.ANOMALY_NAMES),  # a list: OHIF's MONAI Label panel appends to it
        )

    def init_datastore(self):
        if not self.studies.startswith(("http://", "https://")):
            convert_dicom_series(self.studies)  # DICOM series sub-folders become NIfTI studies
        return super().init_datastore()

    def init_infers(self):
        infers = {}
        for config in self.detectors.values():
            infers.update(config.infer())
        return infers

    def init_trainers(self):
        return {name: config.trainer() for name, config in self.detectors.items()}

    def init_scoring_methods(self):
        return {"feedback_threshold": FeedbackThreshold(self.detectors, self.roi_dir, self.conf.get("roi_label"))}

    def on_init_complete(self):
        super().on_init_complete()
        wanted = [w.strip() for w in str(self.conf.get("train_on_start", "false")).lower().split(",") if w.strip()]
        if wanted and wanted != ["false"]:
            for name, task in self._infers.items():
                if (wanted in (["true"], ["all"]) or name in wanted) and not task.is_valid():
                    logger.info("[%s] no model yet: training it on the studies marked normal", name)
                    self.async_training(name, enqueue=True)

    def infer(self, request: dict[str, Any], datastore=None):
        """MONAI Label's infer, with the study's liver ROI attached and every failure answered with a status code
        and a one-line message (the server keeps serving)."""
        try:
            if request.get("model") not in self._infers:
                raise HTTPException(404, f"unknown model {request.get('model')!r}; available: {sorted(self._infers)}")
            if not self._infers[request["model"]].is_valid():
                raise HTTPException(409, f"{request['model']} has no trained model yet: start training first (POST /train/{request['model']})")
            request = dict(request)
            request["roi"] = self._roi_for(request, datastore or self.datastore())
            return super().infer(request, datastore)
        except Exception as exc:
            raise http_error(exc, request.get("model")) from None

    def _roi_for(self, request: dict[str, Any], datastore) -> str:
        """The liver mask: an uploaded ``label`` file, else the study's ``liver`` label / ``roi_dir`` file."""
        if request.get("label"):
            return request["label"]
        image = request.get("image")
        if isinstance(image, str) and os.path.exists(image):  # an uploaded image: its ROI must come with it
            raise HTTPException(422, "no liver ROI: send the liver mask with the uploaded image (as the 'label' file)")
        try:
            uri = datastore.get_image_uri(image)
        except Exception:
            uri = ""
        if not uri:
            raise HTTPException(404, f"image {image!r} is not in the datastore")
        roi = study_rules.liver_roi(datastore, image, self.roi_dir)
        if roi is None:
            raise HTTPException(
                422,
                f"no liver ROI for image {image!r}: save its liver mask as a label with tag '{study_rules.LIVER_TAG}'"
                + (f", put it in {self.roi_dir} as {image}.nii.gz" if self.roi_dir else "")
                + ", or send it with the request as the 'label' file",
            )
        return roi
