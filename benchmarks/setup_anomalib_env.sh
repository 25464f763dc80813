#!/usr/bin/env bash
# A separate environment for the anomalib comparison only (anomalib is not a monai_ad dependency).
# It layers over the project's .venv (torch, timm, monai_ad are shared, so both sides run the same torch) and
# adds anomalib 2.7.0 with its own dependencies, leaving the project's environment untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${VENV:-.venv}
ENV=benchmarks/.venv-anomalib
[ -x "$BASE/bin/python" ] || bash scripts/setup_env.sh
if [ ! -x "$ENV/bin/python" ]; then
  "$BASE/bin/python" -m venv --without-pip "$ENV" 2>/dev/null || python3 -m venv --without-pip "$ENV"
fi
base_site=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
env_site=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf "%s\n%s\n" "$base_site" "$PWD" > "$env_site/_monai_ad_base.pth"  # the project itself too: editable installs are not seen through a path line
if ! "$ENV/bin/python" -c 'import anomalib' 2>/dev/null; then
  "$ENV/bin/python" -m pip install -q --disable-pip-version-check "anomalib==2.7.0" "numpy<2" \
    -c <(grep -Ei '^(torch|torchvision|numpy|timm|monai|scikit-learn|scipy|pillow)==' constraints.txt)
fi
"$ENV/bin/python" -c 'import anomalib, torch; print("anomalib", anomalib.__version__, "torch", torch.__version__)'
