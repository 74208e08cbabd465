"""Curation cost: optical flow (svd_fast's backends vs plain OpenCV Farneback), transition detection, and the
whole local pass per file (one decode: transitions + 2-FPS flow + the key frames' text crops; then Tesseract; CLIP off) against
PySceneDetect's ContentDetector pass alone over the same 480p H.264 files, as a ratio measured in one run.

A flow "clip" is 4 s at 2 FPS (8 frames -> 7 pairs) at the pipeline's analysis size (256 px longer side).
Run: python -m pytest bench/bench_curation.py --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from svd_fast.curation import CurationConfig, detect_transitions, optical_flow
from svd_fast.curation.flow import to_gray
from svd_fast.curation.pipeline import make_item, stage_analyse, stage_ocr
from svd_fast.data import synthetic

FLOW_PAIRS_PER_CLIP = 7
FLOW_SIZE = (144, 256)
PASS_SIZE = (480, 854)
PASS_FILES = 2


def _record_clips_per_second(benchmark, clips: int) -> None:
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    benchmark.extra_info["clips_per_s"] = round(clips / benchmark.stats.stats.median, 2)


@pytest.mark.parametrize("backend", ["opencv", "torch"])
def test_flow_svd_fast(benchmark, timed, device: torch.device, backend: str) -> None:
    if backend == "opencv" and device.type != "cpu":
        pytest.skip("the OpenCV backend runs on the CPU")
    gray = to_gray(synthetic.translating_texture(FLOW_PAIRS_PER_CLIP + 1, *FLOW_SIZE, shift=(2, 3)), device)
    flow = timed(lambda: optical_flow(gray[:-1], gray[1:], backend), stage="flow", impl=f"svd_fast {backend}", size=f"{FLOW_SIZE}")
    _record_clips_per_second(benchmark, 1)
    assert float(flow.norm(dim=1).median()) == pytest.approx(np.hypot(2, 3), rel=0.1)


def test_flow_opencv_farneback_plain(benchmark, timed, device: torch.device) -> None:
    cv2 = pytest.importorskip("cv2")
    frames = synthetic.translating_texture(FLOW_PAIRS_PER_CLIP + 1, *FLOW_SIZE, shift=(2, 3))
    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]

    def farneback() -> list[np.ndarray]:
        return [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0) for a, b in zip(gray[:-1], gray[1:])]

    timed(farneback, stage="flow", impl="opencv farneback, defaults (reference)", size=f"{FLOW_SIZE}")
    _record_clips_per_second(benchmark, 1)


def test_transition_detection(benchmark, timed, device: torch.device) -> None:
    frames, cuts = synthetic.scenes_with_cuts([40, 30, 26], 54, 96)
    video = torch.as_tensor(frames, device=device)
    found = timed(lambda: detect_transitions(video, fps=24, device=device), stage="transitions", impl="svd_fast 3 rates", frames=len(frames))
    _record_clips_per_second(benchmark, 1)
    assert [transition.end for transition in found] == cuts


@pytest.fixture(scope="module")
def files_480p(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8 s of 30 fps 480p H.264 each: a fast pan, a hard cut, a slow pan, a cut to a static shot with a caption."""
    from PIL import Image, ImageDraw, ImageFont

    folder = tmp_path_factory.mktemp("pass480")
    paths = []
    for index in range(PASS_FILES):
        shots = [
            synthetic.translating_texture(90, *PASS_SIZE, (0, 3), seed=10 * index),
            synthetic.translating_texture(60, *PASS_SIZE, (1, 0), seed=10 * index + 1),
            synthetic.translating_texture(90, *PASS_SIZE, (0, 0), seed=10 * index + 2),
        ]
        caption = Image.fromarray(shots[2][0])
        ImageDraw.Draw(caption).text((40, 200), "SUBSCRIBE NOW", fill="white", font=ImageFont.load_default(size=80))
        shots[2][:] = np.asarray(caption)
        paths.append(synthetic.write_video(folder / f"clip{index}.mp4", np.concatenate(shots), fps=30))
    return paths


def test_local_pass_vs_pyscenedetect(benchmark, alternating_medians, device: torch.device, files_480p: list[Path]) -> None:
    """Target: the whole pass costs <= 2x ContentDetector's. Medians of 3 alternating rounds of each."""
    scenedetect = pytest.importorskip("scenedetect")
    config = CurationConfig(device=str(device))
    no_ocr = CurationConfig(device=str(device), ocr=False)

    def ours(settings: CurationConfig) -> None:
        for path in files_480p:
            item = stage_ocr(stage_analyse(make_item(path, None, settings), settings), settings)
            assert '"error": null' in item["state"]

    def content_detector() -> None:
        for path in files_480p:
            scenedetect.detect(str(path), scenedetect.ContentDetector())

    medians = alternating_medians({"pyscenedetect": content_detector, "svd_fast": lambda: ours(config), "svd_fast_no_ocr": lambda: ours(no_ocr)})
    benchmark.extra_info.update(
        stage="whole local pass (cuts + flow + OCR, CLIP off)",
        files=f"{PASS_FILES} x 8 s 480p30 H.264",
        seconds=medians,
        ratio_vs_content_detector=round(medians["svd_fast"] / medians["pyscenedetect"], 2),
        ratio_without_ocr=round(medians["svd_fast_no_ocr"] / medians["pyscenedetect"], 2),
    )
