"""The curation pass holds a file's per-frame copies in memory-mapped temporary files and scores transitions a
chunk at a time, so its memory stays bounded however long the file, with the results of the one-shot
computation bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from curation_fixtures import edited_footage

from svd_fast.curation import analysis, cuts, detect_transitions
from svd_fast.data import decode_all_frames, synthetic

cv2 = pytest.importorskip("cv2")


def _one_shot_hsv_scores(frames: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The content scores computed on all frames at once (what the pass did before it went chunk by chunk)."""
    hsv = cv2.cvtColor(np.ascontiguousarray(frames).reshape(-1, frames.shape[2], 3), cv2.COLOR_RGB2HSV_FULL).reshape(len(frames), -1)
    return cv2.absdiff(hsv[1:], hsv[:-1]).mean(axis=1), cv2.absdiff(hsv[second], hsv[first]).mean(axis=1)


@pytest.mark.parametrize("mapped", [False, True])
def test_opencv_scores_in_chunks_equal_one_shot(monkeypatch: pytest.MonkeyPatch, mapped: bool) -> None:
    """Chunks of 7 frames (not dividing the count), the HSV frames in memory or in a temporary file: bit-identical."""
    frames = edited_footage(40, 40, 43)
    monkeypatch.setattr(cuts, "CHUNK_BYTES", 7 * frames[0].size)
    monkeypatch.setattr(cuts, "MAPPED_BYTES", 0 if mapped else cuts.MAPPED_BYTES)
    monkeypatch.setattr(cuts, "MAPPED_ROW_BYTES", 5 * frames[0].size)  # gathers from the mapped file in chunks too
    first, second = np.arange(0, len(frames) - 9, 3), np.arange(9, len(frames), 3)
    reference_full, reference_gathered = _one_shot_hsv_scores(frames, first, second)
    for video in (frames, torch.from_numpy(frames)):
        scores, full = cuts._scorer(video, "opencv")
        np.testing.assert_array_equal(full, reference_full)
        np.testing.assert_array_equal(scores(first, second), reference_gathered)
    assert reference_full.max() > 27.0  # the hard cut is in the footage


def test_torch_scores_in_chunks_equal_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 40 frames (150 frames: the last one shorter); few chunks, as torch's CPU ops cost much per call."""
    video = torch.from_numpy(edited_footage(40, 40, 43))
    monkeypatch.setattr(cuts, "CHUNK_BYTES", 40 * video[0].numel())
    hsv = cuts.rgb_to_hsv255(video).flatten(1)
    first, second = np.arange(0, len(video) - 9, 3), np.arange(9, len(video), 3)
    scores, full = cuts._scorer(video, "torch")
    np.testing.assert_array_equal(full, (hsv[1:] - hsv[:-1]).abs().mean(dim=1).double().numpy())
    np.testing.assert_array_equal(scores(first, second), (hsv[second] - hsv[first]).abs().mean(dim=1).double().numpy())


def test_temporary_array_maps_a_file_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not isinstance(cuts.temporary_array((4, 8), np.uint8), np.memmap)
    monkeypatch.setattr(cuts, "MAPPED_BYTES", 16)
    mapped = cuts.temporary_array((4, 8), np.uint8)
    assert isinstance(mapped, np.memmap) and mapped.shape == (4, 8)
    mapped[:] = np.arange(32, dtype=np.uint8).reshape(4, 8)
    cuts.release_pages(mapped)  # unmapped from the process; the file keeps the data
    np.testing.assert_array_equal(mapped, np.arange(32, dtype=np.uint8).reshape(4, 8))
    cuts.release_pages(np.zeros(3))  # an array in memory: nothing to release


def test_release_pages_keeps_private_writes_of_a_copy_on_write_mapping(tmp_path: Path) -> None:
    (tmp_path / "data.u8").write_bytes(bytes(range(64)))
    private = np.memmap(tmp_path / "data.u8", np.uint8, mode="c", shape=(8, 8))
    private[2] = 255
    cuts.release_pages(private)
    cuts.release_pages(private[1:4])
    assert (private[2] == 255).all() and (tmp_path / "data.u8").read_bytes() == bytes(range(64))


def test_scan_keeps_frames_in_temporary_files(tmp_path: Path) -> None:
    path = synthetic.write_video(tmp_path / "footage.mp4", edited_footage(40, 40, 43), fps=30, lossless=True)
    scan = analysis.scan_video(path, cut_max_side=96, flow_max_side=64, flow_fps=2.0)
    assert isinstance(scan.cut_frames, np.memmap) and isinstance(scan.flow_frames, np.memmap)
    assert scan.cut_frames.filename is None  # an unnamed file: nothing left on disk
    np.testing.assert_array_equal(scan.cut_frames, decode_all_frames(path, max_side=96))
    assert scan.flow_frames.shape == (len(scan.flow_indices), 36, 64)
    in_memory = np.array(scan.cut_frames)
    found = detect_transitions(scan.cut_frames, scan.times, fps=scan.fps)
    assert found == detect_transitions(in_memory, scan.times, fps=scan.fps) == detect_transitions(torch.from_numpy(in_memory), scan.times, fps=scan.fps)
    assert [transition.end for transition in found] == [40, 95, 149]  # the hard cut, the dissolve (80..94), the fade (138..149)


def _peak_rss_mb() -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) / 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from the current one
    except OSError:
        return False
    return True


def test_transition_detection_on_a_long_mapped_video_stays_in_bounded_memory(tmp_path: Path) -> None:
    """12,000 frames (187 MB of 54x96 RGB, about 7 minutes at 30 fps) mapped from a file: the whole-array HSV
    conversion and differences alone would take twice that; the chunked pass stays under 130 MB."""
    if not _reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident size")
    textures = [(synthetic.smooth_texture(54, 96, seed=seed) * 255).astype(np.uint8) for seed in range(4)]
    count = 12_000
    with open(tmp_path / "frames.u8", "wb") as file:
        for index in range(count):
            file.write(np.roll(textures[index // 1000 % 4], index % 1000, axis=1).tobytes())
    frames = np.memmap(tmp_path / "frames.u8", np.uint8, mode="r+", shape=(count, 54, 96, 3))
    _reset_peak_rss()
    before = _peak_rss_mb()
    found = detect_transitions(frames, fps=30)
    growth = _peak_rss_mb() - before
    assert [transition.end for transition in found] == list(range(1000, count, 1000))
    assert growth < 130, f"peak resident size grew by {growth:.0f} MB"
