"""`svd-fast demo`: the quick variant end to end (every output, every summary key), the measurements it
reports checked on known ground truth, and one-line user errors for demo and make-tiny."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from svd_fast import _io
from svd_fast.cli import main
from svd_fast.demo import OUTPUT_FILES
from svd_fast.demo.evaluate import centroid_track, motion_of, pooled_psnr
from svd_fast.demo.world import draw_spec, held_out_specs, render

# PyAV is not on every machine that runs the GPU tests (the GPU image lacks it): skip this module there.
av = pytest.importorskip("av")

SPEEDS = {"slow": 0.5, "fast": 1.5}
ENTRY_KEYS = {"colour", "bucket", "psnr_first_frame", "psnr_mean", "centroid_track", "displacement_px", "angle_error_deg"}


@pytest.mark.parametrize("colour", ["red", "blue"])
def test_centroid_track_recovers_the_rendered_motion(colour: str) -> None:
    spec = draw_spec(np.random.default_rng(3), "clip", colour, "fast", SPEEDS, 8, 32, seed=5)
    track = centroid_track(render(spec, 8, 32), colour)
    assert all(point is not None for point in track)
    assert track[0] == pytest.approx(list(spec.start_xy), abs=0.3)
    displacement, angle_error = motion_of(track, colour)
    assert displacement == pytest.approx(1.5 * 7, abs=0.3)
    assert angle_error < 3.0


def test_motion_of_a_vanished_disk_is_unmeasured() -> None:
    assert motion_of([None, [3.0, 4.0], None], "red") == (None, None)
    assert motion_of([[0.0, 0.0], [0.0, 5.0]], "red") == (5.0, 90.0)


def test_pooled_psnr_ignores_texture_but_not_position() -> None:
    spec = draw_spec(np.random.default_rng(0), "clip", "red", "slow", SPEEDS, 8, 32, seed=1)
    frames = render(spec, 8, 32)
    assert pooled_psnr(frames, frames) == 99.0
    moved = render(replace(spec, start_xy=(spec.start_xy[0] + 6.0, spec.start_xy[1])), 8, 32)
    assert pooled_psnr(moved[0], frames[0]) < pooled_psnr(frames[1], frames[0])


def test_held_out_frames_alternate_colours_and_are_new() -> None:
    held_out = held_out_specs(8, 8, 32, SPEEDS, seed=0)
    assert [spec.colour for spec in held_out[:2]] == ["red", "blue"]
    assert len({spec.background_seed for spec in held_out}) == 8


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    assert sorted(path.name for path in out.iterdir() if path.name != "work") == sorted([*OUTPUT_FILES, _io.MARKER])
    for name in ("generated_slow.mp4", "generated_fast.mp4", "reference_slow.mp4", "reference_fast.mp4"):
        with av.open(str(out / name)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 8
    for name in ("first_frame.png", "comparison.png", "loss.png"):
        assert (out / name).stat().st_size > 100
    assert (out / "pipeline" / "model_index.json").is_file()

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert {"motion_bucket_id", "keep"} <= set(manifest.columns)
    assert (~manifest["keep"]).sum() == 2  # the two static clips
    assert (manifest["source"].str.contains("reel_")).sum() == 8  # the reel split at its cuts

    summary = json.loads((out / "summary.json").read_text())
    assert {"settings", "curation", "motion_buckets", "autoencoder", "training", "evaluation", "evaluation_summary", "stage_seconds", "outputs"} <= set(summary)
    assert summary["training"]["steps"] == 3 and summary["training"]["kernels"] == "applied"
    entries = summary["evaluation"]
    assert len(entries) >= 8
    assert {entry["colour"] for entry in entries} == {"red", "blue"} and {entry["bucket"] for entry in entries} == {"low", "high"}
    for entry in entries:
        assert ENTRY_KEYS <= set(entry) and len(entry["centroid_track"]) == 8
    assert set(summary["evaluation_summary"]["targets"]) == {
        "median_angle_error_deg<=30", "high_over_low_displacement>=1.5", "psnr_first_frame>=22", "psnr_mean>=16",
    }
    assert "outputs in" in capsys.readouterr().out

    # The saved pipeline is an ordinary diffusers folder that `svd-fast generate` runs.
    video = tmp_path / "again.mp4"
    bucket = str(summary["motion_buckets"]["high"])
    assert main(["generate", "--model", str(out / "pipeline"), "--image", str(out / "first_frame.png"), "--out", str(video), "--motion-bucket-id", bucket, "--steps", "2"]) == 0
    assert video.stat().st_size > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--out", "{nonempty}"],
        ["demo", "--out", "{file}"],
        ["demo", "--out", "{new}", "--unet-steps", "0"],
        ["demo", "--out", "{new}", "--sample-steps", "-1"],
        ["make-tiny", "{nonempty}"],
        ["make-tiny", "{file}"],
        ["make-tiny", "{new}", "--seed", "-1"],
    ],
)
def test_user_errors_are_one_line_on_stderr(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("user data")
    (tmp_path / "file").write_text("not a folder")
    paths = {"nonempty": nonempty, "file": tmp_path / "file", "new": tmp_path / "new"}
    assert main([item.format(**paths) for item in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"svd-fast {argv[0]}: error: ")
    assert (nonempty / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())
