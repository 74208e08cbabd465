#!/usr/bin/env bash
# The torch.compile comparisons, for a second GPU job after bench/gpu_check.sh (compiling the UNet takes
# minutes, which the first check's 6-minute slot cannot hold). Each benchmark is time-boxed; a failure
# is recorded and the next still runs.
#
#   bash bench/gpu_compile_check.sh --out DIR     # DIR/compile-ops.json, DIR/compile-unet.json, DIR/*.log
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 --out DIR" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: $0 --out DIR" >&2; exit 2; }
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
SITE="${SVD_FAST_GPU_SITE:-/tmp/svd_fast_gpu_site}"
if compgen -G ".whl/*.whl" >/dev/null && [ ! -d "$SITE" ]; then
  "$PYTHON" -m pip install -q --no-index --find-links .whl --no-deps --target "$SITE" .whl/*.whl
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
status=0
bench() {  # bench NAME SECONDS ARGS...
  local name="$1" seconds="$2"; shift 2
  timeout "$seconds" "$PYTHON" -m pytest -q -p no:cacheprovider -o python_files='bench_*.py' --benchmark-only \
    --benchmark-json="$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1 || { echo "$name failed (see $OUT/$name.log)"; status=1; }
}
bench compile-ops 200 bench/bench_group_norm.py bench/bench_temporal_attention.py bench/bench_edm_step.py -k "compile"
bench compile-unet 360 bench/bench_pipeline.py -k "test_unet_step and 25 and (compile or eager or svd_fast)"
exit $status
