"""Batch inference over a folder of studies with 1 and with N processes (torchrun), as a user runs it.

    python benchmarks/bench_batch_inference.py                     # 8 phantom studies, 1 vs 2 processes
    python benchmarks/bench_batch_inference.py --volumes 16 --processes 1 2 4 --device cuda

Each run is `monai-ad infer --image <folder> --roi <masks>` (under `torchrun --standalone --nproc_per_node=N` for N > 1):
volumes stream one at a time (the next one loads while the current one is scored), each process reads its
share of the folder, and only summaries stay in memory. Prints wall time, volumes/s and the peak RSS of a process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fitted_detector, format_table, phantom_training_slices, record, resolve  # noqa: E402

from monai_ad.data.phantom import write_phantom_dataset  # noqa: E402
from monai_ad.data.datalists import load_datalist  # noqa: E402


def study_folder(work: Path, n: int, preset: str) -> tuple[Path, Path]:
    """``n`` phantom studies as a folder of volumes and a folder of liver masks named the same."""
    images, masks = work / "studies", work / "masks"
    if images.is_dir() and len(list(images.iterdir())) == n:
        return images, masks
    datalist = write_phantom_dataset(work / "source", n_normal=3, n_abnormal=n, seed=3, preset=preset, progress=False)
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for item in [i for i in load_datalist(datalist, "test") if i.get("abnormal")][:n]:
        shutil.copy(item["image"], images / Path(item["image"]).name)
        shutil.copy(item["label"], masks / Path(item["image"]).name)
    return images, masks


def run(processes: int, model: Path, images: Path, masks: Path, out: Path, device: str, threads: int) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = (launcher if processes > 1 else [sys.executable]) + [
        "-m", "monai_ad", "infer", "--image", str(images), "--roi", str(masks), "--model", str(model), "--out", str(out),
        "--device", device, "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    wrapper = [sys.executable, "-c", "import resource, subprocess, sys; r = subprocess.call(sys.argv[1:]); "
               "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(wrapper + cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB")]
    return {"seconds": seconds, "peak": peak[0] / 1024 if peak else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="patchcore")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--preset", default="small", help="phantom size: tiny, small or full (512², slow to make)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fit-slices", type=int, default=200)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="append the figures to this file")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    device = resolve(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_batch_"))
    images, masks = study_folder(work, args.volumes, args.preset)
    model = work / f"{args.detector}.pt"
    if not model.is_file():
        fitted_detector(args.detector, phantom_training_slices(work, args.fit_slices), device).save(model)
    cores = os.cpu_count() or 1
    rows = []
    for n in args.processes:
        out = work / f"out_{n}"
        shutil.rmtree(out, ignore_errors=True)
        result = run(n, model, images, masks, out, device.type, max(1, cores // n))
        written = len(list(out.glob("*_summary.json")))
        if written != args.volumes:
            raise SystemExit(f"{n} process(es) wrote {written} of {args.volumes} summaries")
        rows.append({"processes": n, "threads each": max(1, cores // n), "volumes": args.volumes,
                     "wall s": result["seconds"], "volumes/s": args.volumes / result["seconds"],
                     "peak RSS MiB (largest process)": result["peak"]})  # fmt: skip
    for row in rows:
        row["speed-up"] = rows[0]["wall s"] / row["wall s"]
    cols = ["processes", "threads each", "volumes", "wall s", "volumes/s", "speed-up", "peak RSS MiB (largest process)"]
    shape = json.loads((work / "source" / "datalist.json").read_text()).get("preset")
    notes = [f"{args.detector}, {args.volumes} phantom studies (preset {shape}), process start-up and model loading included"]
    record("Batch inference, 1 vs N processes", device, [format_table(rows, cols)], notes,
           results=None if args.no_record else args.results)  # fmt: skip


if __name__ == "__main__":
    main()
