"""``monai-ad`` (also ``python -m monai_ad``): phantom data, train, infer, evaluate, demo, DICOMweb ingest, the MONAI Label app."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from monai_ad.allocator import keep_freed_memory
from monai_ad import DEFAULT_DETECTOR
from monai_ad.errors import InputError
from monai_ad.settings import SCHEDULE_NAMES


class _LazyHelp(str):
    """A help text whose ``{detectors}`` (the registered detector names) and ``{min_lesion_mm3}`` are filled in only
    when help is shown: they come from modules that import torch, which commands such as ``phantom`` need not pay for."""

    def __mod__(self, params: Any) -> str:  # argparse expands help texts with ``help % params``
        from monai_ad.detectors.base import available_detectors
        from monai_ad.postprocess import MIN_LESION_MM3

        text = self.replace("{detectors}", ", ".join(available_detectors()))
        return text.replace("{min_lesion_mm3}", f"{MIN_LESION_MM3:g}") % params


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(pairs: Sequence[str] | None, what: str) -> dict[str, Any]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"{what} must be KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


def _roi_labels(values: Sequence[int] | None):
    return None if not values else list(values)


def _volumes_in(path: Path) -> list[Path]:
    """A file, a DICOM series folder, or a folder of volumes (files, or one sub-folder per DICOM series)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError("not found", path)
    from monai_ad.io import VOLUME_SUFFIXES

    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))
    if files:
        return files
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if subdirs:
        return subdirs
    if any(p.is_file() for p in path.iterdir()):
        return [path]  # a DICOM series folder
    raise InputError("folder holds no volumes", path)


def _match_rois(images: list[Path], roi: Path | None) -> list[Path | None]:
    if roi is None:
        return [None] * len(images)
    if roi.is_file() or len(images) == 1:
        return [roi] * len(images)
    if not roi.is_dir():
        raise InputError("not found", roi)
    from monai_ad.data.datalists import case_name

    masks = {case_name(p): p for p in _volumes_in(roi)}
    missing = [str(p) for p in images if case_name(p) not in masks]
    if missing:
        raise InputError(f"no mask with the same name for {len(missing)} image(s), e.g. {missing[0]}", roi)
    return [masks[case_name(p)] for p in images]


# ----------------------------------------------------------------------------- options, checked before any work
def _check_writable(path: str | os.PathLike, what: str, is_file: bool = False) -> None:
    """``path`` (a folder, or with ``is_file`` a file) can be written: not the wrong kind of thing, and its nearest
    existing folder accepts a new file. Nothing is created."""
    path = Path(path)
    if is_file and path.is_dir():
        raise InputError(f"{what} is a folder; give the file to write", path)
    if not is_file and path.exists() and not path.is_dir():
        raise InputError(f"{what} is a file, not a folder", path)
    existing = path.parent if is_file else path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} cannot be created: {existing} is a file, not a folder", path)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"{what} is not writable ({exc.strerror or exc})", path) from None


def _check_range(what: str, value: Any, low: float | None = None, high: float | None = None, open_ends: bool = False) -> None:
    """A numeric option within ``[low, high]`` (``(low, high)`` with ``open_ends``); None (not given) passes."""
    if value is None:
        return
    below = low is not None and (value <= low if open_ends else value < low)
    above = high is not None and (value >= high if open_ends else value > high)
    if not math.isfinite(value) or below or above:
        if low is not None and high is not None:
            bounds = f"between {low:g} and {high:g}" + (" (exclusive)" if open_ends else "")
        elif low is not None:
            bounds = f"{'above' if open_ends else 'at least'} {low:g}"
        else:
            bounds = "a finite number"
        raise InputError(f"{what} must be {bounds}, got {value:g}")


OUT_IS_FILE = {"train"}  # --out names a file (the model); for every other command a folder


