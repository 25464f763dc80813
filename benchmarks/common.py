"""Shared pieces of the benchmark scripts: data, detectors, timing, memory and the results file."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from monai_ad.allocator import keep_freed_memory
from monai_ad.io import atomic_write
from monai_ad.data.phantom import make_phantom, save_case, write_phantom_dataset
from monai_ad.detectors import AnomalyDetector, create_detector
from monai_ad.detectors.base import detector_class
from monai_ad.data.datalists import load_datalist, roi_source
from monai_ad.data.slices import collect_slices
from monai_ad.training import resolve_device
from monai_ad.transforms.pipeline import PreprocessConfig

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ALLOCATOR_TUNED = keep_freed_memory()  # as the command line, the bundles and the app do
REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct" / "ts_example"



def machine_description(device: torch.device) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cpu}, torch {torch.__version__}"
    return f"CPU only, {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA work waited for)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    On Linux the high-water mark of the process's own memory (``VmHWM``): ``ru_maxrss`` also counts the
    parent's peak when the process was started by vfork + exec, as ``subprocess`` does."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def phantom_training_slices(
    work: Path, n_slices: int, image_size: int = 224, n_volumes: int = 6, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``n_slices`` pre-processed normal liver slices: the real pipeline on ``n_volumes`` small phantoms, then
    repeated with random flips and shifts of a few pixels up to the count asked for (cost depends on the count)."""
    datalist = work / "phantom" / "datalist.json"
    if not datalist.is_file():
        write_phantom_dataset(work / "phantom", n_normal=n_volumes + 2, n_abnormal=2, seed=seed, preset="small", progress=False)
    items = load_datalist(datalist, "training")
    config = PreprocessConfig(image_size=image_size)
    slices = collect_slices([{**i, "roi": roi_source(i)} for i in items], config, progress=False)
    base = slices["image"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    images, rois = [slices["image"]], [slices["roi"]]
    total = base
    while total < n_slices:
        flip = bool(torch.randint(2, (1,), generator=gen))
        shift = [int(s) for s in torch.randint(-4, 5, (2,), generator=gen)]
        img, roi = slices["image"], slices["roi"]
        if flip:
            img, roi = img.flip(-1), roi.flip(-1)
        images.append(img.roll(shift, dims=(-2, -1)))
        rois.append(roi.roll(shift, dims=(-2, -1)))
        total += base
    return {"image": torch.cat(images)[:n_slices], "roi": torch.cat(rois)[:n_slices]}


def build_detector(name: str, device: torch.device, image_size: int = 224, **overrides: Any) -> AnomalyDetector:
    """The detector with its cpu schedule (the one the accuracy benchmark measures) at ``image_size``."""
    schedule = detector_class(name).schedule("cpu")
    return create_detector(name, **{**schedule, "image_size": image_size, **overrides}).to(device)


def fitted_detector(
    name: str, slices: dict[str, torch.Tensor], device: torch.device, **overrides: Any
) -> AnomalyDetector:
    """A detector fitted and calibrated on ``phantom_training_slices`` (for the speed benchmarks)."""
    from monai_ad.training import fit_and_calibrate

    detector = build_detector(name, device, int(slices["image"].shape[-1]), **overrides)
    config = PreprocessConfig(image_size=detector.image_size)  # the settings phantom_training_slices uses
    return fit_and_calibrate(detector, slices, slices, config, progress=False)


def realistic_volume(work: Path, n_slices: int, seed: int = 7) -> tuple[Path, Path]:
    """A 512×512×``n_slices`` abnormal phantom at 1.5 mm slices (NIfTI, gzip, int16 as scanners write it),
    cut from one 400-slice phantom so every size shows the same anatomy from the top."""
    image, label = work / f"volume_{n_slices}.nii.gz", work / f"volume_{n_slices}_label.nii.gz"
    if image.is_file() and label.is_file():
        return image, label
    full_image, full_label = work / "volume_full.nii.gz", work / "volume_full_label.nii.gz"
    if not full_image.is_file():
        case = make_phantom(seed, True, "full", slice_mm=(1.5,), extent_mm=(600.0, 600.0))
        save_case(case, full_image, full_label)
    src, lab = nib.load(full_image), nib.load(full_label)
    top = src.shape[2]
    keep = slice(max(0, top - n_slices), top)
    affine = src.affine.copy()
    affine[:3, 3] = (src.affine @ np.array([0, 0, keep.start, 1]))[:3]
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj[..., keep]), affine, src.header), image)
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj[..., keep]), affine, lab.header), label)
    return image, label


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def section_heading(title: str, device: torch.device) -> str:
    """A results section's heading: the title, and the GPU when measured on one (CPU and GPU figures live apart)."""
    return f"## {title}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")


def replace_section(text: str, heading: str, block: str) -> str:
    """``text`` (a results file) with the section under ``heading`` replaced by ``block``, or ``block`` appended when
    there is none: each benchmark keeps one current section; earlier figures stay in the history of the file."""
    lines = text.split("\n")
    if heading not in lines:
        return text.rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    kept = lines[:start] + block.rstrip("\n").split("\n") + ([""] if end < len(lines) else []) + lines[end:]
    return "\n".join(kept).rstrip("\n") + "\n"


def record(title: str, device: torch.device, tables: Sequence[str], notes: Sequence[str] = (), data: Any = None,
           results: Path | None = RESULTS) -> None:
    """Print the figures and write them, with machine, date and command, as the section ``title`` of ``RESULTS.md``
    (replacing that section's previous figures)."""
    args = list(sys.argv[1:])
    if "--work" in args[:-1]:  # a scratch folder, not part of what was measured
        del args[args.index("--work") : args.index("--work") + 2]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *args])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = section_heading(title, device)
    text = [heading, "", f"- machine: {machine_description(device)}", f"- date: {stamp}", f"- command: `{command}`"]
    if ALLOCATOR_TUNED:
        text.append("- process: malloc keeps 1 GiB of freed memory for reuse (M_TOP_PAD), as `monai-ad` sets it")
    text += [f"- {n}" for n in notes]
    text.append("")
    for table in tables:
        text += [table, ""]
    block = "\n".join(text)
    print(block)
    if data is not None:
        print(json.dumps(data, indent=1, default=str))
    if results is not None:
        results = Path(results)
        current = results.read_text() if results.exists() else ""
        atomic_write(results, lambda tmp: tmp.write_text(replace_section(current, heading, block)))


def resolve(device: str | None) -> torch.device:
    return resolve_device(device)
