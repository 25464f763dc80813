"""The ``monai-ad`` argument parser."""

from __future__ import annotations

import argparse
from typing import Any

from monai_ad import DEFAULT_DETECTOR
from monai_ad.cli import commands
from monai_ad.settings import SCHEDULE_NAMES


class _LazyHelp(str):
    """A help text whose ``{detectors}`` (the registered detector names) and ``{min_lesion_mm3}`` are filled in only
    when help is shown: they come from modules that import torch, which commands such as ``phantom`` need not pay for."""

    def __mod__(self, params: Any) -> str:  # argparse expands help texts with ``help % params``
        from monai_ad.detectors.base import available_detectors
        from monai_ad.postprocess import MIN_LESION_MM3

        text = self.replace("{detectors}", ", ".join(available_detectors()))
        return text.replace("{min_lesion_mm3}", f"{MIN_LESION_MM3:g}") % params


def _add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roi-label", type=int, action="append", help="label value(s) of the liver in the mask (default: any non-zero; 5 for TotalSegmentator)")
    p.add_argument("--threshold", type=float, help="pixel threshold for the label map (default: the model's calibrated one)")
    p.add_argument("--slice-threshold", type=float, help="slice-score threshold for abnormal slices (default: the model's)")
    p.add_argument("--false-alarm-rate", type=float, metavar="RATE",
                   help="instead of thresholds: the share of normal studies allowed to raise an alarm (e.g. 0.05); both "
                        "thresholds come from the model's conformal calibration on held-out normal scans, which "
                        "guarantees at most that share (needs at least 1/RATE - 1 calibration scans)")
    p.add_argument("--min-lesion-mm3", type=float, help=_LazyHelp("smallest region kept in the label map (mm³; default {min_lesion_mm3})"))


