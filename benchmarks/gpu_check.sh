#!/usr/bin/env bash
# The one prepared GPU check (issue 6), for a machine with an NVIDIA GPU, a CUDA toolkit and a
# preinstalled CUDA torch but no network. It builds stochgate from this source tree against
# that torch (no downloads, --no-build-isolation, sm_90 only to keep it short), runs the CUDA
# tests, compute-sanitizer memcheck and racecheck over a short CUDA subset, and
# `stochgate bench` at the issue's shapes, and writes everything into the directory given as
# its argument (default: $OUT, else ./gpu_check_out). Budget: under 8 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
exec > >(tee "$DIR/gpu_check.log") 2>&1
step() { echo; echo "=== $(date +%T) $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
nvcc --version | tail -1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "build (sm_90, against the installed torch)"
export TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=16
if ! $PY -m pip install --no-build-isolation --no-deps --no-index . > "$DIR/build.txt" 2>&1; then
  tail -50 "$DIR/build.txt"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import stochgate, json; print(json.dumps(stochgate.build_info()))"

step "CUDA tests"
timeout 240 $PY -m pytest -q -m cuda -p no:cacheprovider tests/ -x -rf 2>&1 | tail -40 | tee "$DIR/pytest_cuda.txt"

step "compute-sanitizer (memcheck, racecheck) on a short subset"
SUBSET=(tests/test_gated_linear_cuda.py tests/test_estimators.py -k "(37-53-60-5 or 130-96-256-2 or cpu_and_cuda_draw) and not graph")
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 99 \
    $PY -m pytest -q -p no:cacheprovider -x "${SUBSET[@]}" 2>&1 | tail -15 | tee -a "$DIR/sanitizer.txt"
  echo "$tool exit status: ${PIPESTATUS[0]}" | tee -a "$DIR/sanitizer.txt"
done

step "bench: bf16 and fp32, B=16384, K=N=4096, chunk 128"
COMMON="--device cuda --batch 16384 --in-features 4096 --out-features 4096 --chunk 128 --density 0.1 0.25 0.5 1.0 --repeats 20"
timeout 120 $PY -m stochgate.cli bench $COMMON --dtype bfloat16 --op gated_linear --mode forward \
  --estimator-size 8192 --json "$DIR/bench_bf16_gated_linear_forward.json"
timeout 90 $PY -m stochgate.cli bench $COMMON --dtype bfloat16 --op gated_input_linear --mode train \
  --no-estimators --no-train-step --json "$DIR/bench_bf16_gated_input_linear_train.json"
timeout 90 $PY -m stochgate.cli bench $COMMON --dtype float32 --op block --mode train \
  --no-estimators --no-train-step --json "$DIR/bench_fp32_block_train.json"

step "summary"
$PY - "$DIR" <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
for f in sorted(d.glob("bench_*.json")):
    r = json.loads(f.read_text())
    print(f.name, r["machine"].get("gpu"))
    for row in r["matmul"]:
        if row["method"] == "stochgate":
            print(f"  density {row['density']:<5} stochgate {row['median_s']*1e3:8.3f} ms  {row['speedup_vs_dense']:.2f}x dense")
    for row in r.get("estimators", []):
        if row["method"] in ("stochgate", "clone"):
            gbs = 2 * row["numel"] * (2 if r["args"]["dtype"] != "float32" else 4) / row["median_s"] / 1e9
            print(f"  {row['estimator']:<24} {row['mode']:<8} {row['median_s']*1e3:8.3f} ms  ~{gbs:6.0f} GB/s (read+write of x)")
PY
