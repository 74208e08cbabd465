"""The curation pass's CPU paths (OpenCV/NumPy where torch's CPU ops cost more than the work) agree with the
torch paths used on CUDA, and OCR reads the key frames' text crops taken in the one decoding pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from curation_fixtures import edited_footage
from PIL import Image, ImageDraw, ImageFont

from svd_fast.curation import CurationConfig, cuts, flow, ocr, optical_flow
from svd_fast.curation import pipeline as pipeline_module
from svd_fast.curation.pipeline import make_item, stage_analyse, stage_ocr
from svd_fast.data import synthetic

requires_tesseract = pytest.mark.skipif(ocr.tesseract_unavailable_reason() is not None, reason=f"OCR unavailable: {ocr.tesseract_unavailable_reason()}")


def test_opencv_content_scores_match_torch_hsv() -> None:
    """uint8 HSV (OpenCV) vs float HSV (torch): the rounding moves a content score by well under 1 (of 0..255)."""
    video = torch.from_numpy(edited_footage(30, 30, 40))
    pairs = np.arange(len(video) - 1), np.arange(1, len(video))
    opencv_scores, opencv_full = cuts._scorer(video, "opencv")
    torch_scores, torch_full = cuts._scorer(video, "torch")
    np.testing.assert_allclose(opencv_full, torch_full, atol=0.5)
    np.testing.assert_allclose(opencv_full, opencv_scores(*pairs), rtol=1e-12)  # slices and gathers agree
    np.testing.assert_allclose(torch_full, torch_scores(*pairs), rtol=1e-6)
    strided = np.arange(0, len(video) - 8, 4), np.arange(8, len(video), 4)
    np.testing.assert_allclose(opencv_scores(*strided), torch_scores(*strided), atol=0.5)
    assert opencv_full.max() > 27.0  # the hard cut is in the footage, so the comparison covers large scores


def test_texture_level_opencv_matches_torch() -> None:
    image = torch.from_numpy(synthetic.smooth_texture(96, 160, seed=5).mean(-1).astype(np.float32))
    images = torch.stack([image, image * 0.3, torch.zeros_like(image), torch.full_like(image, 0.5), torch.rand(96, 160)])
    torch.testing.assert_close(flow._texture_level_opencv(images), flow._texture_level_torch(images), rtol=1e-5, atol=1e-7)


def test_pair_flow_magnitudes_opencv_path_matches_flow_norm() -> None:
    gray = flow.to_gray(synthetic.translating_texture(5, 72, 128, (1.0, 2.5), seed=4))
    magnitudes = flow.pair_flow_magnitudes(gray[:-1], gray[1:], "opencv")
    field = optical_flow(gray[:-1], gray[1:], "opencv").norm(dim=1)[:, 3:69, 6:122]  # 5% border, as pair_flow_magnitudes
    torch.testing.assert_close(magnitudes, field.mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="first and second"):
        flow.pair_flow_magnitudes(gray[:2], gray[:3], "opencv")


def test_opencv_flow_reuses_shared_frames_exactly() -> None:
    """Consecutive pairs share a frame's pyramid; the flow equals each pair computed alone."""
    gray = flow.to_gray(synthetic.translating_texture(4, 64, 96, (2.0, -1.0), seed=6))
    together = optical_flow(gray[:-1], gray[1:], "opencv")
    alone = torch.cat([optical_flow(gray[index : index + 1], gray[index + 1 : index + 2], "opencv") for index in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


@requires_tesseract
def test_text_crop_json_round_trip_and_coverage() -> None:
    frame = np.full((240, 427, 3), 230, np.uint8)
    image = Image.fromarray(frame)
    ImageDraw.Draw(image).text((20, 80), "HELLO WORLD", fill=(10, 20, 200), font=ImageFont.load_default(size=40))
    frame = np.asarray(image)
    crops = ocr.text_candidate_crops(frame)
    assert crops
    restored = [ocr.TextCrop.from_json(json.loads(json.dumps(crop.to_json()))) for crop in crops]
    for crop, back in zip(crops, restored):
        assert (back.x0, back.y0, back.scale) == (crop.x0, crop.y0, crop.scale)
        np.testing.assert_array_equal(back.image, crop.image)
    assert ocr.crop_coverages([restored, []], frame.shape) == [ocr.text_coverage(frame), 0.0]
    assert ocr.text_coverage(frame) > 0.02


def _page(text: str, ink: tuple[int, int, int], paper: tuple[int, int, int]) -> np.ndarray:
    page = Image.new("RGB", (320, 192), paper)
    draw = ImageDraw.Draw(page)
    draw.text((10, 20), text, fill=ink, font=ImageFont.load_default(size=40))
    draw.text((10, 100), "BIG TEXT", fill=ink, font=ImageFont.load_default(size=40))
    return np.asarray(page)


@requires_tesseract
def test_ocr_reads_crops_from_the_pass_and_seeks_only_for_short_clips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A textured shot without text (80 frames at 30 fps), a page of text for 9 frames (0.3 s: no 2-FPS sample falls
    inside it), and another page for 90 frames."""
    frames = np.concatenate(
        [
            synthetic.translating_texture(80, 192, 320, (0, 0), seed=8),
            np.repeat(_page("HELLO WORLD", (0, 0, 0), (235, 235, 235))[None], 9, 0),
            np.repeat(_page("GOOD NIGHT", (255, 255, 255), (20, 20, 20))[None], 90, 0),
        ]
    )
    path = synthetic.write_video(tmp_path / "shots.mp4", frames, fps=30)
    config = CurationConfig()
    seeked: list[list[float]] = []
    decode = pipeline_module.decode_frames_at_times

    def counted(video: str, times: list[float], **options: object) -> np.ndarray:
        seeked.append(list(times))
        return decode(video, times, **options)

    monkeypatch.setattr(pipeline_module, "decode_frames_at_times", counted)
    analysed = stage_analyse(make_item(path, None, config), config)
    state = json.loads(analysed["state"])
    assert state["error"] is None
    clips = state["clips"]
    assert [(clip["start_frame"], clip["end_frame"]) for clip in clips] == [(0, 80), (80, 89), (89, 179)]
    key_frames = [[round(moment * 30) for moment in clip["key_times"]] for clip in clips]
    assert key_frames == [[0, 39, 79], [80, 84, 88], [89, 133, 178]]  # first, middle, last frame (for CLIP)
    # OCR reads the first, middle and last 2-FPS samples inside a clip (frames 0, 15, ..., 75 and 90, 105, ..., 165),
    # whose crops the pass took; the 0.3 s clip holds none, so its key frames are decoded by seeking.
    crops = state["key_text_crops"]
    assert [None if frames is None else len(frames) for frames in crops] == [3, None, 3]
    assert crops[0] == [[], [], []] and all(frame_crops for frame_crops in crops[2])
    finished = json.loads(stage_ocr(analysed, config)["state"])
    assert "key_text_crops" not in finished and "text_frame_shape" not in finished
    assert seeked == [clips[1]["key_times"]]  # only the short clip's key frames were decoded again
    coverages = [clip["ocr_coverage"] for clip in finished["clips"]]
    assert coverages[0] == 0.0 and coverages[1] > 0.05 and coverages[2] > 0.05
