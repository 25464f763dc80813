"""Running the MONAI Label app (``apps/liver_anomaly``): sample studies, the server command, waiting for it.

Used by ``monai-ad app`` (``make app``), the app's tests and the Orthanc/OHIF integration check.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np

from monai_ad import DEFAULT_DETECTOR
from monai_ad.errors import InputError
from monai_ad.io import atomic_write, save_nifti
from monai_ad.resources import shared_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = shared_dir("apps") / "liver_anomaly"  # inside the installed package, or the clone's apps/


def find_app_dir() -> Path:
    """The MONAI Label app folder: ``$MONAI_AD_APP_DIR``, else the one installed with the package (or the
    clone's ``apps/liver_anomaly``)."""
    wanted = os.environ.get("MONAI_AD_APP_DIR")
    app_dir = Path(wanted) if wanted else APP_DIR
    if not (app_dir / "main.py").is_file():
        raise InputError("no MONAI Label app here (MONAI_AD_APP_DIR must name an apps/liver_anomaly folder)", app_dir)
    return app_dir


def state_dir(studies: str | os.PathLike, sample_dir: str | os.PathLike | None = None) -> Path:
    """Where the server writes what it makes (models, logs), never inside the app or the installed package:
    the sample folder, else ``.monai_ad`` in a local studies folder, else ``$MONAI_AD_STATE_DIR`` (default
    ``~/.monai_ad``) for a DICOMweb store."""
    if sample_dir is not None:
        return Path(sample_dir)
    if not str(studies).startswith(("http://", "https://")):
        return Path(studies) / ".monai_ad"
    return Path(os.environ.get("MONAI_AD_STATE_DIR") or Path.home() / ".monai_ad")


def prepare_state(state: str | os.PathLike, app_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The server's state folder made ready: a fresh copy of the app to run, and MONAI Label's logging
    configuration pointing into it. Returns ``(app, log_config)`` for ``server_command``."""
    state = Path(state)
    return working_app(state, app_dir), server_log_config(state)


def working_app(state: Path, app_dir: str | os.PathLike | None = None) -> Path:
    """A fresh copy of the app under ``state`` for the server to run: MONAI Label creates ``model/``, ``logs/``
    and ``bin/`` in the app it runs and Python caches its modules there, which must not land in the installed
    package or a clone's ``apps/``."""
    source = Path(app_dir) if app_dir is not None else find_app_dir()
    target = state / "app"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "model", "logs", "bin"))
    return target


def server_log_config(state: Path) -> Path:
    """MONAI Label's own logging configuration with its log folder under ``state`` (it defaults to the app's)."""
    import monailabel

    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    template = (Path(monailabel.__file__).parent / "logging.json").read_text()
    text = template.replace("${LOGDIR}", json.dumps(str(logs))[1:-1]).replace("${LOGFILE}", json.dumps(str(logs / "app.log"))[1:-1])
    return atomic_write(state / "logging.json", lambda tmp: Path(tmp).write_text(text))
