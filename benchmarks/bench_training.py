"""Training cost: PatchCore's fit (features + greedy coreset) and SimpleNet's schedule on N normal slices.

    python benchmarks/bench_training.py                          # 1,500 slices, SimpleNet's full 40 × 4 schedule
    python benchmarks/bench_training.py --slices 300 --simplenet-epochs 2 2   # a short run (CPU)

Prints fit time, slices/s, the PatchCore memory bank's size, peak RSS and (CUDA) peak GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, build_detector, format_table, peak_rss_mib, phantom_training_slices, record, resolve, synchronize  # noqa: E402

from monai_ad.data.slices import SliceBatches  # noqa: E402


def timed_fit(name: str, slices, device, batch: int, **hparams) -> tuple[dict, object]:
    detector = build_detector(name, device, int(slices["image"].shape[-1]), **hparams)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    detector.fit(SliceBatches(slices, batch_size=batch, shuffle=name != "patchcore"), progress=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    row = {"detector": name, "slices": int(slices["image"].shape[0]), "fit s": seconds,
           "slices/s": slices["image"].shape[0] / seconds, "peak RSS MiB": peak_rss_mib()}  # fmt: skip
    if device.type == "cuda":
        row["peak GPU MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row, detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--slices", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None, help="PatchCore feature batch (default 64 CUDA, 16 CPU)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--simplenet-epochs", type=int, nargs=2, default=[40, 4], metavar=("META", "GAN"))
    parser.add_argument("--detectors", nargs="+", default=["patchcore", "simplenet"])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="append the figures to this file")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    device = resolve(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 16)
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_bench_"))
    slices = phantom_training_slices(work, args.slices, args.image_size)
    rows = []
    for name in args.detectors:
        if name == "patchcore":
            row, detector = timed_fit(name, slices, device, batch, coreset_ratio=args.coreset_ratio)
            row["memory bank"] = f"{detector.memory_bank.shape[0]} × {detector.memory_bank.shape[1]}"
            row["bank MiB"] = detector.memory_bank_bytes / 2**20
            row["schedule"] = f"coreset {args.coreset_ratio:g}"
        elif name == "simplenet":
            meta, gan = args.simplenet_epochs
            row, detector = timed_fit(name, slices, device, batch, meta_epochs=meta, gan_epochs=gan)
            row["schedule"] = f"{meta} × {gan} epochs, batches of 8 slices"
        else:
            row, detector = timed_fit(name, slices, device, batch)
            row["schedule"] = "library defaults"
        rows.append(row)
        del detector
    cols = ["detector", "slices", "schedule", "fit s", "slices/s", "memory bank", "bank MiB", "peak RSS MiB"]
    cols += ["peak GPU MiB"] if device.type == "cuda" else []
    notes = [f"{args.image_size} px phantom liver slices (repeated with flips/shifts to the count), EfficientNet-Lite0"]
    record("Training", device, [format_table(rows, cols)], notes, results=None if args.no_record else args.results)


if __name__ == "__main__":
    main()
