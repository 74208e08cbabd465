"""Curation stages, clips/s: svd_fast's PyTorch Lucas-Kanade flow vs OpenCV Farneback (one core each),
cut detection, the decode+cuts stage and OCR.

A "clip" is 4 s of 576x1024 video at 24 fps. Flow runs at 2 FPS (8 frames -> 7 pairs) at the pipeline's
analysis size (256 px longer side: 144x256); cut detection on 96 frames at 96 px (the pipeline's cut size).
On CPU everything is single-threaded so the numbers compare algorithms, not thread counts.
Run: python -m pytest bench/bench_curation.py --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from svd_fast.curation import detect_cuts, mean_flow_magnitude
from svd_fast.curation.flow import lucas_kanade_flow, to_gray
from svd_fast.data.synthetic import scenes_with_cuts, translating_texture, write_video

FLOW_PAIRS_PER_CLIP = 7
FLOW_SIZE = (144, 256)
CUT_FRAMES_PER_CLIP = 96
CUT_SIZE = (54, 96)


@pytest.fixture(autouse=True)
def _one_core(device: torch.device):
    if device.type != "cpu":
        yield
        return
    import cv2

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(threads)
    cv2.setNumThreads(cv_threads)


def _record_clips_per_second(benchmark, clips: int) -> None:
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    benchmark.extra_info["clips_per_s"] = round(clips / benchmark.stats.stats.median, 2)


def test_flow_svd_fast(benchmark, timed, device: torch.device) -> None:
    frames = translating_texture(FLOW_PAIRS_PER_CLIP + 1, *FLOW_SIZE, shift=(2, 3))
    gray = to_gray(frames, device)
    timed(lambda: lucas_kanade_flow(gray[:-1], gray[1:]), stage="flow", impl="svd_fast lucas-kanade", size=f"{FLOW_SIZE}")
    _record_clips_per_second(benchmark, 1)
    assert mean_flow_magnitude(frames, device) == pytest.approx(np.hypot(2, 3), rel=0.1)


def test_flow_opencv_farneback(benchmark, timed, device: torch.device) -> None:
    cv2 = pytest.importorskip("cv2")
    frames = translating_texture(FLOW_PAIRS_PER_CLIP + 1, *FLOW_SIZE, shift=(2, 3))
    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]

    def farneback() -> list[np.ndarray]:
        return [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 15, 3, 5, 1.2, 0) for a, b in zip(gray[:-1], gray[1:])]

    flows = timed(farneback, stage="flow", impl="opencv farneback (cpu)", size=f"{FLOW_SIZE}")
    _record_clips_per_second(benchmark, 1)
    assert float(np.linalg.norm(flows[0], axis=-1).mean()) == pytest.approx(np.hypot(2, 3), rel=0.15)


def test_cut_detection(benchmark, timed, device: torch.device) -> None:
    frames, cuts = scenes_with_cuts([40, 30, 26], *CUT_SIZE)
    video = torch.as_tensor(frames, device=device)
    found = timed(lambda: detect_cuts(video, device=device), stage="cuts", impl="svd_fast content x3 rates", frames=CUT_FRAMES_PER_CLIP)
    _record_clips_per_second(benchmark, 1)
    assert found == cuts


def test_decode_and_cut_stage(benchmark, timed, device: torch.device, tmp_path: Path) -> None:
    from svd_fast.curation.pipeline import CurationConfig, make_item, stage_cuts

    frames, _ = scenes_with_cuts([40, 30, 26], 288, 512)  # 576x1024 halved: decode cost stays representative
    path = write_video(tmp_path / "clip.mp4", frames, fps=24)
    config = CurationConfig(device=str(device))
    timed(lambda: stage_cuts(make_item(path), config), stage="decode+cuts", impl="pyav + svd_fast", size="288x512")
    _record_clips_per_second(benchmark, 1)


def test_ocr_three_frames(benchmark, timed, device: torch.device) -> None:
    from svd_fast.curation.ocr import tesseract_unavailable_reason, text_coverage

    reason = tesseract_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (512, 288), "white")
    ImageDraw.Draw(image).text((20, 100), "SUBSCRIBE NOW", fill="black", font=ImageFont.load_default(size=48))
    frame = np.array(image)
    timed(lambda: [text_coverage(frame) for _ in range(3)], stage="ocr", impl="tesseract", size="288x512")
    _record_clips_per_second(benchmark, 1)
