#!/usr/bin/env bash
# Regenerates the committed CPU results and the README's "Measured results" section:
#   bash benchmarks/run_cpu.sh        (about 12 minutes on a quiet 2-core machine)
# Run it on a quiet machine: every ratio is measured within one run, but a busy machine
# still distorts the threading of both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
R=benchmarks/results
mkdir -p "$R"
# PARTS="float32 bfloat16" (default both): which tables to regenerate.
PARTS=${PARTS:-float32 bfloat16}
# PREFIX: the results' file prefix, one per machine the README shows (readme_results.py's
# CPU_GROUPS): cpu (the Intel AVX-512/AMX VM), cpu_avx2 (the AMD EPYC VM).
PREFIX=${PREFIX:-cpu}
OPS="gated_linear:forward gated_linear:train gated_input_linear:forward gated_input_linear:train block:train"
if [[ " $PARTS " == *" float32 "* ]]; then
  for op_mode in $OPS; do
    op=${op_mode%%:*}; mode=${op_mode##*:}
    extra="--no-estimators --no-train-step"
    [ "$op_mode" = "gated_linear:forward" ] && extra="--estimator-size 4096"
    $PY -m stochgate.cli bench --op "$op" --mode "$mode" $extra \
      --json "$R/${PREFIX}_${op}_${mode}.json" --plot "$R/${PREFIX}_${op}_${mode}.png" | tee "$R/${PREFIX}_${op}_${mode}.txt"
  done
fi
# bfloat16: chunk 64 runs on AMX where the CPU has it (as dense bfloat16 F.linear does);
# chunk 1 (forward only) shows the float32 kernels that narrower chunks still take; the
# forward run also times the training step with each estimator in bfloat16.
if [[ " $PARTS " == *" bfloat16 "* ]]; then
  for op_mode in $OPS; do
    op=${op_mode%%:*}; mode=${op_mode##*:}
    chunks="64" extra="--no-estimators --no-train-step"
    # the forward table also times the bfloat16 training step (gater -> estimator -> both layers)
    [ "$op_mode" = "gated_linear:forward" ] && chunks="64 1" extra="--no-estimators"
    $PY -m stochgate.cli bench --dtype bfloat16 --chunk $chunks --op "$op" --mode "$mode" $extra \
      --json "$R/${PREFIX}_bf16_${op}_${mode}.json" --plot "$R/${PREFIX}_bf16_${op}_${mode}.png" | tee "$R/${PREFIX}_bf16_${op}_${mode}.txt"
  done
fi
$PY benchmarks/readme_results.py
