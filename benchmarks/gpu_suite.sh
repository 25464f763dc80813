#!/usr/bin/env bash
# The GPU figures in one go, for a machine with a CUDA device: inference (end to end and scaling), training,
# every bundle's detector table on its full schedule, the accuracy of synthetic_anomaly on its GPU schedule
# (sample_configs/synthetic_anomaly_gpu.json) against the intensity floor, and the anomalib comparison when its
# environment is there (bash benchmarks/setup_anomalib_env.sh). Figures are appended to ${RESULTS:-benchmarks/RESULTS.md}.
#   bash benchmarks/gpu_suite.sh [python]
#   SECTIONS="inference training" bash benchmarks/gpu_suite.sh    # some of: inference training table accuracy anomalib
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
REAL_CT=${REAL_CT:-../shared/data/real_ct/ts_example}
WORK=${WORK:-$(mktemp -d)}
SECTIONS=${SECTIONS:-inference training table accuracy anomalib}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
if want inference; then
  "$PY" benchmarks/bench_inference.py --device cuda --fit-slices 1500 --slices 200 --scaling 50 100 200 400 \
    --real-ct "$REAL_CT" --work "$WORK" --results "$RESULTS"
fi
if want training; then
  "$PY" benchmarks/bench_training.py --device cuda --slices 1500 --work "$WORK" --results "$RESULTS"
fi
if want table; then
  "$PY" benchmarks/detector_table.py --device cuda --full-schedules --work "$WORK/table" --results "$RESULTS"
fi
if want accuracy; then
  "$PY" benchmarks/accuracy.py --device cuda --detectors intensity synthetic_anomaly \
    --config sample_configs/synthetic_anomaly_gpu.json --real-ct "$REAL_CT" --work "$WORK/accuracy" --results "$RESULTS"
fi
if want anomalib; then
  if [ -x benchmarks/.venv-anomalib/bin/python ]; then
    benchmarks/.venv-anomalib/bin/python benchmarks/compare_anomalib.py --device cuda --work "$WORK/anomalib" --results "$RESULTS"
  else
    echo "anomalib comparison skipped: run bash benchmarks/setup_anomalib_env.sh first" >&2
  fi
fi
