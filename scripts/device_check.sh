#!/usr/bin/env bash
# Ember's GPU device check: the Mosaic GPU and Triton decode kernels against the reference,
# the kernel tests natively on the GPU, the kernel benchmark, and (where more than one GPU is
# visible) the tensor-parallel scaling benchmark.
#
#   bash scripts/device_check.sh [--out DIR]
#
# For a machine with an NVIDIA GPU and jax[cuda] (plus pytest, scipy) already installed; no
# network. Runs from the repository (PYTHONPATH, no install) and stays under 5 minutes: each
# stage has its own time limit. With --out DIR the benchmark writes table.md, timings.json and
# timings.csv there, and the test log goes to DIR/tests.log. Exit status: non-zero if a stage
# failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) echo "device_check.sh: unknown argument $1 (expected --out DIR)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"     # tests/conftest.py defaults to cpu otherwise
export EMBER_PALLAS_INTERPRET=0                   # kernels compiled (Triton, Mosaic GPU)
[[ -n "$out" ]] && mkdir -p "$out"

echo "== environment"
"$python" - <<'PY' || exit 1
import jax
print("jax", jax.__version__, "devices", jax.devices())
assert jax.default_backend() == "gpu", "no GPU visible to jax"
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

echo "== decode kernels: Mosaic GPU and Triton against the reference, timed"
# First and alone, so that a Mosaic GPU kernel that fails (or hangs) costs only this stage:
# the stages after it then run with the Triton kernels only (EMBER_GPU_KERNELS=triton).
start=$SECONDS
timeout 60 "$python" scripts/bench_kernels.py --decode-kernels \
  2>&1 | tee ${out:+"$out/decode_kernels.md"}
decode_status=${PIPESTATUS[0]}
echo "decode kernels: exit $decode_status in $((SECONDS - start)) s"
if [[ $decode_status -ne 0 ]]; then
  echo "decode kernels failed: the stages below use Triton only"
  export EMBER_GPU_KERNELS=triton
fi

echo "== kernel tests (native)"
start=$SECONDS
timeout 140 "$python" -m pytest tests/pallas_kernels -p no:cacheprovider -rs \
  2>&1 | tee ${out:+"$out/tests.log"}
tests_status=${PIPESTATUS[0]}
echo "tests: exit $tests_status in $((SECONDS - start)) s"

echo "== benchmark"
start=$SECONDS
timeout 90 "$python" scripts/bench_kernels.py ${out:+--out "$out"}
bench_status=$?
echo "benchmark: exit $bench_status in $((SECONDS - start)) s"

scaling_status=0
gpus=$("$python" -c "import jax; print(jax.device_count())" 2>/dev/null || echo 1)
if [[ "$gpus" -gt 1 ]]; then
  echo "== tensor-parallel scaling (N = 1 .. $gpus)"
  start=$SECONDS
  timeout 120 "$python" scripts/bench_scaling.py 2>&1 | tee ${out:+"$out/scaling.md"}
  scaling_status=${PIPESTATUS[0]}
  echo "scaling: exit $scaling_status in $((SECONDS - start)) s"
fi

[[ $decode_status -eq 0 && $tests_status -eq 0 && $bench_status -eq 0 \
   && $scaling_status -eq 0 ]]
