#!/usr/bin/env bash
# The prepared GPU check (issue #25): ONE job, at most 8 minutes of wall time in all (wheel install, stages,
# packing), on a fresh GPU machine with no network. A failed job cannot be repeated in the same GPU slot.
#
# What travels with the working tree: the tree itself and the git-ignored folder .whl/, made by
# `make gpu-wheels` where PyPI is reachable (diffusers, and peft + accelerate for the train_memory stage's LoRA: the image has torch, triton, transformers,
# pillow, ...). With the device tool: carry [".whl"]. The command, from the repository root:
#
#   bash bench/gpu_check.sh --out "$OUT"              # every stage, time-boxed
#   bash bench/gpu_check.sh --out DIR --dry-run       # the same on a CPU machine (CUDA stages skipped; CI)
#
# The results folder (--out) receives exactly three files: gpu_report.json, gpu_report.md (also printed at
# the end) and gpu_check_files.tar.gz (every stage record and log; the stages work in build/gpu_check/).
# Stages and their time boxes (420 s together) are in bench/gpu_check.py; torch.compile comparisons are in
# bench/gpu_compile_check.sh (a second job).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
job_seconds=480
dry_run=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=1; done
# A CPU machine runs the stages' 3x time boxes (bench/gpu_check.py).
[ "$dry_run" = 1 ] && job_seconds=$((3 * job_seconds))
export SVD_FAST_GPU_JOB_DEADLINE=$(($(date +%s) + job_seconds))
site="${SVD_FAST_GPU_SITE:-/tmp/svd_fast_gpu_site}"

# Carried wheels install before Python starts (the preflight stage's box holds no pip run), without
# bytecode compilation (--no-compile: 3 s instead of 12 s), and only for packages the image lacks, so that
# nothing the image ships is shadowed; their folder goes on PYTHONPATH for every stage.
shopt -s nullglob
wheels=(.whl/*.whl)
if [ "$dry_run" = 0 ] && [ "${#wheels[@]}" -gt 0 ]; then
  missing=$("$python" - "${wheels[@]}" <<'EOF'
import importlib.metadata
import os
import sys

for wheel in sys.argv[1:]:
    name = os.path.basename(wheel).split("-")[0]
    try:
        importlib.metadata.version(name)
        print("skip", wheel)
    except importlib.metadata.PackageNotFoundError:
        print("install", wheel)
EOF
  )
  to_install=$(awk '$1 == "install" {print $2}' <<<"$missing")
  export SVD_FAST_GPU_WHEELS_SKIPPED=$(awk '$1 == "skip" {print $2}' <<<"$missing" | xargs -r -n1 basename | xargs)
  if [ -n "$to_install" ]; then
    # shellcheck disable=SC2086
    if timeout 60 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" $to_install; then
      export SVD_FAST_GPU_WHEELS_INSTALLED=$(xargs -r -n1 basename <<<"$to_install" | xargs)
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
      export SVD_FAST_GPU_WHEEL_ERROR="pip install of $(xargs <<<"$to_install") failed or took over 60 s"
    fi
  fi
fi
exec "$python" bench/gpu_check.py "$@"
