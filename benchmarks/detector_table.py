"""The README's detector table in one command: every bundle trained and evaluated on its default phantom data
with its default settings, then its scoring speed on that data's slices.

    python benchmarks/detector_table.py                       # every bundle, on the CPU or CUDA
    python benchmarks/detector_table.py --bundles padim_liver_ct rd4ad_liver_ct

CLIP bundles run in their random-weights smoke mode unless ``--clip-checkpoint`` names a real open_clip file
(the table says which). Prints a markdown table and appends it to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import throughput  # noqa: E402
from common import RESULTS, format_table, record, resolve  # noqa: E402

from monai_ad.detectors import AnomalyDetector  # noqa: E402
from monai_ad.data.datalists import load_datalist  # noqa: E402
from monai_ad.data.slices import collect_slices  # noqa: E402
from monai_ad.transforms.pipeline import PreprocessConfig  # noqa: E402

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
CLIP_SMOKE = ["--clip_model", "tiny-random", "--allow_random_weights", "True", "--network_def#image_size", "96"]
# bundles whose default schedule is a GPU job: shortened unless --full-schedules (the table says so)
CPU_SCHEDULES = {"rd4ad_liver_ct": ["--network_def#epochs", "10"], "clip_reconstruction_liver_ct": ["--network_def#epochs", "2"]}


def bundle_run(bundle: Path, run_id: str, configs: list[str], extra: list[str]) -> float:
    config_file = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--meta_file", "configs/metadata.json",
           "--config_file", config_file, "--logging_file", "configs/logging.conf", *extra]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{bundle.name}: {run_id} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())
    parser.add_argument("--bundles", nargs="+", default=names)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=None, help="slices per batch for the speed figure")
    parser.add_argument("--clip-model", default=None, help="open_clip architecture for the CLIP bundles")
    parser.add_argument("--clip-checkpoint", default=None, help="its local weights file (else: random-weights smoke)")
    parser.add_argument("--full-schedules", action="store_true", help="every bundle's own schedule (GPU)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="append the table to this file")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    device = resolve(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    work = args.work or Path(tempfile.mkdtemp(prefix="monai_ad_table_"))
    rows = []
    for name in args.bundles:
        bundle = work / name
        if not bundle.is_dir():
            shutil.copytree(BUNDLES_DIR / name, bundle, ignore=shutil.ignore_patterns("models", "data", "eval"))
        extra: list[str] = []
        note = ""
        if "clip" in name:
            if args.clip_checkpoint:
                extra = ["--clip_model", args.clip_model or "ViT-B-16-plus-240", "--clip_checkpoint", args.clip_checkpoint]
            else:
                extra, note = list(CLIP_SMOKE), "random-weights smoke"
        if name in CPU_SCHEDULES and not args.full_schedules:
            extra += CPU_SCHEDULES[name]
            note = ", ".join(filter(None, [note, " ".join(CPU_SCHEDULES[name]).replace("--network_def#", "")]))
        train_s = bundle_run(bundle, "training", ["configs/train.json"], extra)
        eval_s = bundle_run(bundle, "evaluating", ["configs/train.json", "configs/evaluate.json"], extra)
        values = json.loads((bundle / "eval" / "metrics.json").read_text())
        detector = AnomalyDetector.load(bundle / "models" / "model.pt", device=device)
        config = PreprocessConfig.from_dict(detector.preprocessing)
        datalist = next((bundle / "data").rglob("datalist.json"))
        slices = collect_slices(load_datalist(datalist, "test"), config, progress=False)
        while slices["image"].shape[0] < batch:
            slices = {k: v.repeat(2, 1, 1, 1) for k, v in slices.items()}
        speed = throughput(detector, slices, batch, repeats=3)
        rows.append({
            "bundle": name + (f" ({note})" if note else ""), "image size": detector.image_size,
            "slice AUROC": values.get("slice_auroc"), "pixel AUROC (liver)": values.get("pixel_auroc_roi"),
            "AUPRO": values.get("aupro"), f"{device.type.upper()} slices/s": speed["core slices/s"],
            "train s": train_s, "evaluate s": eval_s,
        })  # fmt: skip
    cols = ["bundle", "image size", "slice AUROC", "pixel AUROC (liver)", "AUPRO", f"{device.type.upper()} slices/s", "train s", "evaluate s"]
    notes = ["each bundle's own defaults and default data (tiny phantoms it writes on first use); slices/s = the "
             f"scoring core on batches of {batch} test slices; train/evaluate s include process start-up"]
    record("Detectors on their bundles' default phantom data", device, [format_table(rows, cols)], notes,
           results=None if args.no_record else args.results)  # fmt: skip


if __name__ == "__main__":
    main()
