"""Inference speed and memory of every detector, against the frozen backbone's own speed (the floor).

For each detector, in one process and on the same slices:
  1. backbone-only throughput (slices/s) at the detector's input size, batch and dtype: the limit;
  2. the slice-wise inference core (features → scores → pixel maps, batched), slices/s and its ratio to 1;
  3. end-to-end latency for one 512×512×Z phantom volume and the real CT sample, by stage (load,
     pre-processing and ROI crop, inference, 3-D reassembly, label map, writing);
  4. with ``--scaling``: time and peak memory against Z (each size in a fresh process, so peak RSS is its own).

    python benchmarks/bench_inference.py                       # CPU or CUDA, whichever is there
    python benchmarks/bench_inference.py --detectors patchcore --slices 200 --scaling 50 100 200 400
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REAL_CT,
    RESULTS,
    fitted_detector,
    format_table,
    median_seconds,
    peak_rss_mib,
    phantom_training_slices,
    realistic_volume,
    record,
    resolve,
    synchronize,
)

from monai_ad.detectors import AnomalyDetector  # noqa: E402
from monai_ad.prediction import Predictor  # noqa: E402

STAGES = ("load", "preprocess", "inference", "reassembly", "label_map", "write")


def throughput(detector: AnomalyDetector, slices: dict[str, torch.Tensor], batch: int, repeats: int) -> dict[str, float]:
    device = detector.device
    image = slices["image"][:batch].float().to(device)
    roi = slices["roi"][:batch].to(device)
    detector.eval()
    row: dict[str, float] = {}
    try:
        backbone = median_seconds(lambda: detector.backbone_forward(image), device, repeats)
        row["backbone slices/s"] = batch / backbone
    except NotImplementedError:
        backbone = None
    core = median_seconds(lambda: detector.score(image, roi), device, repeats)
    row["core slices/s"] = batch / core
    if backbone is not None:
        row["core / backbone"] = backbone / core
    fast = detector.score(image, roi)
    with detector.full_precision():
        reference = detector.score(image, roi)
    spread = (reference.slice.max() - reference.slice.min()).clamp_min(1e-12)
    row["max abs Δ slice / range vs fp32"] = float((fast.slice - reference.slice).abs().max() / spread)
    row["pixel rel. error vs fp32"] = float((fast.pixel - reference.pixel).norm() / reference.pixel.norm().clamp_min(1e-12))
    return row


def volume_latency(detector: AnomalyDetector, image: Path, roi: Path, out: Path, repeats: int, **options) -> dict:
    predictor = Predictor(detector, batch_size=options.get("batch_size", 32), roi_labels=options.get("roi_labels"))
    predictor(image, roi, out)  # warm-up: kernels, caches, file system
    runs = []
    for _ in range(repeats):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        result = predictor(image, roi, out, timings=timings)
        synchronize(detector.device)
        timings["total"] = time.perf_counter() - start
        runs.append(timings)
    row = {k: statistics.median(r[k] for r in runs) for k in (*STAGES, "total")}
    row["slices"] = int(result.heatmap.shape[-1])
    row["scored slices"] = int(sum(1 for s in result.summary["slice_scores"] if s is not None))
    return row


def scaling_child(args: argparse.Namespace) -> None:
    """One volume size in this fresh process: print its latency and peak memory as JSON."""
    device = resolve(args.device)
    detector = AnomalyDetector.load(args.model, device=device)
    image, roi = realistic_volume(Path(args.work), args.child_slices)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = volume_latency(detector, image, roi, Path(args.work) / "out", repeats=args.repeats, batch_size=args.batch)
    row["peak RSS MiB"] = peak_rss_mib()
    if device.type == "cuda":
        row["peak GPU MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("SCALING " + json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "simplenet"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None, help="slices per batch (default 64 on CUDA, 16 on CPU)")
    parser.add_argument("--fit-slices", type=int, default=300, help="normal slices to fit each detector on")
    parser.add_argument("--slices", type=int, default=200, help="Z of the 512×512×Z end-to-end volume")
    parser.add_argument("--scaling", type=int, nargs="*", default=[], help="Z values for the scaling runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="detectors built with amp=True (bf16 autocast on CUDA)")
    parser.add_argument("--real-ct", type=Path, default=REAL_CT, help="folder with example_ct.nii.gz (+ its organ labels)")
    parser.add_argument("--work", type=Path, default=None, help="folder for generated data (default: a temp folder)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="append the figures to this file")
    parser.add_argument("--no-record", action="store_true", help="print only")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--child-slices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve(args.device)
    args.batch = args.batch or (64 if device.type == "cuda" else 16)
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = work
    if args.child_slices:
        return scaling_child(args)

    slices = phantom_training_slices(work, max(args.fit_slices, args.batch), args.image_size)
    core_rows, e2e_rows, scale_rows = [], [], []
    volume, volume_label = realistic_volume(work, args.slices)
    real = args.real_ct / "example_ct.nii.gz"
    for name in args.detectors:
        overrides = {"amp": True} if args.amp else {}
        detector = fitted_detector(name, {k: v[: args.fit_slices] for k, v in slices.items()}, device, **overrides)
        core_rows.append({"detector": name, "batch": args.batch, **throughput(detector, slices, args.batch, args.repeats)})
        row = volume_latency(detector, volume, volume_label, work / "out", args.repeats, batch_size=args.batch)
        e2e_rows.append({"detector": name, "volume": f"phantom 512×512×{row['slices']}", **row})
        if real.is_file():
            row = volume_latency(detector, real, args.real_ct / "example_seg_fast_force_split.nii.gz", work / "out",
                                 args.repeats, batch_size=args.batch, roi_labels=[5])  # fmt: skip
            e2e_rows.append({"detector": name, "volume": f"real CT {row['slices']} slices", **row})
        if args.scaling:
            model = work / f"{name}.pt"
            detector.save(model)
            for z in args.scaling:
                realistic_volume(work, z)
                cmd = [sys.executable, __file__, "--device", str(device), "--model", str(model), "--child-slices", str(z),
                       "--work", str(work), "--batch", str(args.batch), "--repeats", str(args.repeats)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALING ")]
                if proc.returncode or not line:
                    raise SystemExit(f"scaling run Z={z} failed:\n{proc.stderr[-2000:]}")
                scale_rows.append({"detector": name, "Z": z, **json.loads(line[0][8:])})
        del detector
        if device.type == "cuda":
            torch.cuda.empty_cache()

    tables = [
        format_table(core_rows, ["detector", "batch", "backbone slices/s", "core slices/s", "core / backbone",
                                 "max abs Δ slice / range vs fp32", "pixel rel. error vs fp32"]),
        format_table(e2e_rows, ["detector", "volume", "scored slices", *STAGES, "total"]),
    ]
    if scale_rows:
        cols = ["detector", "Z", "scored slices", "inference", "total", "peak RSS MiB"]
        tables.append(format_table(scale_rows, cols + (["peak GPU MiB"] if device.type == "cuda" else [])))
    notes = [
        f"{args.image_size} px slices, EfficientNet-Lite0 backbone ({'bf16 autocast on CUDA' if args.amp else 'float32'}), "
        f"detectors fitted on {args.fit_slices} phantom slices; "
        f"median of {args.repeats} runs after a warm-up; stage times in seconds",
        "end-to-end = load (NIfTI gz) → pre-processing and ROI crop → slice inference → Invertd back to the scan → "
        "label map and lesion list → heatmap + label map (NIfTI gz) + JSON written",
    ]
    record("Inference", device, tables, notes, results=None if args.no_record else args.results)


if __name__ == "__main__":
    main()
