# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m monai_ad demo --out outputs/demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache
