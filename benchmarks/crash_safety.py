"""Kill -9 during the three writes that must survive it, each ``--kills`` times: the MONAI Label server while it
saves an uploaded label, ``monai-ad infer`` while it writes its outputs, ``monai-ad train`` while it saves the
model. Real processes on phantom data: a ``monailabel start_server`` of the app with a label sent over HTTP
(``PUT /datastore/label``), and the two commands as subprocesses.

After each kill: the label file is whole and is the previous label or the new one (same bytes, and nibabel
reads the same voxels); the infer outputs under their final names are whole files of one run only (the previous
run's or the new one's, never a mix) and the summary is there only with both volumes; the model file loads and
scores, as the previous model or the new one. A killed writer's temporaries (hidden ``.partial`` files) must be
gone after the next run.

How the moment is chosen: every writer first creates its hidden temporary beside the final file, then writes,
flushes it to disk and renames it. The benchmark polls the destination folder (every 0.2 ms) and, as soon as a
temporary appears, waits a delay drawn uniformly from [0, the write's duration] (measured once beforehand, from a
run that is not killed) and sends SIGKILL to the writer's process group. A kill that still lands after the
rename is counted as such ("after the write"); the checks hold then too. The label is random noise over the
study's whole grid (gzip cannot shrink it) and the infer volumes are of the ``small`` phantom preset, so that
those writes last milliseconds; the models are small (the ``density`` and ``intensity`` detectors), so their
write is short and some kills land after it. Only the killed runs are separate processes; the runs that set
the scene (the previous model and outputs, the references, the measured write) go through the same command-line
entry point in this process.

    python benchmarks/crash_safety.py --kills 10
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch

from monai_ad import cli, label_server
from monai_ad.data.datalists import load_datalist
from monai_ad.detectors.base import AnomalyDetector
from monai_ad.io import PARTIAL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, record  # noqa: E402

POLL_S = 0.0002
DETECTOR = "density"  # fast to fit; two of its settings give two distinguishable models the runs alternate between
VARIANTS = ({"sigma_mm": 1.0}, {"sigma_mm": 2.0})
LABEL_TAG = "final"
OUTPUT_KINDS = ("heatmap", "anomaly-label", "summary")  # the file name endings infer writes


@dataclass
class Kill:
    kind: str
    delay_ms: float  # from the temporary's appearance to the kill (nan: none seen, killed after the write)
    during_write: bool  # a temporary was still there after the kill: the write was cut
    outcome: str  # what the final names hold: previous, new, none (infer outputs removed, the new not yet renamed)
    problem: str = ""


def partials(folder: Path) -> set[str]:
    """The names of the hidden temporaries in ``folder``."""
    return {p.name for p in folder.iterdir() if p.name.startswith(".") and PARTIAL in p.name} if folder.is_dir() else set()


def run_here(argv: list[str]) -> None:
    """A ``monai-ad`` command through its entry point, in this process (what it prints is dropped)."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    if code:
        raise RuntimeError(f"monai-ad {' '.join(argv[:2])} failed with code {code}")


def spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    """A ``monai-ad`` command as a process of its own group (killed as a whole)."""
    return subprocess.Popen([sys.executable, "-m", "monai_ad", *argv], cwd=cwd, env=label_server.server_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def write_seconds(run: Callable[[], object], folder: Path) -> float:
    """How long temporaries exist in ``folder`` while ``run()`` writes there, not killed (at least 1 ms)."""
    seen: list[float] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            if partials(folder):
                seen.append(time.perf_counter())
            time.sleep(POLL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run()
    finally:
        done.set()
        watcher.join()
    return max(1e-3, seen[-1] - seen[0]) if seen else 1e-3


def kill_during_write(process: subprocess.Popen, folder: Path, window_s: float, rng: random.Random,
                      finished: Callable[[], bool] = lambda: False, timeout: float = 600.0) -> tuple[float, bool, set[str]]:  # fmt: skip
    """SIGKILL ``process`` (its whole group) a delay drawn uniformly from [0, ``window_s``] after a temporary
    appears in ``folder`` (one that was not there before); when none appears before the process ends or
    ``finished()`` (the server answered), it is killed then, with a nan delay. Returns the delay in ms, whether
    the write was cut (a new temporary is left) and the temporaries that were there before."""
    before = partials(folder)
    deadline = time.time() + timeout
    delay = float("nan")
    while process.poll() is None and not finished() and time.time() < deadline:
        if partials(folder) - before:
            delay = rng.uniform(0.0, window_s)
            time.sleep(delay)
            break
        time.sleep(POLL_S)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    return delay * 1000.0, bool(partials(folder) - before), before


def _left_over(folder: Path, before: set[str], delay_ms: float) -> str:
    """A killed run's temporaries must be gone once the next run has written into the folder."""
    if delay_ms != delay_ms:  # the next run was not seen writing
        return ""
    kept = before & partials(folder)
    return f"a killed run's temporary is still there after the next run wrote: {sorted(kept)[0]}" if kept else ""


# ----------------------------------------------------------------------------------------- 1. the label save
def noise_label(shape: tuple[int, ...], affine: np.ndarray, path: Path, seed: int) -> np.ndarray:
    voxels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    nib.save(nib.Nifti1Image(voxels, affine), str(path))
    return voxels


def put_label(url: str, image_id: str, label_path: Path, timeout: float = 120.0) -> int:
    """``PUT /datastore/label`` of a file; the status, 0 when the server died first."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{label_path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + label_path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    request = urllib.request.Request(f"{url}/datastore/label?image={image_id}&tag={LABEL_TAG}", data=body, method="PUT",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status
    except OSError:
        return 0


def open_datastore(studies: Path):
    """The app's datastore on ``studies``, opened as the server opens it at start-up."""
    if str(label_server.APP_DIR) not in sys.path:
        sys.path.insert(0, str(label_server.APP_DIR))
    from lib.datastore import SafeLocalDatastore

    return SafeLocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)


def label_kills(work: Path, kills: int, rng: random.Random, preset: str = "small") -> list[Kill]:
    root = work / "label"
    studies = label_server.prepare_sample_studies(root, n_normal=1, n_abnormal=0, preset=preset, progress=False)
    image_id = sorted(p.name[: -len(".nii.gz")] for p in studies.glob("*.nii.gz"))[0]
    image = nib.load(str(studies / f"{image_id}.nii.gz"))
    uploads = [root / f"upload_{i}.nii.gz" for i in range(2)]
    voxels = [noise_label(image.shape, image.affine, path, seed) for seed, path in enumerate(uploads)]
    final = studies / "labels" / LABEL_TAG / f"{image_id}.nii.gz"
    env = {"TMPDIR": str(root / "server_tmp"), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    conf = {"model_dir": str(root / "models"), "models": f"{DETECTOR}_liver_ct"}

    def start() -> tuple[subprocess.Popen, str]:
        return label_server.start_server(studies, conf=conf, log_path=root / "server.log", env=env)

    process, url = start()
    try:
        if put_label(url, image_id, uploads[0]) != 200:
            raise RuntimeError(f"the first label upload failed (see {root / 'server.log'})")
        window = write_seconds(lambda: put_label(url, image_id, uploads[1]), final.parent)
        current, results = 1, []
        for i in range(kills):
            new = 1 - current
            sender = threading.Thread(target=put_label, args=(url, image_id, uploads[new]), daemon=True)
            sender.start()
            delay, cut, _ = kill_during_write(process, final.parent, window, rng, finished=lambda: not sender.is_alive())
            sender.join(timeout=120)
            outcome, problem = _label_outcome(final, uploads, voxels, new)
            current = new if outcome == "new" else current
            if i + 1 < kills:
                process, url = start()  # it must start on what the kill left
            else:
                store = open_datastore(studies)  # as a restart opens it
                if not store.get_label_uri(image_id, LABEL_TAG):
                    problem = problem or "the datastore no longer lists the label"
            if partials(final.parent):
                problem = problem or f"a killed save's temporary is still there once the datastore opened: {sorted(partials(final.parent))[0]}"
            results.append(Kill("label save (server)", delay, cut, outcome, problem))
        return results
    finally:
        label_server.stop_server(process)


def _label_outcome(final: Path, uploads: list[Path], voxels: list[np.ndarray], new: int) -> tuple[str, str]:
    if not final.is_file():
        return "none", "the label file is gone"
    data = final.read_bytes()
    which = next((i for i, path in enumerate(uploads) if path.read_bytes() == data), None)
    if which is None:
        return "torn", f"the label file ({len(data)} bytes) is neither label"
    try:
        loaded = np.asarray(nib.load(str(final)).dataobj)
    except Exception as exc:
        return "torn", f"nibabel cannot read it ({type(exc).__name__})"
    if not np.array_equal(loaded, voxels[which]):
        return "torn", "its voxels are not the label's"
    return ("new" if which == new else "previous"), ""


# ----------------------------------------------------------------------------------- 2. and 3. the commands
def _set(variant: int) -> list[str]:
    return [arg for key, value in VARIANTS[variant].items() for arg in ("--set", f"{key}={value}")]


def train_argv(datalist: Path, out: Path, variant: int) -> list[str]:
    return ["train", "--detector", DETECTOR, *_set(variant), "--datalist", str(datalist), "--out", str(out), "--device", "cpu", "--quiet"]


def phantom_models(work: Path, preset: str = "small") -> tuple[Path, list[Path]]:
    """A phantom datalist and a model of each variant."""
    from monai_ad.data.phantom import write_phantom_dataset

    datalist = write_phantom_dataset(work / "phantom", n_normal=3, n_abnormal=1, preset=preset, progress=False)
    models = [work / "trained" / f"{DETECTOR}_{i}.pt" for i in range(len(VARIANTS))]
    for variant, model in enumerate(models):
        run_here(train_argv(datalist, model, variant))
    return datalist, models


def _outputs(folder: Path, case: str) -> dict[str, Path]:
    return {kind: folder / f"{case}_{kind}.{'json' if kind == 'summary' else 'nii.gz'}" for kind in OUTPUT_KINDS}


def _read_outputs(files: dict[str, Path]) -> dict[str, object]:
    """What each present output holds (voxels; the summary without its own paths); raises for a torn file."""
    read: dict[str, object] = {}
    for kind, path in files.items():
        if not path.exists():
            continue
        if kind == "summary":
            summary = json.loads(path.read_text())
            summary.pop("files", None)
            read[kind] = json.dumps(summary, sort_keys=True)
        else:
            read[kind] = np.asarray(nib.load(str(path)).dataobj)
    return read


def _same(a: object, b: object) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


def infer_kills(work: Path, kills: int, rng: random.Random, datalist: Path, models: list[Path], confirm_cleanup: bool = True) -> list[Kill]:
    case = next(item for item in json.loads(datalist.read_text())["test"] if item["abnormal"])
    image, roi, name = datalist.parent / case["image"], datalist.parent / case["label"], case["case_id"]

    def argv(variant: int, out: Path) -> list[str]:
        return ["infer", "--model", str(models[variant]), "--image", str(image), "--roi", str(roi), "--out", str(out),
                "--device", "cpu", "--quiet"]  # fmt: skip

    references = []
    for variant in range(len(VARIANTS)):  # what a whole run of each model writes
        run_here(argv(variant, work / "infer_ref" / str(variant)))
        references.append(_read_outputs(_outputs(work / "infer_ref" / str(variant), name)))
    out = work / "infer_out"
    run_here(argv(0, out))
    window = write_seconds(lambda: run_here(argv(1, out)), out)
    current, results = 1, []
    for _ in range(kills):
        new = 1 - current
        delay, cut, before = kill_during_write(spawn(argv(new, out), work), out, window, rng)
        outcome, problem = _infer_outcome(out, name, references, current, new)
        results.append(Kill("infer outputs", delay, cut, outcome, problem or _left_over(out, before, delay)))
        if outcome == "new":
            current = new
        elif outcome == "none":  # the previous outputs were removed, the new ones not yet renamed: write them
            run_here(argv(new, out))
            current = new
    if confirm_cleanup:
        process = spawn(argv(current, out), work)
        if process.wait(timeout=600) == 0 and partials(out):
            results[-1].problem = results[-1].problem or f"a killed run's temporary is still there after the next run: {sorted(partials(out))[0]}"
    return results


def _infer_outcome(out: Path, case: str, references: list[dict], previous: int, new: int) -> tuple[str, str]:
    files = _outputs(out, case)
    picture = out / f"{case}_picture.png"  # a view of the outputs, drawn after them (itself written atomically)
    unexpected = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p not in (*files.values(), picture))
    if unexpected:
        return "torn", f"unexpected files under output names: {unexpected}"
    try:
        read = _read_outputs(files)
    except Exception as exc:
        return "torn", f"an output cannot be read whole ({type(exc).__name__})"
    if "summary" in read and len(read) < len(OUTPUT_KINDS):
        return "torn", f"the summary is there without {sorted(set(OUTPUT_KINDS) - set(read))}"
    for version, variant in (("previous", previous), ("new", new)):
        if all(_same(value, references[variant][kind]) for kind, value in read.items()):
            return (version if len(read) == len(OUTPUT_KINDS) else "none"), ""
    return "mix", f"the outputs mix two runs ({sorted(read)})"


def train_kills(work: Path, kills: int, rng: random.Random, datalist: Path, confirm_cleanup: bool = True) -> list[Kill]:
    folder = work / "model"
    model = folder / "model.pt"
    run_here(train_argv(datalist, model, 0))
    slices = _test_slices(datalist)
    window = write_seconds(lambda: run_here(train_argv(datalist, model, 1)), folder)
    current, results = 1, []
    for _ in range(kills):
        new = 1 - current
        delay, cut, before = kill_during_write(spawn(train_argv(datalist, model, new), work), folder, window, rng)
        outcome, problem = _model_outcome(model, slices, current, new)
        results.append(Kill("model save (train)", delay, cut, outcome, problem or _left_over(folder, before, delay)))
        current = new if outcome == "new" else current
    if confirm_cleanup:
        process = spawn(train_argv(datalist, model, current), work)
        if process.wait(timeout=600) == 0 and partials(folder):
            results[-1].problem = results[-1].problem or f"a killed run's temporary is still there after the next run: {sorted(partials(folder))[0]}"
    return results


def _test_slices(datalist: Path) -> dict[str, torch.Tensor]:
    from monai_ad.data.slices import collect_slices
    from monai_ad.training import detector_preprocessing

    return collect_slices(load_datalist(datalist, "test")[:1], detector_preprocessing(DETECTOR, None), None, False)


def _model_outcome(model: Path, slices: dict, previous: int, new: int) -> tuple[str, str]:
    try:
        detector = AnomalyDetector.load(model, device="cpu")
        scores = detector.score(slices["image"][:4].float(), slices["roi"][:4])
    except Exception as exc:
        return "torn", f"the model does not load or score ({type(exc).__name__}: {str(exc)[:80]})"
    if not torch.isfinite(scores.slice).all():
        return "torn", "the model's slice scores are not finite"
    which = [i for i, variant in enumerate(VARIANTS) if all(detector.hparams.get(k) == v for k, v in variant.items())]
    if which not in ([previous], [new]):
        return "torn", f"the model's settings {detector.hparams} are neither the previous model's nor the new one's"
    return ("new" if which == [new] else "previous"), ""


# ------------------------------------------------------------------------------------------------ the table
KINDS = ("label", "infer", "train")


def run(work: Path, kills: int, seed: int = 0, preset: str = "small", kinds: tuple[str, ...] = KINDS,
        confirm_cleanup: bool = True) -> list[Kill]:  # fmt: skip
    """``kills`` kills of each kind of ``kinds`` under ``work``; every kill's result (``confirm_cleanup``: one more
    run after the last kill of a command, whose temporaries must then be gone)."""
    rng = random.Random(seed)
    results: list[Kill] = []
    if "label" in kinds:
        results += label_kills(work, kills, rng, preset)
    if "infer" in kinds or "train" in kinds:
        datalist, models = phantom_models(work, preset)
        if "infer" in kinds:
            results += infer_kills(work, kills, rng, datalist, models, confirm_cleanup)
        if "train" in kinds:
            results += train_kills(work, kills, rng, datalist, confirm_cleanup)
    return results


COLUMNS = ["write", "kills", "during the write", "after the write", "previous kept", "new whole", "none yet", "torn or mixed",
           "delay ms (max)"]  # fmt: skip


def summary_rows(results: list[Kill]) -> list[dict[str, object]]:
    rows = []
    for kind in dict.fromkeys(k.kind for k in results):
        mine = [k for k in results if k.kind == kind]
        delays = [k.delay_ms for k in mine if k.delay_ms == k.delay_ms]
        rows.append({
            "write": kind, "kills": len(mine), "during the write": sum(k.during_write for k in mine),
            "after the write": sum(not k.during_write for k in mine),
            "previous kept": sum(k.outcome == "previous" for k in mine), "new whole": sum(k.outcome == "new" for k in mine),
            "none yet": sum(k.outcome == "none" for k in mine), "torn or mixed": sum(bool(k.problem) for k in mine),
            "delay ms (max)": max(delays) if delays else None,
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="small", help="phantom preset of the studies and volumes")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crash_safety_") as scratch:
        started = time.perf_counter()
        results = run(Path(args.work or scratch), args.kills, args.seed, args.preset)
        seconds = time.perf_counter() - started
    problems = [f"{k.kind}: {k.problem}" for k in results if k.problem]
    notes = [
        f"SIGKILL of the writer's process group a random delay (uniform up to the write's measured duration) after its "
        f"temporary appears; {args.kills} kills of each kind, phantom preset {args.preset}, seed {args.seed}, {seconds:.0f} s in all",
        "'during the write': the kill left a temporary (the write was cut); 'after the write': it landed after the rename; "
        "'none yet': the previous infer outputs were removed and the new ones not yet renamed (never a mix); "
        "'torn or mixed' must be 0",
    ] + problems  # fmt: skip
    record("Crash safety (kill -9 during writes)", torch.device("cpu"), [format_table(summary_rows(results), COLUMNS)], notes,
           results=None if args.no_record else Path(__file__).resolve().parent / "RESULTS.md")  # fmt: skip
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