def build_parser() -> argparse.ArgumentParser:
    def common(defaults: bool) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False, argument_default=None if defaults else argparse.SUPPRESS)
        p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)", **({"default": "auto"} if defaults else {}))
        p.add_argument("--quiet", action="store_true", help="no progress bars", **({} if defaults else {"default": argparse.SUPPRESS}))
        p.add_argument("--verbose", action="store_true", help="log details; show tracebacks", **({} if defaults else {"default": argparse.SUPPRESS}))
        return p

    parser = argparse.ArgumentParser(
        prog="monai-ad", description="Unsupervised anomaly detection in 3-D CT (liver).", parents=[common(True)]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    shared = common(False)

    p = sub.add_parser("phantom", parents=[shared], help="write a synthetic abdominal CT dataset with a datalist")
    p.add_argument("--out", required=True)
    p.add_argument("--normal", type=int, default=8)
    p.add_argument("--abnormal", type=int, default=4)
    p.add_argument("--preset", default="small", help="tiny, small or full (512×512)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.cmd_phantom)

    p = sub.add_parser("prepare", parents=[shared], help="BMAD liver protocol: BTCV normals + LiTS/MSD tests → datalist and 2-D slices")
    p.add_argument("--btcv", required=True, help="BTCV folder (img/imgNNNN.nii.gz, label/labelNNNN.nii.gz)")
    p.add_argument("--lits", help="LiTS folder (volume-N.nii, segmentation-N.nii)")
    p.add_argument("--msd", help="folder that holds Task03_Liver (MSD)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level splits")
    p.add_argument("--no-slices", action="store_true", help="only the 3-D datalist, not BMAD's 2-D slice folders")
    p.add_argument("--unlabelled-fraction", type=float, default=0.0, metavar="F",
                   help="move this share of the LiTS/MSD test patients (seeded, patient level) to an 'unlabelled' "
                        "section: image and liver mask, no tumour label; they leave the test section. Detectors that "
                        "learn from unlabelled studies (ddad) train on it (default 0: none)")
    p.set_defaults(func=commands.cmd_prepare)

    p = sub.add_parser("train", parents=[shared], help="fit a detector on the normal volumes of a datalist")
    p.add_argument("--datalist", required=True)
    p.add_argument("--detector", help=_LazyHelp("{detectors} (default: %s)" % DEFAULT_DETECTOR))
    p.add_argument("--config", help="JSON with detector, schedule, hparams and preprocessing (see sample_configs/)")
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default=None,
                   help="the detector's named schedule under --config's hparams and --set: paper (its defaults; the "
                        "default unless --config names one), cpu (the CPU demonstration the accuracy benchmark "
                        "measures), quick (a smoke run)")
    p.add_argument("--backbone", help="efficientnet_lite0 (default), vgg16, wide_resnet50_2, resnet18")
    p.add_argument("--weights", help="backbone weights file (needed for wide_resnet50_2 / resnet18)")
    p.add_argument("--allow-random-weights", action="store_true", help="explicitly accept a randomly initialised backbone")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="detector hyper-parameter (repeatable)")
    p.add_argument("--preprocess", action="append", metavar="KEY=VALUE", help="pre-processing option (repeatable)")
    p.add_argument("--roi-label", type=int, action="append", help="label value(s) of the liver in the masks")
    p.add_argument("--false-regions", type=float, default=1.0, metavar="N",
                   help="operating point: about N false regions per normal validation scan (default 1)")
    p.add_argument("--quantile", type=float, default=None,
                   help="instead: thresholds = this quantile of held-out normal slice scores")
    p.add_argument("--no-unlabelled", action="store_true",
                   help="do not give the datalist's 'unlabelled' section (studies without labels, normal and abnormal "
                        "mixed) to a detector that learns from it (ddad); other detectors never read it")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("infer", parents=[shared], help="heatmap, label map and summary for a volume or a folder of volumes")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True, help="a volume (NIfTI, NRRD, MHA), a DICOM series folder, or a folder of them")
    p.add_argument("--roi", help="liver mask or organ segmentation (file, or folder with masks named as the images)")
    p.add_argument("--out", required=True)
    p.add_argument("--dicom-store", metavar="URL",
                   help="DICOMweb root to also store the DICOM results (SEG, parametric map, SR) of DICOM series inputs in")
    _add_predict_options(p)
    p.set_defaults(func=commands.cmd_infer)

    p = sub.add_parser("evaluate", parents=[shared], help="metrics and PNG report on a labelled datalist")
    p.add_argument("--model", required=True)
    p.add_argument("--datalist", required=True)
    p.add_argument("--key", default="test", help="datalist section (default: test)")
    p.add_argument("--out", required=True)
    _add_predict_options(p)
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser("triage", parents=[shared], help="score many studies and write a worklist ranked by abnormality (CSV, JSON, HTML)")
    p.add_argument("--model", required=True)
    p.add_argument("--studies", required=True, help="a folder of volumes (NIfTI, NRRD, MHA) or DICOM series folders, or a DICOMweb root URL")
    p.add_argument("--roi", help="liver mask or organ segmentation (file, or folder with masks named as the images; for a "
                                 "DICOMweb store, named <SeriesInstanceUID>.nii.gz)")
    p.add_argument("--out", required=True, help="folder for worklist.csv, worklist.json, worklist.html and each study's outputs")
    _add_predict_options(p)
    p.set_defaults(func=commands.cmd_triage)

    p = sub.add_parser("benchmark", parents=[shared], help="train + evaluate over several seeds; BMAD-style mean ± std table")
    p.add_argument("--datalist", required=True)
    p.add_argument("--detector", help=_LazyHelp("{detectors} (default: %s)" % DEFAULT_DETECTOR))
    p.add_argument("--config", help="JSON with detector, hparams and preprocessing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--roi-label", type=int, action="append")
    p.add_argument("--out", required=True)
    p.set_defaults(func=commands.cmd_benchmark)

    p = sub.add_parser("demo", parents=[shared], help="phantom data → train → infer → evaluate, end to end")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help=_LazyHelp("{detectors} (default: %s)" % DEFAULT_DETECTOR))
    p.add_argument("--normal", type=int, default=8)
    p.add_argument("--abnormal", type=int, default=4)
    p.add_argument("--preset", default="small")
    p.add_argument("--epochs", type=int, default=None, help="SimpleNet meta-epochs (the paper uses 40)")
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default="quick",
                   help="the detector's named schedule: quick (default: a smoke run, minutes), cpu, paper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="detector hyper-parameter (repeatable)")
    p.add_argument("--preprocess", action="append", metavar="KEY=VALUE", help="pre-processing option (repeatable)")
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("select", parents=[shared], help="weakly-supervised hyper-parameter selection: k-fold CV over patients, one-type validation anomalies")
    p.add_argument("--datalist", required=True, help="datalist with the training normals (and, by default, the anomalies)")
    p.add_argument("--out", required=True, help="folder for selection.json, selection.csv and config.json")
    p.add_argument("--detector", help=_LazyHelp("{detectors} (default: dpa)"))
    p.add_argument("--config", help="JSON with detector, base hparams and preprocessing")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="base hyper-parameter (repeatable)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="candidate values of a hyper-parameter (repeatable)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--validation-fraction", type=float, default=0.2, help="share of training-normal patients held out per fold")
    p.add_argument("--anomaly-section", help="datalist section of the validation anomalies (default validation_labelled; test for --anomaly-datalist)")
    p.add_argument("--anomaly-datalist", help="another datalist holding the validation anomalies")
    p.add_argument("--lesion-kind", help="keep only anomaly cases whose lesions are all of this kind")
    p.add_argument("--phantom-anomalies", type=int, default=0, metavar="N", help="generate N phantom cases with one --lesion-kind lesion each")
    p.add_argument("--roi-label", type=int, action="append")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.cmd_select)

    p = sub.add_parser("ingest", parents=[shared], help="store a DICOM series in a DICOMweb server (e.g. Orthanc), filling missing UIDs")
    p.add_argument("--series", required=True, help="folder of the series' DICOM files")
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--repaired", help="also write the repaired files to this folder")
    p.set_defaults(func=commands.cmd_ingest)

    p = sub.add_parser("app", parents=[shared], help="start the MONAI Label app (3D Slicer / OHIF) on a datastore")
    p.add_argument("--studies", help="folder of NIfTI/DICOM studies, or a DICOMweb URL")
    p.add_argument("--sample", help="write phantom sample studies here (when missing) and serve them")
    p.add_argument("--preset", default="small", help="phantom preset for --sample")
    p.add_argument("--models", help="comma-separated bundle names to serve (default: all)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--conf", action="append", metavar="KEY=VALUE", help="app option (model_dir, roi_dir, train_on_start, ...)")
    p.set_defaults(func=commands.cmd_app)
    return parser