def _check_options(args: argparse.Namespace) -> None:
    """The options every command takes, checked before it starts work (one line each, exit 2)."""
    if getattr(args, "out", None):
        _check_writable(args.out, "--out", is_file=args.command in OUT_IS_FILE)
    if getattr(args, "repaired", None):
        _check_writable(args.repaired, "--repaired")
    for label in getattr(args, "roi_label", None) or []:
        if label <= 0:
            raise InputError(f"--roi-label must be a positive label value (0 is the background), got {label}")
    _check_range("--quantile", getattr(args, "quantile", None), 0.0, 1.0, open_ends=True)
    _check_range("--threshold", getattr(args, "threshold", None))
    _check_range("--slice-threshold", getattr(args, "slice_threshold", None))
    _check_range("--min-lesion-mm3", getattr(args, "min_lesion_mm3", None), 0.0)
    _check_range("--validation-fraction", getattr(args, "validation_fraction", None), 0.0, 1.0, open_ends=True)
    for name in ("normal", "abnormal", "phantom_anomalies"):
        _check_range(f"--{name.replace('_', '-')}", getattr(args, name, None), 0)
    _check_range("--epochs", getattr(args, "epochs", None), 1)
    _check_range("--folds", getattr(args, "folds", None), 2)
    if args.command in ("phantom", "demo"):
        from monai_ad.data.phantom import PRESETS

        if args.preset not in PRESETS:
            raise InputError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")


def _check_detector_options(
    detector: str, hparams: Mapping[str, Any], preprocessing: Mapping[str, Any] | None = None, grid: Mapping[str, list] | None = None
) -> None:
    """Hyper-parameters (``--set``, a config's ``hparams``, each ``--grid`` value) and pre-processing options, checked
    against the detector's constructor and the accepted ranges before any data is read or model fitted."""
    from monai_ad.detectors.base import check_hparams, detector_class
    from monai_ad.transforms.pipeline import PreprocessConfig

    check_hparams(detector, hparams)
    for key, values in (grid or {}).items():
        for value in values:
            check_hparams(detector, {**hparams, key: value})
    PreprocessConfig.with_defaults(detector_class(detector).default_preprocessing, preprocessing)


# ----------------------------------------------------------------------------- subcommands
def cmd_phantom(args: argparse.Namespace) -> None:
    from monai_ad.data.phantom import write_phantom_dataset

    datalist = write_phantom_dataset(
        args.out, n_normal=args.normal, n_abnormal=args.abnormal, seed=args.seed, preset=args.preset, progress=not args.quiet
    )
    print(f"datalist: {datalist}")


