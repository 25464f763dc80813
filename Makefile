# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean app ohif-check

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m monai_ad demo --out outputs/demo

# MONAI Label server on phantom sample studies (written on first use; the default detector (intensity) trains at start-up if it has no model):
# http://127.0.0.1:8000 for 3D Slicer. APP_ARGS="--models patchcore_liver_ct --port 8001" narrows or moves it.
APP_ARGS ?=
app: setup
	$(PY) -m monai_ad app --sample outputs/app $(APP_ARGS)

# Orthanc + DICOMweb + the app + OHIF in headless Chromium on the real CT series; screenshot in outputs/ohif_check/
ohif-check: setup
	$(PY) scripts/ohif_check.py --out outputs/ohif_check

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
