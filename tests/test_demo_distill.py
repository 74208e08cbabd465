"""`svd-fast demo --quick --distill`: the distillation stage and the student's evaluation end to end (every
`distilled` key of summary.json, the student's rows in comparison.png); the quick settings do not learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from svd_fast.cli import main

DISTILLED_KEYS = {
    "evaluation_summary", "steps", "unet_evaluations_per_video", "teacher_unet_evaluations_per_video", "generation_seconds",
    "teacher_generation_seconds", "distill_seconds", "teacher_4_step_euler_evaluation_summary", "one_step",
    "unet_time_speedup_vs_svd_default",
}  # fmt: skip


def test_demo_quick_with_distillation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--distill"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    distilled = summary["distilled"]
    assert DISTILLED_KEYS <= set(distilled)
    assert distilled["steps"] == 4 and distilled["unet_evaluations_per_video"] == 4
    # The quick teacher samples 2 steps at guidance 1 (batch 1): 2 evaluations per video.
    assert distilled["teacher_unet_evaluations_per_video"] == 2 and distilled["svd_default_unet_evaluations_per_video"] == 50
    assert set(distilled["evaluation_summary"]["targets"]) == set(summary["evaluation_summary"]["targets"])
    assert {"student_1_step_relative_l2", "teacher_1_step_euler_relative_l2", "target_ratio<=1/3"} <= set(distilled["one_step"])
    assert distilled["distill_seconds"] > 0 and distilled["generation_seconds"] > 0
    with Image.open(out / "comparison.png") as figure:
        height = figure.size[1]
    assert abs(height - 1.15 * 6 * 100) <= 1  # six rows of 1.15 in at 100 dpi: the four teacher rows and two student rows
    assert '"distilled"' in capsys.readouterr().out