def load_run_config(path: str | None) -> dict[str, Any]:
    """A training config JSON: ``{"detector": ..., "hparams": {...}, "preprocessing": {...}}``."""
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError("config file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"is not valid JSON ({exc})", path) from None
    unknown = set(config) - {"detector", "hparams", "preprocessing", "description"} if isinstance(config, dict) else {"?"}
    if unknown:
        raise InputError(f"unknown config key(s) {sorted(unknown)}; expected detector, hparams, preprocessing", path)
    return config


def cmd_prepare(args: argparse.Namespace) -> None:
    from monai_ad.data.prepare import datalist_summary, prepare_liver_benchmark

    datalist = prepare_liver_benchmark(
        args.out, btcv=args.btcv, lits=args.lits, msd=args.msd, seed=args.seed, slices=not args.no_slices, progress=not args.quiet
    )
    print(f"datalist: {datalist} {datalist_summary(datalist)}")
    if not args.no_slices:
        print(f"BMAD slices: {Path(args.out) / 'bmad'}")


def cmd_train(args: argparse.Namespace) -> None:
    from monai_ad.detectors.base import detector_class
    from monai_ad.training import train

    config = load_run_config(args.config)
    detector_name = args.detector or config.get("detector", DEFAULT_DETECTOR)
    schedule = detector_class(detector_name).schedule(args.schedule)
    hparams = {**schedule, **config.get("hparams", {}), **_key_values(args.set, "--set")}
    if args.backbone:
        hparams["backbone"] = args.backbone
    if args.weights:
        hparams["weights"] = args.weights
    if args.allow_random_weights:
        hparams["allow_random_weights"] = True
    preprocessing = {**config.get("preprocessing", {}), **_key_values(args.preprocess, "--preprocess")}
    _check_detector_options(detector_name, hparams, preprocessing)
    detector = train(
        detector_name,
        args.datalist,
        args.out,
        hparams=hparams,
        preprocessing=preprocessing,
        roi_labels=_roi_labels(args.roi_label),
        quantile=args.quantile,
        false_regions_per_scan=args.false_regions,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"model: {args.out}")
    print(f"thresholds: {json.dumps(detector.thresholds)}")


def _predict_options(args: argparse.Namespace) -> dict[str, Any]:
    from monai_ad.postprocess import MIN_LESION_MM3

    return {
        "roi_labels": _roi_labels(args.roi_label),
        "pixel_threshold": args.threshold,
        "slice_threshold": args.slice_threshold,
        "min_lesion_mm3": MIN_LESION_MM3 if args.min_lesion_mm3 is None else args.min_lesion_mm3,
        "device": args.device,
    }


def cmd_infer(args: argparse.Namespace) -> None:
    from monai_ad.prediction import Predictor, infer

    images = _volumes_in(Path(args.image))
    if args.roi is None:
        raise InputError(
            "no liver mask given: pass --roi with a liver label file (or an organ segmentation and --roi-label)",
            args.image,
        )
    rois = _match_rois(images, Path(args.roi))
    predictor = Predictor(args.model, **_predict_options(args))
    results = infer(predictor, images, rois, args.out, progress=not args.quiet)
    for result in results:
        s = result.summary
        print(f"{result.case}: {len(s['abnormal_slices'])} abnormal slice(s), {len(s['lesions'])} region(s)")
        for kind, path in result.files.items():
            print(f"  {kind}: {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from monai_ad.evaluation import evaluate
    from monai_ad.prediction import Predictor

    predictor = Predictor(args.model, **_predict_options(args))
    values = evaluate(predictor, args.datalist, args.out, key=args.key, progress=not args.quiet)
    _print_metrics(values)


def cmd_benchmark(args: argparse.Namespace) -> None:
    from monai_ad.evaluation import benchmark

    config = load_run_config(args.config)
    hparams = {**config.get("hparams", {}), **_key_values(args.set, "--set")}
    detector = args.detector or config.get("detector", DEFAULT_DETECTOR)
    _check_detector_options(detector, hparams, config.get("preprocessing"))
    summary = benchmark(
        detector, args.datalist, args.out, seeds=args.seeds, hparams=hparams,
        preprocessing=config.get("preprocessing"), roi_labels=_roi_labels(args.roi_label), device=args.device,
        progress=not args.quiet,
    )  # fmt: skip
    print(summary["table"])
    print(f"  results: {Path(args.out) / 'benchmark.json'}")


def _print_metrics(values: dict[str, Any]) -> None:
    keys = ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auroc_roi", "aupro", "aupro_roi", "dice", "dice_label_map",
            "slice_f1", "lesion_sensitivity", "lesion_sensitivity_10mm", "false_regions_per_scan", "lesion_froc_1fp",
            "lesion_coverage_under_10mm")  # fmt: skip
    number = lambda value: "n/a" if value is None else f"{value:.4f}"  # noqa: E731
    for key in keys:
        print(f"  {key:26s} {number(values.get(key))}")
    by_size = values.get("lesions_by_size")
    if by_size:
        reading = values.get("lesion_reading", {})
        print(f"  lesions by size: FROC sensitivity at <= {reading.get('fp_per_scan', 1):g} false region per scan; coverage "
              f"and detected at {reading.get('coverage_fpr', 0.05):.0%} FPR of normal liver voxels")  # fmt: skip
        print(f"    {'size':10s} {'lesions':>8s} {'FROC':>8s} {'coverage':>9s} {'detected':>9s}")
        for name, figures in by_size.items():
            print(f"    {name:10s} {figures['n_lesions']:8d} {number(figures['sensitivity']):>8s} "
                  f"{number(figures['coverage']):>9s} {number(figures['detected']):>9s}")  # fmt: skip
    for kind, path in values.get("files", {}).items():
        print(f"  {kind}: {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    from monai_ad.data.phantom import write_phantom_dataset
    from monai_ad.detectors.base import detector_class
    from monai_ad.evaluation import evaluate
    from monai_ad.training import train

    out = Path(args.out)
    hparams = {**detector_class(args.detector).schedule(args.schedule), **_key_values(args.set, "--set")}
    if args.detector == "simplenet" and args.epochs is not None:
        hparams["meta_epochs"] = args.epochs
    preprocessing = _key_values(args.preprocess, "--preprocess")
    _check_detector_options(args.detector, hparams, preprocessing)
    start = time.perf_counter()
    print(f"[1/4] phantom CT dataset ({args.normal} normal + {args.abnormal} abnormal, preset {args.preset})")
    datalist = write_phantom_dataset(
        out / "data", n_normal=args.normal, n_abnormal=args.abnormal, seed=args.seed, preset=args.preset, progress=not args.quiet
    )
    print(f"[2/4] training {args.detector} on the normal volumes ({json.dumps(hparams)})")
    model = out / f"{args.detector}.pt"
    train(args.detector, datalist, model, hparams=hparams, preprocessing=preprocessing, device=args.device, progress=not args.quiet)
    print("[3/4] inference and evaluation on the held-out volumes")
    values = evaluate(model, datalist, out / "evaluation", progress=not args.quiet, device=args.device)
    print("[4/4] done in {:.0f} s".format(time.perf_counter() - start))
    print(f"  data: {datalist}")
    print(f"  model: {model}")
    print(f"  heatmaps, label maps, summaries: {out / 'evaluation' / 'volumes'}")
    _print_metrics(values)


def cmd_ingest(args: argparse.Namespace) -> None:
    from monai_ad.dicomweb import ingest_series

    uids = ingest_series(args.series, args.url, repaired_dir=args.repaired)
    print(json.dumps({"StudyInstanceUID": uids.study, "SeriesInstanceUID": uids.series, "instances": len(uids.instances)}))


def cmd_app(args: argparse.Namespace) -> None:
    from monai_ad.label_server import run_app

    conf = {k: str(v) for k, v in _key_values(args.conf, "--conf").items()}
    if args.models:
        conf["models"] = args.models
    code = run_app(args.studies, args.sample, port=args.port, host=args.host, conf=conf, preset=args.preset)
    if code:
        raise InputError(f"the MONAI Label server exited with code {code}")


def _grid_values(pairs: Sequence[str] | None) -> dict[str, list[Any]]:
    """``--grid KEY=V1,V2`` (each value read as JSON when it parses) or ``--grid KEY=[JSON list]``."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InputError(f"--grid must be KEY=V1,V2,..., got {pair!r}")
        key, text = (s.strip() for s in pair.split("=", 1))
        if text.startswith("["):
            values = _parse_value(text)
            if not isinstance(values, list):
                raise InputError(f"--grid {key}: not a JSON list: {text!r}")
        else:
            values = [_parse_value(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise InputError(f"--grid {key} has no values")
        grid[key] = values
    return grid


def cmd_select(args: argparse.Namespace) -> None:
    from monai_ad.data.datalists import load_datalist
    from monai_ad.selection import select_hyperparameters, write_phantom_anomalies

    config = load_run_config(args.config)
    hparams = {**config.get("hparams", {}), **_key_values(args.set, "--set")}
    detector = args.detector or config.get("detector", "dpa")
    grid = _grid_values(args.grid)
    _check_detector_options(detector, hparams, config.get("preprocessing"), grid)
    anomalies = None
    if args.phantom_anomalies:
        if not args.lesion_kind:
            raise InputError("--phantom-anomalies needs --lesion-kind (hypodense, hyperdense, rim or cyst)")
        try:  # the training phantoms' preset, so the anomalies look alike
            preset = str(json.loads(Path(args.datalist).read_text()).get("preset") or "tiny")
        except (OSError, ValueError, AttributeError):
            preset = "tiny"
        anomalies = write_phantom_anomalies(Path(args.out) / "anomalies", args.lesion_kind, args.phantom_anomalies, preset, args.seed + 1000)
    elif args.anomaly_datalist:
        anomalies = load_datalist(args.anomaly_datalist, args.anomaly_section or "test")
    report = select_hyperparameters(
        args.datalist, args.out, detector=detector, grid=grid or None, base_hparams=hparams,
        preprocessing=config.get("preprocessing"), anomalies=anomalies, anomaly_section=args.anomaly_section,
        lesion_kind=args.lesion_kind, folds=args.folds, validation_fraction=args.validation_fraction,
        roi_labels=_roi_labels(args.roi_label), seed=args.seed, device=args.device, progress=not args.quiet,
    )  # fmt: skip
    for row in report["candidates"]:
        mark = "*" if row["index"] == report["chosen"]["index"] else " "
        print(f"{mark} {json.dumps(row['hparams'])}: slice AUROC {row['mean_auroc']:.4f} ± {row['std_auroc']:.4f}")
    for kind, path in report["files"].items():
        print(f"  {kind}: {path}")


# ----------------------------------------------------------------------------- parser
def _add_predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roi-label", type=int, action="append", help="label value(s) of the liver in the mask (default: any non-zero; 5 for TotalSegmentator)")
    p.add_argument("--threshold", type=float, help="pixel threshold for the label map (default: the model's calibrated one)")
    p.add_argument("--slice-threshold", type=float, help="slice-score threshold for abnormal slices (default: the model's)")
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
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("prepare", parents=[shared], help="BMAD liver protocol: BTCV normals + LiTS/MSD tests → datalist and 2-D slices")
    p.add_argument("--btcv", required=True, help="BTCV folder (img/imgNNNN.nii.gz, label/labelNNNN.nii.gz)")
    p.add_argument("--lits", help="LiTS folder (volume-N.nii, segmentation-N.nii)")
    p.add_argument("--msd", help="folder that holds Task03_Liver (MSD)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level splits")
    p.add_argument("--no-slices", action="store_true", help="only the 3-D datalist, not BMAD's 2-D slice folders")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", parents=[shared], help="fit a detector on the normal volumes of a datalist")
    p.add_argument("--datalist", required=True)
    p.add_argument("--detector", help=_LazyHelp("{detectors} (default: %s)" % DEFAULT_DETECTOR))
    p.add_argument("--config", help="JSON with detector, hparams and preprocessing (see sample_configs/)")
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default="paper",
                   help="the detector's named schedule under --config and --set: paper (default: its defaults), "
                        "cpu (the CPU demonstration the accuracy benchmark measures), quick (a smoke run)")
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("infer", parents=[shared], help="heatmap, label map and summary for a volume or a folder of volumes")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True, help="a volume (NIfTI, NRRD, MHA), a DICOM series folder, or a folder of them")
    p.add_argument("--roi", help="liver mask or organ segmentation (file, or folder with masks named as the images)")
    p.add_argument("--out", required=True)
    _add_predict_options(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("evaluate", parents=[shared], help="metrics and PNG report on a labelled datalist")
    p.add_argument("--model", required=True)
    p.add_argument("--datalist", required=True)
    p.add_argument("--key", default="test", help="datalist section (default: test)")
    p.add_argument("--out", required=True)
    _add_predict_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("benchmark", parents=[shared], help="train + evaluate over several seeds; BMAD-style mean ± std table")
    p.add_argument("--datalist", required=True)
    p.add_argument("--detector", help=_LazyHelp("{detectors} (default: %s)" % DEFAULT_DETECTOR))
    p.add_argument("--config", help="JSON with detector, hparams and preprocessing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--roi-label", type=int, action="append")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_benchmark)

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
    p.set_defaults(func=cmd_demo)

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
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("ingest", parents=[shared], help="store a DICOM series in a DICOMweb server (e.g. Orthanc), filling missing UIDs")
    p.add_argument("--series", required=True, help="folder of the series' DICOM files")
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--repaired", help="also write the repaired files to this folder")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("app", parents=[shared], help="start the MONAI Label app (3D Slicer / OHIF) on a datastore")
    p.add_argument("--studies", help="folder of NIfTI/DICOM studies, or a DICOMweb URL")
    p.add_argument("--sample", help="write phantom sample studies here (when missing) and serve them")
    p.add_argument("--preset", default="small", help="phantom preset for --sample")
    p.add_argument("--models", help="comma-separated bundle names to serve (default: all)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--conf", action="append", metavar="KEY=VALUE", help="app option (model_dir, roi_dir, train_on_start, ...)")
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    keep_freed_memory()
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: train and infer split their work
            from monai_ad import distributed

            distributed.init_from_environment()
        _check_options(args)
        args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything unexpected still gets one line; --verbose shows the traceback
        if args.verbose:
            raise
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
