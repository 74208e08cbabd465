"""Content-based cut detection in PyTorch (runs on GPU or CPU), at several frame rates merged.

The score between two frames is PySceneDetect's ContentDetector score: the mean absolute difference of
the HSV channels (0..255 scale), averaged over the three channels. A cut is declared where the score
between consecutive *sampled* frames reaches ``threshold``. The SVD paper runs the detector at three frame
rates because one rate misses gradual transitions (full rate: each step is small) or fires on fast motion
(low rate); here each rate's detections are localised back to the full-rate frame with the largest
full-rate score inside the sampled interval, and the union is de-duplicated within ``min_scene_frames``.
Against false cuts from fast motion (whose score grows with the sampling stride), a detection must also
stand out from its neighbourhood: score >= ``contrast`` x the median of the ``neighbours`` scores on each
side at the same rate (the idea of PySceneDetect's AdaptiveDetector). A hard cut passes at full rate; a
gradual transition, invisible step by step, stands out at the coarser rates.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_STRIDES = (1, 2, 4)


def rgb_to_hsv255(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) uint8 RGB -> (F, 3, H, W) float32 HSV, each channel scaled to 0..255 like OpenCV's."""
    rgb = frames.permute(0, 3, 1, 2).float() / 255.0
    red, green, blue = rgb.unbind(1)
    value, _ = rgb.max(1)
    minimum, _ = rgb.min(1)
    chroma = value - minimum
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    safe_chroma = chroma.clamp_min(1e-12)
    hue = torch.where(
        value == red,
        (green - blue) / safe_chroma % 6,
        torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4),
    )
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], 1) * 255.0


def content_scores(frames: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Scores between frames ``i`` and ``i + stride`` for the frames sampled every ``stride`` (length F//stride-ish)."""
    hsv = rgb_to_hsv255(frames[::stride])
    if hsv.shape[0] < 2:
        return hsv.new_zeros(0)
    return (hsv[1:] - hsv[:-1]).abs().mean(dim=(1, 2, 3))


def detect_cuts(
    frames: np.ndarray | torch.Tensor,
    threshold: float = 27.0,
    min_scene_frames: int = 8,
    strides: tuple[int, ...] = DEFAULT_STRIDES,
    contrast: float = 2.0,
    neighbours: int = 2,
    device: torch.device | str | None = None,
) -> list[int]:
    """Frame indices where a new scene starts (never 0), from frames (F, H, W, 3) uint8 RGB.

    Small frames suffice (the score is a mean over pixels); the pipeline decodes at 96-pixel longer side.
    """
    if threshold <= 0:
        raise ValueError(f"detect_cuts: threshold must be > 0, got {threshold}")
    if min_scene_frames < 1:
        raise ValueError(f"detect_cuts: min_scene_frames must be >= 1, got {min_scene_frames}")
    if contrast < 1 or neighbours < 0:
        raise ValueError(f"detect_cuts: contrast must be >= 1 and neighbours >= 0, got {contrast}, {neighbours}")
    if not strides or any(int(stride) < 1 for stride in strides):
        raise ValueError(f"detect_cuts: strides must be positive integers, got {strides}")
    video = torch.as_tensor(frames)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"detect_cuts: frames must be uint8 (F, H, W, 3), got {video.dtype} {tuple(video.shape)}")
    if device is not None:
        video = video.to(device)
    full_rate = content_scores(video, 1)  # full_rate[i] scores frames (i, i + 1)
    candidates: set[int] = set()
    for stride in strides:
        scores = full_rate if stride == 1 else content_scores(video, int(stride))
        for sampled in torch.nonzero(scores >= threshold).flatten().tolist():
            around = torch.cat([scores[max(0, sampled - neighbours) : sampled], scores[sampled + 1 : sampled + 1 + neighbours]])
            if around.numel() and scores[sampled] < contrast * around.median():
                continue
            low = sampled * stride  # the cut lies between frame `low` and frame `low + stride`
            window = full_rate[low : low + stride]
            candidates.add(low + 1 + int(torch.argmax(window)))
    cuts: list[int] = []
    for cut in sorted(candidates):
        # Detections from different rates of one transition land on nearby frames: keep the first.
        if cut >= min_scene_frames and (not cuts or cut - cuts[-1] >= min_scene_frames):
            cuts.append(cut)
    return cuts


def scenes_from_cuts(cuts: list[int], num_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the scenes delimited by ``cuts``."""
    bounds = [0, *[cut for cut in cuts if 0 < cut < num_frames], num_frames]
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]
