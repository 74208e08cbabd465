#!/usr/bin/env bash
# The GPU checks, in stages that each fit a 10-minute device call, for a machine whose python3 already has a
# CUDA torch, Triton, pytest and pytest-benchmark (the project's lent H100/H200 image) but no network.
#
#   bash bench/gpu_session.sh build            # build svd_fast._C with the CUDA kernels (sm_80, sm_90)
#   bash bench/gpu_session.sh test             # the CUDA tests: every op's cuda and triton backends, CUDA graphs
#   bash bench/gpu_session.sh bench-ops        # op benchmarks -> $OUT/gpu-ops.json
#   bash bench/gpu_session.sh bench-unet       # UNet step, SVD 1.5B fp16 576x1024 -> $OUT/gpu-unet.json
#   bash bench/gpu_session.sh bench-end-to-end # SVD-XT / SVD end to end, 25 steps -> $OUT/gpu-e2e.json
#
# Pure-Python packages the image lacks (diffusers; av for the video tests) travel as wheels in .whl/ (see the
# device tool's README): `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
# diffusers==0.42.1`. Tables for bench/RESULTS.md: `python3 bench/report.py $OUT/gpu-ops.json`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
bench() { python3 -m pytest "$@" -q -p no:cacheprovider -o python_files='bench_*.py' --benchmark-only; }

case "${1:-}" in
  build)
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
      SVD_FAST_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" python3 setup.py -q build_ext --inplace
    python3 -c "import svd_fast._C as C; assert C.built_with_cuda(); print('svd_fast._C built with CUDA kernels')"
    ;;
  test)
    python3 -m pytest -q -p no:cacheprovider tests/test_group_norm.py tests/test_edm_step.py \
      tests/test_temporal_attention.py tests/test_optimize.py -x
    ;;
  bench-ops)
    bench bench/bench_temporal_attention.py bench/bench_group_norm.py bench/bench_edm_step.py --benchmark-json="$OUT/gpu-ops.json"
    ;;
  bench-unet)
    bench bench/bench_pipeline.py -k test_unet_step --benchmark-json="$OUT/gpu-unet.json"
    ;;
  bench-end-to-end)
    bench bench/bench_pipeline.py -k "test_full_size_end_to_end and ${2:-svd-xt}" --benchmark-json="$OUT/gpu-e2e.json"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
