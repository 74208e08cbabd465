#!/usr/bin/env bash
# The prepared GPU check (issue #13): one command, <= 6 minutes on a fresh H200 with no network.
#
#   bash bench/gpu_check.sh --out DIR         # every stage, time-boxed; DIR/gpu_report.json and .md
#   bash bench/gpu_check.sh --out DIR --dry-run   # the same on a CPU machine (CUDA stages skipped)
#
# Missing packages travel as wheels in .whl/ (`make gpu-wheels` where PyPI is reachable). The stages and
# their time boxes are in bench/gpu_check.py; torch.compile comparisons are in bench/gpu_compile_check.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
