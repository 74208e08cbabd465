"""`svd-fast demo`: the quick variant end to end (every output, every summary key), the measurements it
reports checked on known ground truth, and one-line user errors for demo and make-tiny."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from svd_fast import _io
from svd_fast.checks import CheckError, parse_seed_list
from svd_fast.cli import main
from svd_fast.demo import OUTPUT_FILES, QUICK
from svd_fast.demo.evaluate import background_drift, centroid_track, high_over_low, median_example, motion_of, pooled_psnr
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


@pytest.mark.parametrize("colour", ["red", "blue"])
def test_background_drift_measures_the_background_not_the_moving_disk(colour: str) -> None:
    spec = draw_spec(np.random.default_rng(4), "clip", colour, "fast", SPEEDS, 8, 32, seed=2)
    frames = render(spec, 8, 32)
    assert background_drift(frames, frames[0], colour) == 0.0  # the disk moved; the background did not change
    tinted = frames.astype(np.int16)
    tinted[-1, ..., 1] += 12  # the last frame turns towards teal: green up by 12 ...
    tinted[-1, ..., 0] -= 5  # ... and red down by 5, disk included (it is left out of the measure)
    assert background_drift(np.clip(tinted, 0, 255).astype(np.uint8), frames[0], colour) == pytest.approx(12.0, abs=0.5)


def test_the_example_is_the_median_high_over_low_ratio() -> None:
    ratios = [3.0, 1.0, None, 2.0, 5.0, 1.5, 4.0, 0.5]  # None: the low bucket did not move the disk
    entries = [
        entry
        for index, ratio in enumerate(ratios)
        for entry in (
            {"first_frame": f"f{index}", "bucket": "low", "displacement_px": 0.0 if ratio is None else 2.0},
            {"first_frame": f"f{index}", "bucket": "high", "displacement_px": 2.0 * (ratio or 1.0)},
        )
    ]
    assert high_over_low(entries, "f0") == 3.0 and high_over_low(entries, "f2") is None
    # Sorted: None, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0 -> the lower middle of 8 is the 4th: 1.5, frame f5.
    assert median_example(entries) == 5


def test_seed_lists() -> None:
    assert parse_seed_list("0-4") == [0, 1, 2, 3, 4]
    assert parse_seed_list("3, 0-1") == [3, 0, 1]
    for bad in ("", "-1", "1-", "a", "2-1", "1,1", "0-100", "\u00b2"):
        with pytest.raises(CheckError):
            parse_seed_list(bad)


def test_held_out_frames_alternate_colours_and_are_new() -> None:
    held_out = held_out_specs(8, 8, 32, SPEEDS, seed=0)
    assert [spec.colour for spec in held_out[:2]] == ["red", "blue"]
    assert len({spec.background_seed for spec in held_out}) == 8


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--seeds", "0,1"]) == 0
    # Seed 0's outputs at the top, seed 1's (a whole second run) in seed_1/.
    assert sorted(path.name for path in out.iterdir() if path.name not in ("work", "seed_1")) == sorted([*OUTPUT_FILES, _io.MARKER])
    assert sorted(path.name for path in (out / "seed_1").iterdir() if path.name != "work") == sorted([*OUTPUT_FILES, _io.MARKER])
    for name in ("generated_slow.mp4", "generated_fast.mp4", "reference_slow.mp4", "reference_fast.mp4"):
        with av.open(str(out / name)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 8
    for name in ("first_frame.png", "comparison.png", "motion.png", "loss.png"):
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
        "median_angle_error_deg<=30", "high_over_low_displacement>=1.5", "psnr_first_frame>=22", "psnr_mean>=16", "background_drift<=8",
    }
    assert summary["background_drift"] == max(entry["background_drift"] for entry in entries) >= 0.0
    example = summary["example"]
    assert example["first_frame"] in {entry["first_frame"] for entry in entries}
    assert example["high_over_low_displacement"] == high_over_low(entries, example["first_frame"])
    first_frame = np.asarray(Image.open(out / "first_frame.png"))
    held_out = held_out_specs(QUICK.held_out, QUICK.num_frames, QUICK.size, QUICK.speeds, seed=0)
    assert (first_frame == render(next(spec for spec in held_out if spec.name == example["first_frame"]), QUICK.num_frames, QUICK.size)[0]).all()
    table = summary["seed_table"]
    assert [row["seed"] for row in table] == [0, 1] and [row["folder"] for row in table] == [".", "seed_1"]
    second = json.loads((out / "seed_1" / "summary.json").read_text())
    assert second["seed"] == 1 and "seed_table" not in second
    assert table[1]["median_psnr_first_frame"] == second["evaluation_summary"]["median_psnr_first_frame"]
    assert table[1]["all_targets_met"] == all(second["evaluation_summary"]["targets"].values())
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
