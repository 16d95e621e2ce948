#!/usr/bin/env bash
# The CUDA checks and figures on a GPU machine (issue 22, docs/cuda.md), in one run that fits the device tool's
# 10 minutes: builds the package with the machine's nvcc, runs the C++ cuda_check (GPU against host emulation and
# CPU, bit for bit), the CUDA tests (every codec and dtype against the CPU engine on the device) and
# bench/bench_cuda.py. Results go to $OUT (default bench/results). Needs no network: the GPU image has torch,
# transformers, nanobind, scikit-build-core, cmake and nvcc.
#   device run:  bash bench/gpu_check.sh            (then copy $OUT/cuda.md into bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
nvcc --version | tail -2 | tee -a "$OUT/gpu.txt"
start=$(date +%s)
CMAKE_ARGS="-DDELTAPACK_CUDA=ON" $PY -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -5
$PY -c "import deltapack as dp; assert dp.cuda.built() and dp.cuda.device_count() > 0, 'no CUDA in the build'; print('deltapack', dp.__version__, 'cuda devices:', dp.cuda.device_count())"
echo "build: $(( $(date +%s) - start )) s"
cmake -S . -B /tmp/dp-cuda -G Ninja -DDELTAPACK_CUDA=ON -DDELTAPACK_TESTS=ON -DDELTAPACK_EXAMPLES=OFF >/dev/null
cmake --build /tmp/dp-cuda --target cuda_check >/dev/null
/tmp/dp-cuda/cuda_check | tee "$OUT/cuda_check.txt"
(cd tests && $PY -m pytest -q -x -p no:cacheprovider test_cuda.py) 2>&1 | tail -15 | tee "$OUT/cuda_tests.txt"
echo "checks: $(( $(date +%s) - start )) s"
$PY bench/bench_cuda.py --out "$OUT" ${BENCH_ARGS:-}
echo "total: $(( $(date +%s) - start )) s"
