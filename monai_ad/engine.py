"""The workflows behind the CLI and the bundles: train on normal volumes, infer on a volume, evaluate."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose
from tqdm.auto import tqdm

from monai_ad import distributed
from monai_ad.detectors.base import AnomalyDetector, create_detector, detector_class
from monai_ad.errors import InputError
from monai_ad.inferers import SliceAnomalyInferer
from monai_ad.io import VOLUME_SUFFIXES, atomic_path, save_nifti, write_json
from monai_ad.postprocess import MIN_LESION_MM3, axial_axis
from monai_ad.transforms.array import HUWindow, SelectROI
from monai_ad.transforms.pipeline import (
    IMAGE,
    ROI,
    PRED,
    LoadVolumed,
    PreprocessConfig,
    build_postprocessing,
    build_preprocessing,
    require_roi,
    run_pipeline,
)

logger = logging.getLogger(__name__)

LESION_LABEL = 2  # LiTS convention: 0 background, 1 liver, 2 lesion
SOURCE = "source"  # the paths a volume was read from, carried to its summary


# ----------------------------------------------------------------------------- data
def load_datalist(path: str | os.PathLike, key: str) -> list[dict[str, Any]]:
    """Items of one section of a MONAI datalist JSON, with paths made absolute against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError("datalist not found", path)
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"is not valid JSON ({exc})", path) from None
    if not isinstance(content, dict) or not isinstance(content.get(key), list) or not content[key]:
        raise InputError(f"has no non-empty {key!r} list", path)
    items = []
    for item in content[key]:
        item = dict(item)
        for k in (IMAGE, ROI, "label"):
            if isinstance(item.get(k), str):
                item[k] = str((path.parent / item[k]).resolve())
        items.append(item)
    return items


def roi_source(item: Mapping[str, Any]) -> Any:
    """A case's liver mask: its ``roi`` entry, else its label (LiTS style: liver + lesion)."""
    return item.get(ROI) or item.get("label")


