#!/usr/bin/env bash
# Reproduce the vib_sample_kl CPU benchmark + GPU prediction results (docs/benchmarks.md).
#   bash benchmarks/run_all.sh            # full grid (N in {4096, 16384} x D in {1024, 4096}); ~30-60 min on 2 cores
#   bash benchmarks/run_all.sh --quick    # one small shape, 2 rounds (CI smoke run: checks the pipeline
#                                         # works; its output is labelled "smoke, not a measurement")
# Needs the C++ extension (pip install --no-build-isolation -e .) and pytest-benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$VENV/bin/python}  # the project's venv, like scripts/test.sh
if [[ ! -x "$PYTHON" ]]; then
  echo "[run_all] $PYTHON not found: run 'bash scripts/setup_env.sh' first (or set PYTHON)" >&2
  exit 1
fi
if [[ "${1:-}" == "--quick" ]]; then
  export VITTLE_BENCH_QUICK=1
  OUT=${OUT:-/tmp/vittle_bench_quick/vib_sample_kl_cpu.json}
  REPORT_ARGS=(--smoke)  # 2 rounds of one small shape: labelled "smoke, not a measurement"
else
  OUT=${OUT:-benchmarks/results/vib_sample_kl_cpu.json}
  REPORT_ARGS=()
fi
mkdir -p "$(dirname "$OUT")"
"$PYTHON" -m pytest benchmarks/test_bench_vib_sample_kl.py -q -p no:cacheprovider --benchmark-json="$OUT"
"$PYTHON" -m benchmarks.report "$OUT" "${REPORT_ARGS[@]}"
