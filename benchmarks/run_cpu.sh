#!/usr/bin/env bash
# Regenerates the committed CPU results and the README's "Measured results" section:
#   bash benchmarks/run_cpu.sh        (about 10 minutes on a quiet 2-core machine)
# Run it on a quiet machine: every ratio is measured within one run, but a busy machine
# still distorts the threading of both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
R=benchmarks/results
mkdir -p "$R"
for op_mode in gated_linear:forward gated_linear:train gated_input_linear:forward gated_input_linear:train block:train; do
  op=${op_mode%%:*}; mode=${op_mode##*:}
  extra="--no-estimators --no-train-step"
  [ "$op_mode" = "gated_linear:forward" ] && extra="--estimator-size 4096"
  $PY -m stochgate.cli bench --op "$op" --mode "$mode" $extra \
    --json "$R/cpu_${op}_${mode}.json" --plot "$R/cpu_${op}_${mode}.png" | tee "$R/cpu_${op}_${mode}.txt"
done
$PY benchmarks/readme_results.py
