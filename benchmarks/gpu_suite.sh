#!/usr/bin/env bash
# The GPU figures in one go, for a machine with a CUDA device: inference (with scaling), training, and the
# anomalib comparison when its environment is there. Figures are appended to ${RESULTS:-benchmarks/RESULTS.md}.
#   bash benchmarks/gpu_suite.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
REAL_CT=${REAL_CT:-../shared/data/real_ct/ts_example}
WORK=${WORK:-$(mktemp -d)}
"$PY" benchmarks/bench_inference.py --device cuda --fit-slices 1500 --slices 200 --scaling 50 100 200 400 \
  --real-ct "$REAL_CT" --work "$WORK" --results "$RESULTS"
"$PY" benchmarks/bench_training.py --device cuda --slices 1500 --work "$WORK" --results "$RESULTS"
