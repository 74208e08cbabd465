"""The motion score measures motion, not texture, grain, compression noise or flashes (issue #33), on generated
footage with known motion: several textures, scales, grain levels and seeds; both flow backends.

Targets: still scenes <= 0.3 px mean flow per pair (flashes <= 0.2 px); a moving object on a still textured
background leaves the background <= 1 px; pans, with and without grain, within 10% of the true speed; the
"opencv" and "torch" backends within 0.1 px on still scenes and 10% on moving ones; such still clips are marked
static by `curate` with the codec prefilter on and off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from svd_fast.curation import CurationConfig, curate
from svd_fast.curation.flow import confident_mean, mean_flow_magnitude, optical_flow_with_confidence, to_gray
from svd_fast.data import synthetic

BACKENDS = ["opencv", "torch"]
SIZE = (144, 256)
SEEDS = [0, 1]


def _scene(kind: str, seed: int) -> np.ndarray:
    if kind.startswith("random"):
        return synthetic.random_texture(*SIZE, scale=int(kind[len("random"):]), seed=seed, colour=seed % 2 == 1)
    if kind == "smooth":
        return (synthetic.smooth_texture(*SIZE, seed=seed) * 255).round().astype(np.uint8)
    return synthetic.smooth_scene(*SIZE, seed=seed)


def _score(frames: np.ndarray, backend: str, mask: np.ndarray | None = None) -> float:
    """The confidence-weighted mean flow of the first pair of (F, H, W, 3) ``frames`` (over ``mask``)."""
    gray = to_gray(frames[:2])
    flow, confidence = optical_flow_with_confidence(gray[:1], gray[1:2], backend)
    magnitude, weights = flow[0].norm(dim=0).numpy(), confidence[0].numpy()
    if mask is not None:
        magnitude, weights = magnitude[mask], weights[mask]
    return confident_mean(magnitude, weights)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["random1", "random2", "random4", "smooth"])
def test_moving_object_leaves_still_texture_still(kind: str, seed: int) -> None:
    frames, covered = synthetic.moving_square(_scene(kind, seed), 2, size=30, step=(0, 36))
    background = ~covered.any(axis=0)
    scores = {backend: _score(frames, backend, background) for backend in BACKENDS}
    assert max(scores.values()) <= 1.0, scores


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sigma", [2, 4, 8])
@pytest.mark.parametrize("kind", ["random1", "random4", "smooth", "very smooth"])
def test_grain_on_a_still_scene_is_not_motion(request: pytest.FixtureRequest, kind: str, sigma: int, seed: int) -> None:
    if kind == "very smooth" and sigma == 2:
        request.applymarker(pytest.mark.xfail(strict=True, reason="open: light grain on a very smooth scene scores ~0.6 px (coarse levels' noise error)"))
    frames = synthetic.add_grain(synthetic.still_shot(_scene(kind, seed), 2), sigma / 255, seed=seed)
    scores = {backend: _score(frames, backend) for backend in BACKENDS}
    assert max(scores.values()) <= 0.3, scores
    assert abs(scores["opencv"] - scores["torch"]) <= 0.1, scores


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sigma", [0, 4, 8])
@pytest.mark.parametrize(("kind", "step"), [("random1", 3), ("random2", 2), ("smooth", 2), ("smooth", 4), ("very smooth", 4)])
def test_pan_speed_with_and_without_grain(request: pytest.FixtureRequest, kind: str, step: int, sigma: int, seed: int) -> None:
    if kind == "very smooth" and sigma >= 4:
        request.applymarker(pytest.mark.xfail(strict=True, reason="open: under grain a very smooth scene's pan is underestimated (its frame difference is near the noise)"))
    frames = synthetic.add_grain(synthetic.panning(_scene(kind, seed), 2, step), sigma / 255, seed=seed)
    inner = np.zeros(SIZE, bool)
    inner[8:-8, 8:-8] = True  # content entering the frame has no correspondence
    scores = {backend: _score(frames, backend, inner) for backend in BACKENDS}
    for backend, score in scores.items():
        assert score == pytest.approx(step, rel=0.10), (backend, scores)
    assert scores["opencv"] == pytest.approx(scores["torch"], rel=0.10)


@pytest.mark.parametrize("kind", ["random2", "smooth"])
def test_compressed_still_scene_is_not_motion(tmp_path: Path, kind: str) -> None:
    """x264 at CRF 38 of a still grainy shot: blocking and ringing that change frame to frame."""
    frames = synthetic.add_grain(synthetic.still_shot(_scene(kind, 3), 12), 4 / 255, seed=3)
    path = synthetic.write_video(tmp_path / "still.mp4", frames, fps=24, crf=38)
    from svd_fast.data import decode_all_frames_with_motion

    decoded, _ = decode_all_frames_with_motion(path, max_side=256)
    for backend in BACKENDS:
        assert mean_flow_magnitude(decoded, backend) <= 0.3, backend


@pytest.mark.parametrize("prefilter", [True, False])
def test_curate_marks_grainy_and_compressed_stills_static(tmp_path: Path, prefilter: bool) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    for index, kind in enumerate(["random1", "very smooth", "smooth"]):
        still = synthetic.add_grain(synthetic.still_shot(_scene(kind, index), 48), 8 / 255, seed=index)
        synthetic.write_video(videos / f"still_{index}.mp4", still, fps=24, crf=35)
    pan = synthetic.add_grain(synthetic.panning(_scene("smooth", 9), 48, 1), 8 / 255, seed=9)
    synthetic.write_video(videos / "pan.mp4", pan, fps=24, crf=35)
    curate(videos, tmp_path / "m.parquet", CurationConfig(ocr=False, codec_static_prefilter=prefilter))
    table = pd.read_parquet(tmp_path / "m.parquet")
    by_name = table.set_index(table["source"].map(lambda source: Path(source).stem))
    for index in range(3):
        assert by_name.loc[f"still_{index}", "static"], by_name.loc[f"still_{index}", ["flow_mean_px", "static_reason"]].to_dict()
    assert not by_name.loc["pan", "static"] and by_name.loc["pan", "flow_mean_px"] == pytest.approx(12 * 256 / 256, rel=0.10)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gain", [2.0, 4.0])
@pytest.mark.parametrize("kind", ["random2", "smooth", "very smooth"])
def test_flash_on_a_still_scene_is_not_motion(kind: str, gain: float, seed: int) -> None:
    """A flash brightening one frame `gain` times, to saturation over much of it: <= 0.2 px into and out of it."""
    frames = synthetic.flash(synthetic.add_grain(synthetic.still_shot(_scene(kind, seed), 3), 2 / 255, seed=seed), 1, gain)
    for backend in BACKENDS:
        assert _score(frames, backend) <= 0.2 and _score(frames[1:], backend) <= 0.2, backend


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gain", [0.6, 1.3])
@pytest.mark.parametrize(("kind", "step"), [("random1", 3), ("smooth", 2)])
def test_pan_through_a_brightness_change_keeps_its_speed(kind: str, step: int, gain: float, seed: int) -> None:
    """A global brightness change that does not saturate (a fade, an exposure step) is undone, not excluded:
    the pan under it is still measured within 10%."""
    frames = synthetic.add_grain(synthetic.panning(_scene(kind, seed), 2, step), 2 / 255, seed=seed)
    frames[1] = np.clip(frames[1].astype(np.float64) * gain, 0, 254).round().astype(np.uint8)
    inner = np.zeros(SIZE, bool)
    inner[8:-8, 8:-8] = True
    for backend in BACKENDS:
        assert _score(frames, backend, inner) == pytest.approx(step, rel=0.10), backend
