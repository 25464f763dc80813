"""The wheel as a user installs it: built from this tree, installed into a fresh virtual environment, run from a
folder outside the source tree. `monai-ad demo` works, and `monai-ad app` serves the bundles it ships (`/info`)
without writing into the installed package."""

import json
import os
import site
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(ROOT)],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next(work.glob("monai_ad-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # the dependencies come from this environment (offline); its editable monai_ad is not on the path: a plain
    # path entry does not run that site folder's .pth hooks
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MONAI_AD_APP_DIR", "MONAI_AD_BUNDLES")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {"python": python, "cli": venv / "bin" / "monai-ad", "purelib": Path(purelib), "env": env, "cwd": work}


def test_the_installed_package_is_the_wheel_not_the_source_tree(installed):
    out = subprocess.run([str(installed["python"]), "-c", "import monai_ad.resources as r; print(r.__file__); "
                          "print(r.shared_dir('bundles')); print(r.shared_dir('apps'))"],
                         cwd=installed["cwd"], env=installed["env"], check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    package = installed["purelib"] / "monai_ad"
    assert [Path(p) for p in out] == [package / "resources.py", package / "share" / "bundles", package / "share" / "apps"]
    inference = package / "share" / "bundles" / "intensity_liver_ct" / "configs" / "inference.json"
    assert inference.is_file() and not inference.is_symlink()  # the shared config, as a file of its own
    assert (package / "share" / "sample_configs" / "patchcore_liver_ct.json").is_file()


def test_the_installed_demo_runs(installed):
    out = installed["cwd"] / "demo"
    proc = subprocess.run([str(installed["cli"]), "--quiet", "demo", "--out", str(out), "--preset", "tiny", "--normal", "6",
                           "--abnormal", "2"], cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert 0.0 <= metrics["slice_auroc"] <= 1.0 and (out / "evaluation" / "report.png").is_file()


def test_the_installed_app_serves_its_bundles_and_writes_nothing_into_the_package(installed):
    package = installed["purelib"] / "monai_ad" / "share"
    before = sorted(str(p) for p in package.rglob("*"))
    sample = installed["cwd"] / "app"
    port = _free_port()
    log = open(installed["cwd"] / "app.log", "wb")
    process = subprocess.Popen([str(installed["cli"]), "app", "--sample", str(sample), "--preset", "tiny", "--port", str(port),
                                "--conf", "train_on_start=false"], cwd=installed["cwd"], env=installed["env"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        info = _wait_for_info(f"http://127.0.0.1:{port}", process)
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)
    assert {"intensity_liver_ct", "patchcore_liver_ct"} <= set(info["trainers"])
    assert sorted(str(p) for p in package.rglob("*")) == before  # no logs/, model/ or caches in the package
    assert (sample / "logs").is_dir() and (sample / "models").is_dir()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_info(url: str, process, timeout: float = 240.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the installed app exited before answering"
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"no answer from {url} within {timeout:.0f} s")