LIVER_TAG = "liver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_liver_mask(label_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """A liver mask (uint8, 1 = liver) from a LiTS-style label (1 liver, 2 lesion), same geometry."""
    label = nib.load(str(label_path))
    mask = (np.asarray(label.dataobj) > 0).astype(np.uint8)
    return atomic_write(out_path, lambda tmp: save_nifti(mask, label.affine, tmp, intent="label"))


def prepare_sample_studies(
    out_dir: str | os.PathLike, n_normal: int = 6, n_abnormal: int = 3, preset: str = "small", seed: int = 0, progress: bool = True
) -> Path:
    """A folder datastore of phantom CT studies: every study has its liver mask as a ``liver`` label, the
    datalist's training and validation normals are marked normal (image info ``normal: true``); test studies
    (normal and abnormal) are left for a radiologist. Returns the studies folder (reused when present)."""
    from monailabel.datastore.local import LocalDatastore

    from monai_ad.data.phantom import write_phantom_dataset

    out = Path(out_dir)
    studies = out / "studies"
    if (studies / "datastore_v2.json").is_file() and any(studies.glob("*.nii.gz")):
        return studies
    datalist_path = write_phantom_dataset(out / "phantom", n_normal, n_abnormal, seed=seed, preset=preset, progress=progress)
    datalist = json.loads(Path(datalist_path).read_text())
    studies.mkdir(parents=True, exist_ok=True)
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    for section in ("training", "validation", "test"):
        for item in datalist.get(section, []):
            image = Path(datalist_path).parent / item["image"]
            label = Path(datalist_path).parent / item["label"]
            case = item["case_id"]
            store.add_image(case, str(image), {"normal": section in ("training", "validation")})
            mask = write_liver_mask(label, out / "liver_masks" / f"{case}.nii.gz")
            store.save_label(case, str(mask), LIVER_TAG, {})
    return studies


def server_command(
    studies: str | os.PathLike,
    port: int,
    conf: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    app_dir: str | os.PathLike | None = None,
    log_config: str | os.PathLike | None = None,
) -> list[str]:
    """``monailabel start_server`` for the app (``app_dir``: the copy ``prepare_state`` made; default: the
    installed one), run with this interpreter (``python -m monailabel.main``), bound to ``host`` (127.0.0.1
    unless told otherwise). Builds the command only; nothing is written."""
    app_dir = app_dir or find_app_dir()
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies),
           "--host", host, "--port", str(port)]  # fmt: skip
    if log_config is not None:
        cmd += ["--log_config", str(log_config)]
    for key, value in (conf or {}).items():
        cmd += ["--conf", key, str(value)]
    return cmd


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the server needs: this interpreter's bin first on PATH (MONAI Label's training child
    processes and dcmqi's ``itkimage2segimage`` are found there), the project importable."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["MONAILABEL_PYEXE"] = sys.executable
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra or {})
    return env


def wait_for_server(url: str, process: subprocess.Popen | None = None, timeout: float = 180.0) -> dict:
    """Poll ``<url>/info/`` until it answers; raise with the reason when the process dies or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the MONAI Label server exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/info/", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(1.0)
    raise TimeoutError(f"no answer from {url} within {timeout:.0f} s")


def start_server(
    studies: str | os.PathLike,
    port: int | None = None,
    conf: Mapping[str, str] | None = None,
    log_path: str | os.PathLike | None = None,
    timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start the app's server on 127.0.0.1 in the background; returns the process and its URL once it answers."""
    port = port or free_port()
    app_dir, log_config = prepare_state(state_dir(studies))
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    cmd = server_command(studies, port, conf, app_dir=app_dir, log_config=log_config)
    process = subprocess.Popen(cmd, env=server_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, timeout)
    except BaseException:
        stop_server(process)
        raise
    return process, url


def stop_server(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop the server and the child processes it started (training runs in its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass


def run_app(
    studies: str | os.PathLike | None,
    sample_dir: str | os.PathLike | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    conf: Mapping[str, str] | None = None,
    preset: str = "small",
) -> int:
    """Foreground server (``monai-ad app``): on sample studies (written first when missing) or a given folder."""
    if studies is None:
        if sample_dir is None:
            raise InputError("give --studies (a folder or a DICOMweb URL) or --sample DIR")
        print(f"preparing sample studies in {sample_dir} ...", flush=True)
        studies = prepare_sample_studies(sample_dir, preset=preset)
    elif not str(studies).startswith(("http://", "https://")) and not Path(studies).is_dir():
        raise InputError("studies folder not found", studies)
    conf = dict(conf or {})
    state = state_dir(studies, sample_dir)
    conf.setdefault("model_dir", str(state / "models"))
    if sample_dir is not None:
        # the project's default detector trains at start-up (seconds on a CPU); the others on request
        conf.setdefault("train_on_start", f"{DEFAULT_DETECTOR}_liver_ct")
    app_dir, log_config = prepare_state(state)
    cmd = server_command(studies, port, conf, host=host, app_dir=app_dir, log_config=log_config)
    print(f"MONAI Label: http://{host}:{port}  (studies {studies}; OHIF at /ohif/ with a DICOMweb store)", flush=True)
    return subprocess.call(cmd, env=server_env())
