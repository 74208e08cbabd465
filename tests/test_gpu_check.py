"""bench/gpu_check.sh --dry-run: the prepared GPU check runs on a CPU machine, skips the CUDA stages with
their reason, and writes a report with every key issue #13 lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "device", "torch", "triton", "copy_gbs", "stages", "pytest", "correctness", "ops", "unet_step_ms",
    "end_to_end_s", "peak_reserved_gib", "vae_decode", "optical_flow_engine",
}  # fmt: skip
STAGES = {"preflight", "build", "pytest", "correctness", "ops", "unet_step", "end_to_end", "vae_decode", "optical_flow"}


@pytest.mark.slow
def test_dry_run_writes_the_full_report(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(tmp_path), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert (tmp_path / "gpu_report.md").read_text() in result.stdout
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert set(report["stages"]) == STAGES
    for name, stage in report["stages"].items():
        assert set(stage) == {"status", "seconds", "error"}, name
        assert stage["status"] in ("ok", "failed", "skipped"), name
    failed = {name: stage["error"] for name, stage in report["stages"].items() if stage["status"] == "failed"}
    assert not failed
    if not report["stages"]["unet_step"]["status"] == "ok":
        assert "needs a CUDA device" in report["stages"]["unet_step"]["error"]
    assert set(report["pytest"]) == {"passed", "failed", "skipped"} and report["pytest"]["failed"] == 0
    assert report["correctness"] and all(row["ok"] for row in report["correctness"])
    assert {"op", "shape", "dtype", "backend", "max_abs_err", "tolerance", "ok"} <= set(report["correctness"][0])
    assert {"op", "shape", "dtype", "backend", "ms", "gbs", "pct_of_copy", "baseline", "baseline_ms"} == set(report["ops"][0])
    assert report["copy_gbs"] > 0
    assert set(report["unet_step_ms"]) == {"eager", "optimized", "optimized_cuda", "optimized_cuda_graphs"}
    assert set(report["end_to_end_s"]) == set(report["peak_reserved_gib"]) == {"eager", "optimized"}
    assert result.returncode == 0, result.stderr[-3000:]
