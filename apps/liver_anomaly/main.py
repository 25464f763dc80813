"""MONAI Label app: liver anomaly detection with every monai_ad bundle.

Assembles only (the radiology sample app's shape): one ``DetectorConfig`` per bundle found under ``bundles/``
gives an infer task (segmentation, label ``anomaly``) and a training task (fit on studies marked normal); one
scoring method re-selects operating thresholds from corrected (``final``) labels. Options (``--conf KEY VALUE``):

- ``bundles``: folder of bundles (default: those installed with monai_ad, or ``$MONAI_AD_BUNDLES``)
- ``models``: comma-separated bundle names to serve (default: all)
- ``model_dir``: where the app's trained models go (default: ``models/`` of ``monai_ad.label_server.state_dir``:
  ``.monai_ad`` in a local studies folder, else ``$MONAI_AD_STATE_DIR``; never inside the app)
- ``roi_dir``: folder of liver masks named ``<image id>.nii.gz`` (an ROI source beside the ``liver`` labels)
- ``roi_label``: the liver's value in the ROI masks (default: any non-zero voxel; 5 for TotalSegmentator)
- ``train_on_start``: ``true`` (or a comma-separated list of bundle names) trains, at start-up, the detectors that
  have no model yet, one after another
- ``max_upload_mb``: the largest request body (an uploaded study or label) the server takes (default 1024)
- ``infer_workers``: detector runs at the same time (default 2); ``/info`` and the datastore answer meanwhile
- ``allow_model_routes``: ``true`` opens ``/model/<name>`` (download, replace, delete model files; default closed)
- ``allowed_origins``: comma-separated browser origins (``https://ohif.hospital.example``) that may call the server
  from their pages, e.g. an OHIF viewer served elsewhere (default: none; never ``*``)
- ``allowed_hosts``: comma-separated names the server answers to in the ``Host`` header besides the loopback names
  and the ``--host`` it is bound to (needed when bound to 0.0.0.0)
- ``auth_token_file``: a file (mode 600) whose first line is the access token every request must carry
  (``Authorization: Bearer <token>``, or the token as the Basic-auth password); required, unless MONAI Label's
  authentication is on, when the server listens beyond 127.0.0.1
- ``scoring_timeout_s``: a scoring run still going after this many seconds is stopped (default 600)
- ``triage_model``: the bundle whose model orders the ``most_abnormal`` next-sample strategy (default: the first,
  by name, with a trained model)

A folder datastore may hold NIfTI/NRRD files and DICOM series sub-folders (served as ``<folder>.nii.gz``).
What clients may send is checked by ``lib.security`` (installed into the server when it starts) and
``lib.datastore`` (ids, tags, atomic writes).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from monai_ad.allocator import keep_freed_memory
from monai_ad.label_server import state_dir
from monai_ad.resources import shared_dir

from lib import security, tasks
from lib.activelearning.most_abnormal import MostAbnormalUnreviewed
from lib.activelearning.random_unlabeled import RandomUnlabeled
from lib import studies as study_rules
from lib.configs.detector import DetectorConfig, find_bundles
from lib.datastore import SafeLocalDatastore
from lib.dicom_folder import convert_dicom_series
from lib.errors import http_error
from lib.infers.anomaly import DICOM_SERIES, DICOM_STORE
from lib.scoring.feedback_memory import FeedbackMemory, MemoryUpdates, UndoMemoryUpdate
from lib.scoring.feedback_threshold import FeedbackThreshold
from lib.trainers.normal_studies import bundle_hyper_parameters, check_request

logger = logging.getLogger(__name__)

PROJECT_BUNDLES = shared_dir("bundles")  # installed with the package, or the clone's bundles/


class LiverAnomalyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        keep_freed_memory()
        conf = dict(conf or {})
        self.roi_dir = conf.get("roi_dir") or None
        try:
            self.max_upload = int(float(conf.get("max_upload_mb", security.DEFAULT_MAX_UPLOAD_MB)) * 2**20)
            self.infer_workers = int(conf.get("infer_workers", 2))
        except ValueError:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, "max_upload_mb and infer_workers must be numbers") from None
        self.allow_model_routes = _true(conf.get("allow_model_routes"))
        try:
            self.scoring_timeout = float(conf.get("scoring_timeout_s", tasks.SCORING_TIMEOUT_S))
            if not 0 < self.scoring_timeout < float("inf"):
                raise ValueError
        except ValueError:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, "scoring_timeout_s must be a positive number of seconds") from None
        bundles_dir = conf.get("bundles") or os.environ.get("MONAI_AD_BUNDLES") or str(PROJECT_BUNDLES)
        model_dir = conf.get("model_dir") or str(state_dir(studies) / "models")
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
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        convert_dicom_series(self.studies)  # DICOM series sub-folders become NIfTI studies
        return SafeLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        infers = {}
        for config in self.detectors.values():
            infers.update(config.infer())
        return infers

    def init_trainers(self):
        return {name: config.trainer() for name, config in self.detectors.items()}

    def init_strategies(self):
        most_abnormal = MostAbnormalUnreviewed(self.detectors, self.roi_dir, self.conf.get("roi_label"), self.conf.get("triage_model"))
        return {"random": RandomUnlabeled(), "most_abnormal": most_abnormal}

    def init_scoring_methods(self):
        memory = FeedbackMemory(self.detectors, self.roi_dir, self.conf.get("roi_label"))
        self.memory_updates = MemoryUpdates(memory)
        return {
            "feedback_threshold": FeedbackThreshold(self.detectors, self.roi_dir, self.conf.get("roi_label")),
            "feedback_memory": memory,
            "undo_memory_update": UndoMemoryUpdate(self.detectors),
        }

    def on_save_label(self, image_id, label_id):
        """A saved label: the memory detectors learn the regions it erased, at once (``lib.scoring.feedback_memory``)."""
        super().on_save_label(image_id, label_id)
        return self.memory_updates.label_saved(image_id, self.datastore())

    def on_init_complete(self):
        try:
            access = security.access_from_conf(
                self.conf, security.server_host(sys.argv), settings.MONAI_LABEL_AUTH_ENABLE, settings.MONAI_LABEL_CORS_ORIGINS
            )
        except ValueError as exc:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, str(exc)) from None
        if security.install(self, self.max_upload, self.allow_model_routes, self.infer_workers, access):
            tasks.stop_overdue("scoring", self.scoring_timeout)
        super().on_init_complete()
        wanted = [w.strip() for w in str(self.conf.get("train_on_start", "false")).lower().split(",") if w.strip()]
        if wanted and wanted != ["false"]:
            for name, task in self._infers.items():
                if (wanted in (["true"], ["all"]) or name in wanted) and not task.is_valid():
                    logger.info("[%s] no model yet: training it on the studies marked normal", name)
                    self.async_training(name, enqueue=True)

    def async_scoring(self, method, params=None):
        """MONAI Label queues a scoring run after every training and active-learning request; one run at a time
        is enough (each re-scores every corrected study), so none is queued while another waits or runs."""
        if tasks.busy("scoring"):
            logger.info("a scoring run is already queued or running: no other queued")
            return {}
        return super().async_scoring(method, params)

    def check_train_request(self, model: str, params: dict[str, Any]) -> None:
        """Refuse a ``/train`` request before a training process starts (called by the request guard)."""
        if not model:  # POST /train/: options per model, or for all of them
            for name in self._trainers:
                self.check_train_request(name, {k: v for k, v in params.items() if k not in self._trainers})
                if isinstance(params.get(name), dict):
                    self.check_train_request(name, params[name])
            return
        if model not in self.detectors:
            raise HTTPException(404, f"unknown model {model!r}; trainers: {sorted(self.detectors)}")
        check_request(params, bundle_hyper_parameters(self.detectors[model].bundle), model)

    def study_shape(self, image_id: str) -> tuple[int, ...] | None:
        """The shape of a datastore study (None when there is no such study)."""
        try:
            uri = self.datastore().get_image_uri(image_id)
        except Exception:
            uri = ""
        return security.image_shape(uri, f"image {image_id!r}", full=False) if uri and os.path.exists(uri) else None

    def infer(self, request: dict[str, Any], datastore=None):
        """MONAI Label's infer, with the study's liver ROI attached and every failure answered with a status code
        and a one-line message (the server keeps serving). The image is a datastore id or a file the server received;
        a request never names a server path."""
        try:
            image, label = request.get("image"), request.get("label")
            if not (isinstance(image, str) and (security.is_upload(image) or (image and security.SAFE_NAME.match(image) and ".." not in image))):
                raise HTTPException(400, f"image {str(image)[:80]!r} is not an image id of the datastore")
            if label is not None and not security.is_upload(label):
                raise HTTPException(400, "the liver mask must be uploaded with the request (as the 'label' file)")
            for key, allowed in security.FIXED_VALUES.items():
                if key in request and request[key] not in allowed:
                    raise HTTPException(422, f"infer option {key!r} must be one of {allowed}")
            if request.get("model") not in self._infers:
                raise HTTPException(404, f"unknown model {request.get('model')!r}; available: {sorted(self._infers)}")
            if not self._infers[request["model"]].is_valid():
                raise HTTPException(409, f"{request['model']} has no trained model yet: start training first (POST /train/{request['model']})")
            request = {k: v for k, v in request.items() if k not in (DICOM_SERIES, DICOM_STORE)}  # the server's to set
            request["roi"] = self._roi_for(request, datastore or self.datastore())
            request.update(self._dicom_destination(request, datastore or self.datastore()))
            return super().infer(request, datastore)
        except Exception as exc:
            raise http_error(exc, request.get("model")) from None

    def _dicom_destination(self, request: dict[str, Any], datastore) -> dict[str, str]:
        """For a study of a DICOMweb store: its cached DICOM series folder and the store's root, where the infer task
        stores the reading as SEG, Parametric Map and SR (MONAI Label itself stores only a saved ``final`` label, as SEG)."""
        image = request.get("image")
        if not self.studies.startswith(("http://", "https://")) or security.is_upload(image):
            return {}
        uri = datastore.get_image_uri(image)
        series = uri[: -len(".nii.gz")] if uri.endswith(".nii.gz") else uri  # the NIfTI MONAI Label made sits beside its series
        return {DICOM_SERIES: series, DICOM_STORE: self.studies} if os.path.isdir(series) else {}

    def _roi_for(self, request: dict[str, Any], datastore) -> str:
        """The liver mask: an uploaded ``label`` file, else the study's ``liver`` label / ``roi_dir`` file."""
        if request.get("label"):
            return request["label"]
        image = request.get("image")
        if security.is_upload(image):  # an uploaded image: its ROI must come with it
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


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")
