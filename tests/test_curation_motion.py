"""Curation on footage with known ground truth: optical-flow accuracy against OpenCV's Farneback, photometric
robustness, time from timestamps (variable frame rate), transitions (hard cuts, fades, dissolves, motion that
is not a cut) and the codec motion-vector prefilter's calibration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from svd_fast.curation import CurationConfig, curate, detect_transitions, optical_flow, texture_level
from svd_fast.curation.flow import _warp
from svd_fast.data import decode_all_frames_with_motion, synthetic

NO_OCR = CurationConfig(ocr=False)
FLOW_BACKENDS_ON_CPU = ["auto", "torch"]  # "auto" is OpenCV on a CPU tensor


# ---------------------------------------------------------------- flow accuracy on ground-truth pairs


def _smooth_flow(height: int, width: int, seed: int, amplitude: float) -> torch.Tensor:
    """A smooth (2, H, W) field: translation, rotation/zoom-like gradients and bicubic noise, up to ~amplitude px."""
    coarse = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, 2, 4, 6)).astype(np.float32))
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0] * amplitude * 0.5
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return field + torch.stack([amplitude * 0.5 + 0.3 * amplitude * ys, -0.3 * amplitude + 0.3 * amplitude * xs])


def _warped_pair(image: torch.Tensor, field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """second(y) = first(y - field(y)); the ground truth u(x) solves u = field(x + u) (fixed point)."""
    second = _warp(image[None, None], -field[None])[0, 0]
    truth = field.clone()
    for _ in range(30):
        truth = _warp(field[None], truth[None])[0]
    return image, second, truth


def _farneback_reference(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    import cv2

    to_uint8 = lambda image: (image.numpy() * 255).round().astype(np.uint8)  # noqa: E731
    flow = cv2.calcOpticalFlowFarneback(to_uint8(first), to_uint8(second), None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return torch.from_numpy(flow).permute(2, 0, 1)


def _endpoint_error(flow: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None) -> float:
    error = (flow - truth).norm(dim=0)
    mask = torch.zeros_like(error, dtype=torch.bool)
    mask[8:-8, 8:-8] = True  # content entering the frame has no correspondence
    if valid is not None:
        mask &= valid
    return float(error[mask].mean())


def _resize(pair: tuple, side: int = 256) -> tuple:
    first, second, truth, valid = pair
    height, width = first.shape
    scale = side / max(height, width)
    size = (int(round(height * scale / 2)) * 2, int(round(width * scale / 2)) * 2)
    shrink = lambda image: F.interpolate(image[None, None], size=size, mode="area")[0, 0]  # noqa: E731
    truth = F.interpolate(truth[None], size=size, mode="bilinear", align_corners=False)[0] * torch.tensor([size[1] / width, size[0] / height]).view(2, 1, 1)
    valid = None if valid is None else F.interpolate(valid[None, None].float(), size=size, mode="nearest")[0, 0].bool()
    return shrink(first), shrink(second), truth, valid


def _ground_truth_pairs() -> dict[str, tuple]:
    texture = torch.from_numpy(synthetic.smooth_texture(240, 320, seed=3).mean(-1).astype(np.float32))
    pairs = {f"texture-{amplitude:g}px": (*_warped_pair(texture, _smooth_flow(240, 320, seed, amplitude)), None) for seed, amplitude in [(0, 4.0), (1, 10.0)]}
    try:
        from skimage import data  # scikit-image ships the Middlebury 2014 "motorcycle" stereo pair with disparities
    except ImportError:
        return pairs
    left, right, disparity = data.stereo_motorcycle()
    gray = lambda image: torch.from_numpy(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255)  # noqa: E731
    disparity = torch.from_numpy(disparity)
    valid = torch.isfinite(disparity) & (disparity > 0)
    truth = torch.stack([-torch.nan_to_num(disparity, posinf=0.0), torch.zeros_like(disparity)])  # right view: x - d
    pairs["middlebury-motorcycle"] = (gray(left), gray(right), truth, valid)
    photo = gray(data.astronaut())
    pairs["photo-10px"] = (*_warped_pair(photo, _smooth_flow(*photo.shape, 1, 10.0)), None)
    return pairs


GROUND_TRUTH = _ground_truth_pairs()


@pytest.mark.parametrize("size", ["full", "analysis"])
@pytest.mark.parametrize("name", sorted(GROUND_TRUTH))
def test_endpoint_error_no_worse_than_farneback(name: str, size: str) -> None:
    pair = GROUND_TRUTH[name] if size == "full" else _resize(GROUND_TRUTH[name])
    first, second, truth, valid = pair
    reference = _endpoint_error(_farneback_reference(first, second), truth, valid)
    for backend in FLOW_BACKENDS_ON_CPU:
        measured = _endpoint_error(optical_flow(first[None], second[None], backend)[0], truth, valid)
        assert measured <= reference, f"{name} at {size} size: {backend} EPE {measured:.3f} > Farneback {reference:.3f}"


@pytest.mark.parametrize("backend", FLOW_BACKENDS_ON_CPU)
@pytest.mark.parametrize("change", ["gain 0.6 + 0.1", "gain 0.3", "gain 0.1", "offset 0.15"])
def test_brightness_change_is_not_motion(backend: str, change: str) -> None:
    image = torch.from_numpy(synthetic.smooth_texture(96, 160, seed=5).mean(-1).astype(np.float32))
    changed = {"gain 0.6 + 0.1": image * 0.6 + 0.1, "gain 0.3": image * 0.3, "gain 0.1": image * 0.1, "offset 0.15": (image + 0.15).clamp(0, 1)}[change]
    flow = optical_flow(image[None], changed[None], backend)
    assert float(flow.norm(dim=1).mean()) < 0.02


def test_texture_level_separates_black_and_uniform_from_content() -> None:
    image = torch.from_numpy(synthetic.smooth_texture(96, 160, seed=5).mean(-1).astype(np.float32))
    levels = texture_level(torch.stack([image, image * 0.3, torch.zeros_like(image), torch.full_like(image, 0.5)])).tolist()
    default = CurationConfig().min_texture
    assert levels[0] > levels[1] > default and levels[2] == levels[3] == 0.0


# ---------------------------------------------------------------- time from timestamps


def test_variable_frame_rate_times_and_motion(tmp_path: Path) -> None:
    """2 s at 30 fps then 4 s at 5 fps: one file panning at 30 px/s throughout, one with a hard cut at 2.000 s."""
    times = np.concatenate([np.arange(60) / 30, 2 + np.arange(20) / 5])
    texture = synthetic.translating_texture(60 + 120, 144, 256, (0, 1), seed=1)  # 1 px per 1/30 s
    pan = np.concatenate([texture[:60], texture[60::6]])  # after 2 s, every 6th: 6 px per 1/5 s
    cut = np.concatenate([synthetic.translating_texture(60, 96, 160, (0, 1), seed=2), synthetic.translating_texture(20, 96, 160, (0, 1), seed=3)])
    synthetic.write_video_with_times(tmp_path / "pan.mp4", pan, times)
    synthetic.write_video_with_times(tmp_path / "cut.mp4", cut, times)
    curate(tmp_path, tmp_path / "m.parquet", NO_OCR)
    table = pd.read_parquet(tmp_path / "m.parquet").sort_values(["source", "clip_index"])
    cut_rows, pan_row = table[table["source"].str.endswith("cut.mp4")], table[table["source"].str.endswith("pan.mp4")].iloc[0]
    assert cut_rows["start_frame"].tolist() == [0, 60] and cut_rows["end_frame"].tolist() == [60, 80]
    assert cut_rows["start_time"].tolist() == pytest.approx([0.0, 2.0], abs=1e-3)
    assert cut_rows["end_time"].tolist() == pytest.approx([2.0, 6.0], abs=1e-3)
    # The same speed before and after the rate change: per 0.5 s (15 px) and in every second (30 px/s).
    assert pan_row["flow_mean_px"] == pytest.approx(15.0, rel=0.10)
    assert list(pan_row["flow_px_per_second_each"]) == pytest.approx([30.0] * 6, rel=0.10)


def test_same_pan_at_two_frame_rates_scores_the_same(tmp_path: Path) -> None:
    speed = 24.0  # px/s: 1 px/frame at 24 fps, 2 px/frame at 12 fps
    for fps in (24, 12):
        frames = synthetic.translating_texture(int(3 * fps), 96, 160, (0, speed / fps), seed=4)
        synthetic.write_video(tmp_path / f"pan{fps}.mp4", frames, fps=fps)
    curate(tmp_path, tmp_path / "m.parquet", NO_OCR)
    table = pd.read_parquet(tmp_path / "m.parquet")
    scores = table.set_index(table["source"].map(lambda source: Path(source).stem))["flow_mean_px"]
    assert scores["pan24"] == pytest.approx(speed / 2, rel=0.10) and scores["pan12"] == pytest.approx(scores["pan24"], rel=0.10)


# ---------------------------------------------------------------- transitions


def _texture_shot(frames: int, seed: int, shift: tuple[float, float] = (0, 1)) -> np.ndarray:
    return synthetic.translating_texture(frames, 64, 96, shift, seed=seed)


def test_hard_cut_f1_on_generated_footage(tmp_path: Path) -> None:
    """Shots of random lengths and speeds (static to fast pans, an object crossing), some joined by dissolves."""
    rng = np.random.default_rng(7)
    true_cuts, found_cuts, frames_total = [], [], 0
    for video in range(3):
        shots, cuts, start = [], [], 0
        for shot in range(6):
            length = int(rng.integers(20, 50))
            speed = float(rng.choice([0, 0.5, 1, 2, 4]))
            content = synthetic.crossing_object(length, 64, 96, seed=100 * video + shot) if shot == 2 else _texture_shot(length, 100 * video + shot, (0, speed))
            if shot and shot % 3 == 0:
                dissolve = synthetic.blend(shots[-1], content, 12)  # a gradual transition, not a hard cut
                shots.append(dissolve)
                start += len(dissolve)
            elif shot:
                cuts.append(start)
            shots.append(content)
            start += length
        path = synthetic.write_video(tmp_path / f"shots{video}.mp4", np.concatenate(shots), fps=24)
        frames, _ = decode_all_frames_with_motion(path, max_side=96)
        transitions = detect_transitions(frames, fps=24)
        hard = [transition.end for transition in transitions if transition.end - transition.start <= 1]
        true_cuts += [frames_total + cut for cut in cuts]
        found_cuts += [frames_total + cut for cut in hard]
        frames_total += start
    matched = {cut for cut in true_cuts if any(abs(cut - found) <= 2 for found in found_cuts)}
    true_positives = sum(any(abs(cut - found) <= 2 for cut in true_cuts) for found in found_cuts)
    precision, recall = true_positives / max(len(found_cuts), 1), len(matched) / len(true_cuts)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    assert f1 >= 0.95, f"precision {precision:.2f} recall {recall:.2f} (true {true_cuts}, found {found_cuts})"


def test_dissolve_and_fades_are_transitions_and_motion_is_not() -> None:
    first, second = _texture_shot(60, 1), _texture_shot(60, 2)
    dissolve = detect_transitions(np.concatenate([first, synthetic.blend(first, second, 30), second]), fps=30)
    assert len(dissolve) == 1 and 58 <= dissolve[0].start <= 64 and 88 <= dissolve[0].end <= 92
    assert detect_transitions(_texture_shot(150, 3, (0, 6)), fps=30) == []  # a fast pan
    pan_start = np.concatenate([_texture_shot(45, 4, (0, 0)), _texture_shot(90, 4, (0, 8))])
    assert detect_transitions(pan_start, fps=30) == []
    crossing = np.concatenate([_texture_shot(30, 5, (0, 0)), synthetic.crossing_object(30, 64, 96, seed=5), _texture_shot(30, 5, (0, 0))])
    assert detect_transitions(crossing, fps=30) == []


def test_black_and_fading_segments_are_never_moving(tmp_path: Path) -> None:
    first, second = _texture_shot(48, 1, (0, 2)), _texture_shot(48, 2, (0, 2))
    black = np.zeros((24, 64, 96, 3), np.uint8)
    parts = [first, synthetic.fade(first[-1], 12, to_black=True), black, synthetic.fade(second[0], 12, to_black=False), second]
    frames = np.concatenate(parts)
    bounds = np.cumsum([0, *map(len, parts)])
    dark = np.zeros(len(frames), bool)
    dark[bounds[1] : bounds[4]] = True  # fades and black
    synthetic.write_video(tmp_path / "fades.mp4", frames, fps=24)
    synthetic.write_video(tmp_path / "black.mp4", np.concatenate([black, black]), fps=24)
    curate(tmp_path, tmp_path / "m.parquet", CurationConfig(ocr=False, codec_static_prefilter=False))
    table = pd.read_parquet(tmp_path / "m.parquet")
    for row in table.itertuples():
        if Path(row.source).name == "black.mp4":
            assert row.static and "texture" in row.static_reason and not row.keep
            continue
        share_dark = dark[row.start_frame : row.end_frame].mean()
        assert share_dark <= 0.25 or (row.static and not row.keep), (row.start_frame, row.end_frame, row.flow_mean_px)
    assert table["keep"].sum() == 2  # the two moving shots


# ---------------------------------------------------------------- codec motion-vector prefilter calibration


def test_codec_prefilter_threshold_separates_static_from_slow_motion(tmp_path: Path) -> None:
    threshold = CurationConfig().codec_static_threshold_px
    rng = np.random.default_rng(0)
    static = synthetic.translating_texture(24, 96, 160, (0, 0), seed=9)
    noisy = np.clip(static + rng.normal(0, 5, static.shape), 0, 255).astype(np.uint8)  # sensor-like noise, sigma 5 levels
    clips = {"static": static, "noisy": noisy, "slow": synthetic.translating_texture(24, 96, 160, (0, 0.25), seed=9)}
    means = {}
    for name, frames in clips.items():
        _, motion = decode_all_frames_with_motion(synthetic.write_video(tmp_path / f"{name}.mp4", frames, fps=24), max_side=96)
        means[name] = float(np.nanmean(motion)) if np.isfinite(motion).any() else 0.0
    assert means["static"] < threshold and means["noisy"] < threshold < means["slow"], means
    assert math.isfinite(threshold)