def case_name(image_path: str | os.PathLike) -> str:
    name = Path(image_path).name
    for suffix in (*VOLUME_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def collect_slices(
    items: Sequence[Mapping[str, Any]],
    config: PreprocessConfig,
    roi_labels: Sequence[int] | int | None = None,
    progress: bool = True,
    desc: str = "slices",
    lesions: bool = False,
) -> dict[str, torch.Tensor]:
    """The scored axial slices of several volumes: ``{"image": [N,1,S,S] float16, "roi": [N,1,S,S] bool}``,
    with ``lesions``: also ``"lesion"`` ([N,1,S,S] bool, label ``LESION_LABEL`` of each item's ``label``) and
    ``"case"`` ([N] index of the item each slice comes from).

    Slices are kept in half precision (windowed intensities in [0, 1] lose nothing a detector sees).
    """
    pipeline = build_preprocessing(config, roi_labels, mask_keys=["label"] if lesions else ())
    images, rois, lesion_masks, cases = [], [], [], []
    for index, item in enumerate(tqdm(items, desc=desc, disable=not progress, unit="volume")):
        inputs = {"label": item["label"]} if lesions else {}
        if lesions and not item.get("label"):
            raise InputError("a case has no 'label' to take lesion masks from", item.get(IMAGE))
        data = {IMAGE: item[IMAGE], ROI: roi_source(item), **inputs}
        require_roi(data, item[IMAGE])
        data = run_pipeline(pipeline, data)
        img, roi = data[IMAGE].as_tensor(), data[ROI].as_tensor() > 0
        keep = roi.flatten(0, 2).sum(0) >= config.min_roi_pixels
        images.append(img[..., keep].permute(3, 0, 1, 2).half())
        rois.append(roi[..., keep].permute(3, 0, 1, 2))
        if lesions:
            lesion_masks.append((data["label"].as_tensor() == LESION_LABEL)[..., keep].permute(3, 0, 1, 2))
            cases.append(torch.full((int(keep.sum()),), index))
    image = torch.cat(images)
    if image.shape[0] == 0:
        raise InputError("no slice of the given volumes contains enough of the liver ROI")
    out = {"image": image, "roi": torch.cat(rois)}
    if lesions:
        out.update({"lesion": torch.cat(lesion_masks), "case": torch.cat(cases)})
    return out


class SliceBatches:
    """Re-iterable batches over collected slices (float32 per batch), as ``AnomalyDetector.fit`` accepts."""

    def __init__(self, slices: Mapping[str, torch.Tensor], batch_size: int = 16, shuffle: bool = False, seed: int = 0):
        self.slices, self.batch_size, self.shuffle = slices, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.slices["image"].shape[0] // self.batch_size)

    def __iter__(self):
        n = self.slices["image"].shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {"image": self.slices["image"][idx].float(), "roi": self.slices["roi"][idx]}


# ----------------------------------------------------------------------------- training
def train(
    detector: str | AnomalyDetector,
    datalist: str | os.PathLike,
    output: str | os.PathLike,
    hparams: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    roi_labels: Sequence[int] | int | None = None,
    quantile: float | None = None,
    device: str | None = None,
    progress: bool = True,
    false_regions_per_scan: float = 1.0,
) -> AnomalyDetector:
    """Fit a detector on the datalist's ``training`` normals, set thresholds on its ``validation`` normals
    (or on a held-out fifth of the training volumes when there is none), save it to ``output``.

    The operating thresholds allow about ``false_regions_per_scan`` false alarms per normal validation scan
    (``AnomalyDetector.calibrate``); ``quantile`` sets them as a plain quantile of normal slices instead."""
    kind = type(detector) if isinstance(detector, AnomalyDetector) else detector_class(detector)
    config = PreprocessConfig.from_dict({**kind.default_preprocessing, **dict(preprocessing or {})})
    if isinstance(detector, str):
        detector = create_detector(detector, **{"in_channels": config.in_channels, **dict(hparams or {})})
    if detector.in_channels != config.in_channels:
        raise InputError(
            f"the {detector.name} detector takes {detector.in_channels}-channel slices but the pre-processing gives "
            f"{config.in_channels} (set the detector's in_channels to match)"
        )
    detector.to(resolve_device(device))
    config.image_size = detector.image_size
    detector.preprocessing = config.to_dict()  # before fitting: a detector may read it (pixel size, normalisation)
    training = load_datalist(datalist, "training")
    try:
        validation = load_datalist(datalist, "validation")
    except InputError:
        n_hold = max(1, len(training) // 5) if len(training) > 1 else 0
        validation, training = training[:n_hold], training[n_hold:] or training
    train_slices = collect_slices(distributed.shard(training), config, roi_labels, progress, desc="training volumes")
    logger.info("fitting %s on %d normal slices", detector.name, train_slices["image"].shape[0])
    detector.fit(SliceBatches(train_slices, batch_size=int(detector.hparams.get("batch_size", 16))), progress=progress)
    valid_slices = collect_slices(validation, config, roi_labels, progress, desc="validation volumes")
    detector.calibrate(
        SliceBatches(valid_slices, batch_size=32), quantile=quantile,
        false_regions_per_scan=false_regions_per_scan, n_scans=len(validation),
    )  # fmt: skip
    if distributed.is_main_process():
        detector.save(output)
    distributed.barrier()
    return detector


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``: this process's GPU when there is one (under torchrun, the one for its local rank), else the CPU."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------- inference
@dataclass
class VolumeResult:
    """A detector's reading of one volume, in the scan's own geometry."""

    case: str
    heatmap: np.ndarray  # float32, the input image's shape
    label_map: np.ndarray  # uint8, 1 = anomaly
    affine: np.ndarray
    summary: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


class VolumePredictor:
    """Everything needed to read volumes with one trained detector (built once, used for many volumes)."""

    def __init__(
        self,
        detector: AnomalyDetector | str | os.PathLike,
        roi_labels: Sequence[int] | int | None = None,
        pixel_threshold: float | None = None,
        slice_threshold: float | None = None,
        min_lesion_mm3: float = MIN_LESION_MM3,
        batch_size: int = 32,
        device: str | None = None,
        preprocessing: Compose | None = None,
        inferer: SliceAnomalyInferer | None = None,
        postprocessing: Compose | None = None,
    ):
        """``preprocessing`` / ``inferer`` / ``postprocessing`` default to the ones built from the model (a bundle
        passes its configured components instead)."""
        if not isinstance(detector, AnomalyDetector):
            detector = AnomalyDetector.load(detector, device=resolve_device(device))
        self.detector = detector
        self.config = PreprocessConfig.from_dict(detector.preprocessing or {"image_size": detector.image_size})
        thresholds = detector.thresholds or {}
        self.pixel_threshold = pixel_threshold if pixel_threshold is not None else thresholds.get("pixel")
        self.slice_threshold = slice_threshold if slice_threshold is not None else thresholds.get("slice")
        if self.pixel_threshold is None or self.slice_threshold is None:
            raise InputError("the model has no stored thresholds: give a pixel and a slice threshold")
        self.pipeline = preprocessing or build_preprocessing(self.config, roi_labels, concat=True)
        self.inferer = inferer or SliceAnomalyInferer(batch_size=batch_size, min_roi_pixels=self.config.min_roi_pixels)
        # a pixel threshold set by hand outlines regions at itself; the model's own, at its calibrated extent
        self.extent_threshold = thresholds.get("extent") if pixel_threshold is None else None
        self.postprocessing = postprocessing or build_postprocessing(
            self.pipeline, self.pixel_threshold, self.slice_threshold, min_lesion_mm3, self.extent_threshold
        )

    def __call__(
        self,
        image: Any,
        roi: Any,
        output_dir: str | os.PathLike | None = None,
        name: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> VolumeResult:
        """Read one volume; with ``timings`` given, the seconds spent in each stage are added to it."""
        return self.finish(self.prepare(image, roi, timings), output_dir, name, timings)

    def prepare(self, image: Any, roi: Any, timings: dict[str, float] | None = None) -> dict[str, Any]:
        """Load and pre-process one volume (the CPU part, which a prefetching thread can run ahead)."""
        data = {IMAGE: image, ROI: roi}
        require_roi(data, image)
        with stage_timer(timings, "load"):
            data = run_pipeline(self.pipeline, data, end=1)
        with stage_timer(timings, "preprocess"):
            data = run_pipeline(self.pipeline, data, start=1)
        data[SOURCE] = {"image": str(image), "roi": str(roi)}
        return data

    def finish(
        self,
        data: dict[str, Any],
        output_dir: str | os.PathLike | None = None,
        name: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> VolumeResult:
        """Score a pre-processed volume, take the maps back to the scan's geometry, optionally write them."""
        source = data.pop(SOURCE)
        with stage_timer(timings, "inference", self.detector.device):
            data[PRED] = self.inferer(data[IMAGE][None], self.detector)[0]
        with stage_timer(timings, "reassembly"):
            data = self.postprocessing(data, end=len(self.postprocessing.transforms) - 1)
        with stage_timer(timings, "label_map"):
            data = self.postprocessing(data, start=len(self.postprocessing.transforms) - 1)
        name = name or case_name(source["image"])
        summary = {
            "case": name,
            **source,
            "detector": self.detector.name,
            **data["anomaly_summary"],
            "calibration": self.detector.thresholds,
        }
        heatmap = data["heatmap"]
        result = VolumeResult(
            name,
            heatmap.as_tensor()[0].numpy(),
            data[PRED].as_tensor()[0].numpy().astype(np.uint8, copy=False),
            np.asarray(heatmap.affine, dtype=np.float64),
            summary,
        )
        if output_dir is not None:
            with stage_timer(timings, "write"):
                result.files = write_outputs(result, output_dir)
        return result


@contextlib.contextmanager
def stage_timer(timings: dict[str, float] | None, stage: str, device: torch.device | None = None):
    """Add the wall-clock seconds of the block to ``timings[stage]`` (CUDA work is waited for first)."""
    if timings is None:
        yield
        return
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def write_outputs(result: VolumeResult, output_dir: str | os.PathLike) -> dict[str, str]:
    """Heatmap and label map as NIfTI in the input's geometry, and the JSON summary; all or nothing."""
    out = Path(output_dir)
    files = {
        "heatmap": out / f"{result.case}_heatmap.nii.gz",
        "label_map": out / f"{result.case}_anomaly.nii.gz",
        "summary": out / f"{result.case}_summary.json",
    }
    summary = {**result.summary, "files": {k: str(v) for k, v in files.items()}}
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(v)) for k, v in files.items()}
        with ThreadPoolExecutor(max_workers=2) as pool:  # compression releases the GIL: both volumes at once
            writes = [pool.submit(save_nifti, result.heatmap, result.affine, tmp["heatmap"]),
                      pool.submit(save_nifti, result.label_map, result.affine, tmp["label_map"], "label")]  # fmt: skip
            tmp["summary"].write_text(json.dumps(summary, indent=2) + "\n")
            for write in writes:
                write.result()
    result.summary = summary
    return {k: str(v) for k, v in files.items()}


def infer(
    model: str | os.PathLike | AnomalyDetector,
    images: Sequence[Any],
    rois: Sequence[Any],
    output_dir: str | os.PathLike,
    progress: bool = True,
    prefetch: bool = True,
    **options: Any,
) -> list[VolumeResult]:
    """Read many volumes and write each one's outputs as soon as it is done.

    Volumes stream: while one is scored, the next is loaded and pre-processed in a background thread, and only
    the summaries are kept (the returned results carry no arrays). Under torch.distributed (torchrun) each
    process reads its share of the volumes and the returned list holds this process's results.
    """
    predictor = VolumePredictor(model, **options)
    cases = distributed.shard(list(zip(images, rois)))
    results = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i, (image, roi) in enumerate(tqdm(cases, desc="inference", disable=not progress, unit="volume")):
            data = pending.result() if pending is not None else predictor.prepare(image, roi)
            pending = pool.submit(predictor.prepare, *cases[i + 1]) if prefetch and i + 1 < len(cases) else None
            result = predictor.finish(data, output_dir, name=case_name(image))
            result.heatmap = result.label_map = None
            results.append(result)
    return results


# ----------------------------------------------------------------------------- evaluation
LARGE_LESION_MM = 10.0  # lesions of at least this equivalent diameter are also counted on their own
def evaluate(
    model: str | os.PathLike | AnomalyDetector,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    key: str = "test",
    write_volumes: bool = True,
    montage_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Read every labelled case of the datalist, compute the metrics, write metrics JSON/CSV and the PNG report."""
    from monai_ad import metrics, report

    predictor = VolumePredictor(model, **options)
    items = load_datalist(datalist, key)
    out = Path(output_dir)
    loader = LoadVolumed([IMAGE, ROI, "label"], allow_missing_keys=True, mask_keys=[ROI, "label"])
    window = HUWindow(predictor.config.window)
    slice_labels, slice_scores, slice_ids = [], [], []
    gt_slices, map_slices, roi_slices = [], [], []
    montage_pool, curves = [], []
    tp = fp = fn = 0
    lesions_found, lesions_large, false_regions = [], [], 0
    for item in tqdm(items, desc="evaluation", disable=not progress, unit="volume"):
        if not item.get("label"):
            raise InputError(f"test case {item.get(IMAGE)} has no 'label' to evaluate against", datalist)
        result = predictor(item[IMAGE], roi_source(item), out / "volumes" if write_volumes else None)
        loaded = loader({IMAGE: item[IMAGE], "label": item["label"]})
        label = loaded["label"].as_tensor()[0].numpy()
        if label.shape != result.heatmap.shape:
            raise InputError(f"label shape {label.shape} does not match image shape {result.heatmap.shape}", item["label"])
        lesion = label == LESION_LABEL
        if item.get(ROI):
            liver = SelectROI(options.get("roi_labels"))(loader({ROI: item[ROI]})[ROI]).as_tensor()[0].numpy() > 0
        else:
            liver = label > 0
        axis = axial_axis(result.affine)
        scored = [z for z, s in enumerate(result.summary["slice_scores"]) if s is not None]
        heat = np.moveaxis(result.heatmap, axis, 0)[scored]
        gt = np.moveaxis(lesion, axis, 0)[scored]
        roi = np.moveaxis(liver, axis, 0)[scored]
        pred = np.moveaxis(result.label_map > 0, axis, 0)[scored]
        image = window(loaded[IMAGE].as_tensor())[0].numpy()
        image = np.moveaxis(image, axis, 0)[scored]
        scores = np.asarray([result.summary["slice_scores"][z] for z in scored], dtype=float)
        labels = gt.reshape(len(scored), -1).any(1).astype(int)
        gt_slices.append(gt), map_slices.append(heat), roi_slices.append(roi)
        slice_labels.append(labels), slice_scores.append(scores)
        slice_ids += [(result.case, z) for z in scored]
        reading = metrics.detect_lesions(
            result.label_map, lesion, threshold=1, roi=liver, spacing=np.linalg.norm(result.affine[:3, :3], axis=0)
        )  # the label map's regions: thresholded and cleaned as the user gets them
        lesions_found.append(reading["found"])
        lesions_large.append(reading["diameters_mm"] >= LARGE_LESION_MM)
        false_regions += reading["n_false_regions"]
        tp += int((pred & gt).sum())
        fp += int((pred & ~gt).sum())
        fn += int((~pred & gt).sum())
        full_curve = np.full(len(result.summary["slice_scores"]), np.nan)
        full_curve[scored] = scores
        full_labels = np.zeros(len(full_curve), dtype=int)
        full_labels[scored] = labels
        curves.append(report.ScoreCurve(name=result.case, scores=full_curve, labels=full_labels))
        for i, z in enumerate(scored):
            montage_pool.append((scores[i], result.case, z, image[i], heat[i], gt[i], pred[i]))
        montage_pool = sorted(montage_pool, key=lambda t: -t[0])[:montage_size]

    all_labels, all_scores = np.concatenate(slice_labels), np.concatenate(slice_scores)
    values = metrics.evaluate_scores(
        slice_labels=all_labels,
        slice_scores=all_scores,
        masks=gt_slices,  # per case: cases may differ in in-plane size
        maps=map_slices,
        roi=roi_slices,
        pixel_threshold=predictor.pixel_threshold,
        slice_threshold=predictor.slice_threshold,
    )
    values["dice_volume"] = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None
    found, large = np.concatenate(lesions_found), np.concatenate(lesions_large)
    values["lesion_sensitivity"] = float(found.mean()) if found.size else None
    values[f"lesion_sensitivity_{LARGE_LESION_MM:g}mm"] = float(found[large].mean()) if large.any() else None
    values["false_regions_per_scan"] = false_regions / len(items)
    values.update(
        {
            "detector": predictor.detector.name,
            "datalist": str(datalist),
            "section": key,
            "n_volumes": len(items),
            "thresholds": {"pixel": predictor.pixel_threshold, "slice": predictor.slice_threshold},
        }
    )
    montage = [
        report.MontageItem(image=img, heatmap=h, gt=g, pred=p, title=f"{case}  z={z}  score {s:.3g}")
        for s, case, z, img, h, g, p in montage_pool
    ]
    write_json(out / "metrics.json", values)
    write_metrics_csv(out / "metrics.csv", values)
    report.render_report(
        out / "report.png",
        montage=montage,
        curves=curves,
        roc=(all_labels, all_scores) if 0 < all_labels.sum() < len(all_labels) else None,
        slice_threshold=predictor.slice_threshold,
        title=f"{predictor.detector.name} on {Path(datalist).name} [{key}]",
    )
    values["files"] = {"metrics": str(out / "metrics.json"), "csv": str(out / "metrics.csv"), "report": str(out / "report.png")}
    return values


def write_metrics_csv(path: str | os.PathLike, values: Mapping[str, Any]) -> None:
    rows = [(k, v) for k, v in values.items() if v is None or isinstance(v, (int, float, str))]
    with atomic_path(path) as tmp:
        tmp.write_text("metric,value\n" + "".join(f"{k},{'' if v is None else v}\n" for k, v in rows))


# ----------------------------------------------------------------------------- several seeds
BMAD_COLUMNS = (("slice_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "PRO"))


def benchmark(
    detector: str,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1, 2),
    hparams: Mapping[str, Any] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    roi_labels: Sequence[int] | int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate once per seed; report mean ± std (%) in BMAD's table form (image AUROC, pixel
    AUROC, PRO), with every run's metrics, as ``benchmark.json`` and ``benchmark.md``."""
    out = Path(output_dir)
    runs = []
    for seed in seeds:
        run_dir = out / f"seed_{seed}"
        model = train(
            detector, datalist, run_dir / "model.pt", hparams={**dict(hparams or {}), "seed": int(seed)},
            preprocessing=preprocessing, roi_labels=roi_labels, device=device, progress=progress,
        )  # fmt: skip
        values = evaluate(model, datalist, run_dir, write_volumes=False, progress=progress, roi_labels=roi_labels)
        runs.append({"seed": int(seed), **{k: values.get(k) for k, _ in BMAD_COLUMNS}})
    summary: dict[str, Any] = {"detector": detector, "datalist": str(datalist), "seeds": list(seeds), "runs": runs}
    row = [detector]
    for key, title in BMAD_COLUMNS:
        values = np.asarray([r[key] for r in runs if r[key] is not None], dtype=float) * 100.0
        mean, std = (float(values.mean()), float(values.std())) if values.size else (None, None)
        summary[key] = {"mean": mean, "std": std, "n": int(values.size)}
        row.append("n/a" if mean is None else f"{mean:.2f}±{std:.2f}")
    header = "| method | " + " | ".join(title for _, title in BMAD_COLUMNS) + " |"
    table = "\n".join([header, "|" + "---|" * (len(BMAD_COLUMNS) + 1), "| " + " | ".join(row) + " |"])
    summary["table"] = table
    write_json(out / "benchmark.json", summary)
    with atomic_path(out / "benchmark.md") as tmp:
        tmp.write_text(f"{table}\n\nMean ± std (%) over seeds {list(seeds)}; datalist {datalist}.\n")
    return summary
