"""The ``monai-ad`` sub-commands, one function each over the library (heavy imports inside, so ``--help`` stays fast)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from monai_ad import DEFAULT_DETECTOR
from monai_ad.cli.options import detector_settings, grid_values, key_values, match_rois, roi_labels, volumes_in
from monai_ad.errors import InputError


def cmd_phantom(args: argparse.Namespace) -> None:
    from monai_ad.data.phantom import write_phantom_dataset

    datalist = write_phantom_dataset(
        args.out, n_normal=args.normal, n_abnormal=args.abnormal, seed=args.seed, preset=args.preset, progress=not args.quiet
    )
    print(f"datalist: {datalist}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from monai_ad.data.prepare import datalist_summary, prepare_liver_benchmark

    datalist = prepare_liver_benchmark(
        args.out, btcv=args.btcv, lits=args.lits, msd=args.msd, seed=args.seed, slices=not args.no_slices, progress=not args.quiet,
        unlabelled_fraction=args.unlabelled_fraction,
    )
    print(f"datalist: {datalist} {datalist_summary(datalist)}")
    if not args.no_slices:
        print(f"BMAD slices: {Path(args.out) / 'bmad'}")


def cmd_train(args: argparse.Namespace) -> None:
    from monai_ad.training import train

    detector_name, hparams, preprocessing = detector_settings(args, DEFAULT_DETECTOR)
    detector = train(
        detector_name,
        args.datalist,
        args.out,
        hparams=hparams,
        preprocessing=preprocessing,
        roi_labels=roi_labels(args.roi_label),
        quantile=args.quantile,
        false_regions_per_scan=args.false_regions,
        device=args.device,
        progress=not args.quiet,
        use_unlabelled=not args.no_unlabelled,
    )
    print(f"model: {args.out}")
    print(f"thresholds: {json.dumps(detector.thresholds)}")


def predict_options(args: argparse.Namespace) -> dict[str, Any]:
    from monai_ad.postprocess import MIN_LESION_MM3

    return {
        "roi_labels": roi_labels(args.roi_label),
        "pixel_threshold": args.threshold,
        "slice_threshold": args.slice_threshold,
        "false_alarm_rate": args.false_alarm_rate,
        "min_lesion_mm3": MIN_LESION_MM3 if args.min_lesion_mm3 is None else args.min_lesion_mm3,
        "device": args.device,
    }


def cmd_infer(args: argparse.Namespace) -> None:
    from monai_ad.prediction import Predictor, infer
    from monai_ad.triage import hu_window, one_line, write_scan_picture

    images = volumes_in(Path(args.image))
    if args.roi is None:
        raise InputError(
            "no liver mask given: pass --roi with a liver label file (or an organ segmentation and --roi-label)",
            args.image,
        )
    rois = match_rois(images, Path(args.roi))
    if args.dicom_store and not any(Path(image).is_dir() for image in images):
        raise InputError("--dicom-store stores the DICOM results of DICOM series inputs: none is a DICOM series folder", args.image)
    predictor = Predictor(args.model, **predict_options(args))
    window = hu_window(predictor)

    def picture(result) -> None:  # the top slices with overlays, drawn while the result holds its arrays
        try:
            path = write_scan_picture(result, Path(args.out) / f"{result.case}_picture.png", window)
        except Exception as error:  # the picture is a view of outputs already written: it never stops the run
            result.summary.setdefault("warnings", []).append(f"no picture: {one_line(error)}")
            return
        if path is not None:
            result.files["picture"] = str(path)

    results = infer(predictor, images, rois, args.out, progress=not args.quiet, on_result=picture)
    failed = []
    for result in results:
        s = result.summary
        if Path(s["image"]).is_dir():  # a DICOM series: SEG, parametric map and SR beside the NIfTI outputs
            from monai_ad.dicom_results import dicom_results_for

            try:
                result.files.update(dicom_results_for(s["image"], result, args.out, model=args.model, store_url=args.dicom_store))
            except Exception as error:  # each case's objects are written all or nothing; the other cases go on
                failed.append(result.case)
                s.setdefault("warnings", []).append(f"no DICOM results: {one_line(error)}")
        p_value = "" if s.get("p_value") is None else f", p = {s['p_value']:.3g} against {s['conformal']['n_calibration_scans']} normal scans"
        print(f"{result.case}: {len(s['abnormal_slices'])} abnormal slice(s), {len(s['lesions'])} region(s){p_value}")
        for warning in s.get("warnings", []):
            print(f"  warning: {warning}")
        for kind, path in result.files.items():
            print(f"  {kind}: {path}")
    if failed:
        raise InputError(f"the DICOM results of {len(failed)} case(s) were not written ({', '.join(failed)}): see the warnings above", args.out)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from monai_ad.evaluation import evaluate
    from monai_ad.prediction import Predictor

    predictor = Predictor(args.model, **predict_options(args))
    values = evaluate(predictor, args.datalist, args.out, key=args.key, progress=not args.quiet)
    print_metrics(values)


def cmd_triage(args: argparse.Namespace) -> None:
    from monai_ad.triage import StudyPredictor, remote_rois, remote_series, triage

    if args.studies.startswith(("http://", "https://")):
        images = remote_series(args.studies)
        rois = remote_rois(images, args.roi)
    else:
        if args.roi is None:
            raise InputError("no liver masks given: pass --roi with a liver label file or a folder of masks named as the studies", args.studies)
        images = volumes_in(Path(args.studies))
        rois = match_rois(images, Path(args.roi))
    worklist = triage(StudyPredictor(args.model, **predict_options(args)), images, rois, args.out, progress=not args.quiet)
    if not worklist["files"]:  # under torchrun, another process wrote the worklist
        return
    for row in worklist["rows"][:10]:
        score = "" if row["study_score"] is None else f"score {row['study_score']:.4g}"
        p_value = "" if row["p_value"] is None else f", p = {row['p_value']:.3g}"
        print(f"{row['rank']:4d}. {row['study']}: {score or row['status']}{p_value}")
    failed = sum(row["status"] != "ok" for row in worklist["rows"])
    if failed:
        print(f"  {failed} of {len(worklist['rows'])} studies could not be scored (their reasons are in the worklist)")
    for kind, path in worklist["files"].items():
        print(f"  {kind}: {path}")


def cmd_benchmark(args: argparse.Namespace) -> None:
    from monai_ad.evaluation import benchmark

    detector, hparams, preprocessing = detector_settings(args, DEFAULT_DETECTOR)
    summary = benchmark(
        detector, args.datalist, args.out, seeds=args.seeds, hparams=hparams,
        preprocessing=preprocessing, roi_labels=roi_labels(args.roi_label), device=args.device,
        progress=not args.quiet,
    )  # fmt: skip
    print(summary["table"])
    print(f"  results: {Path(args.out) / 'benchmark.json'}")


def print_metrics(values: dict[str, Any]) -> None:
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
    from monai_ad.evaluation import evaluate
    from monai_ad.training import train

    out = Path(args.out)
    _, hparams, preprocessing = detector_settings(args, args.detector)
    if args.detector == "simplenet" and args.epochs is not None:
        hparams["meta_epochs"] = args.epochs
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
    print_metrics(values)


def cmd_ingest(args: argparse.Namespace) -> None:
    from monai_ad.dicomweb import ingest_series

    uids = ingest_series(args.series, args.url, repaired_dir=args.repaired)
    print(json.dumps({"StudyInstanceUID": uids.study, "SeriesInstanceUID": uids.series, "instances": len(uids.instances)}))


def cmd_app(args: argparse.Namespace) -> None:
    from monai_ad.label_server import run_app

    conf = {k: str(v) for k, v in key_values(args.conf, "--conf").items()}
    if args.models:
        conf["models"] = args.models
    code = run_app(args.studies, args.sample, port=args.port, host=args.host, conf=conf, preset=args.preset)
    if code:
        raise InputError(f"the MONAI Label server exited with code {code}")


def cmd_select(args: argparse.Namespace) -> None:
    from monai_ad.data.datalists import load_datalist
    from monai_ad.selection import select_hyperparameters, write_phantom_anomalies

    grid = grid_values(args.grid)
    detector, hparams, preprocessing = detector_settings(args, "dpa", grid)
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
        preprocessing=preprocessing, anomalies=anomalies, anomaly_section=args.anomaly_section,
        lesion_kind=args.lesion_kind, folds=args.folds, validation_fraction=args.validation_fraction,
        roi_labels=roi_labels(args.roi_label), seed=args.seed, device=args.device, progress=not args.quiet,
    )  # fmt: skip
    for row in report["candidates"]:
        mark = "*" if row["index"] == report["chosen"]["index"] else " "
        print(f"{mark} {json.dumps(row['hparams'])}: slice AUROC {row['mean_auroc']:.4f} ± {row['std_auroc']:.4f}")
    for kind, path in report["files"].items():
        print(f"  {kind}: {path}")
