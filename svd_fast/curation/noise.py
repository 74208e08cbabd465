"""Noise level of video frames and the confidence-weighted motion score, for :mod:`svd_fast.curation.flow`."""

from __future__ import annotations

import functools
import math

import numpy as np

QUANTISATION_NOISE = 1.0 / (255.0 * math.sqrt(12.0))  # 8-bit rounding, the least noise a decoded frame has
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation of a Gaussian


def noise_sigmas(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """The noise level (standard deviation, [0, 1] grey) of each of two (H, W) float32 frames of one shot.

    Spatially: the robust (median absolute) Laplacian of each frame (Immerkaer's estimator, made robust to
    edges), which is right for grain on smooth content but also calls fine texture noise. Temporally: the
    median absolute difference of the two frames / sqrt(2), unshifted and after the global shift found by
    phase correlation (so a still shot or a pan of fine texture says "little noise"). The smaller of the two
    (texture that repeats in the next frame is not noise), never below 8-bit quantisation noise.
    """

    aligned_first, aligned_second = _aligned(first, second)
    residual = min(float(np.median(np.abs(aligned_first - aligned_second))), float(np.median(np.abs(first - second))))
    temporal = MAD_TO_SIGMA * residual / math.sqrt(2)
    return tuple(max(min(_spatial_noise(frame), temporal), QUANTISATION_NOISE) for frame in (first, second))


def _aligned(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``first`` and ``second`` shifted onto it by the global shift phase correlation finds, both cropped to
    where they overlap."""
    import cv2  # noqa: PLC0415 - OpenCV loads only when this runs

    (dx, dy), _ = cv2.phaseCorrelate(first.astype(np.float64), second.astype(np.float64))
    height, width = first.shape
    shifted = cv2.warpAffine(second, np.float32([[1, 0, dx], [0, 1, dy]]), (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    margin_y, margin_x = min(height // 4, int(abs(dy)) + 2), min(width // 4, int(abs(dx)) + 2)
    inner = (slice(margin_y, height - margin_y), slice(margin_x, width - margin_x))
    return first[inner], shifted[inner]


def match_tone(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Two (H, W) float32 frames with a global brightness change (a flash, a fade, an exposure jump) undone,
    and whether the pair can still be trusted to show motion.

    The frame with fewer clipped pixels is mapped onto the other's histogram (a monotone tone curve, rank by
    rank, so the other's clipping is reproduced: a saturated region is then flat in both frames and brightness
    constancy holds again). The mapping is kept only where it explains the pair better than no mapping (the
    median absolute difference at least halves, as the frames are or after the global shift phase correlation finds): a pan or a
    moving object changes the histogram a little and leaves the tone curve near identity, which then does not pass. A pair is not trusted when the change
    saturates (MAX_NEW_CLIPPED_SHARE more of one frame clipped) and even the tone curve leaves a median
    difference above NOISE_FACTOR x the pair's noise: colour channels clipping one by one change the luma
    non-monotonically, so the structure left in the pair is the flash's, not the scene's.
    """
    clipped = [float(((frame >= CLIPPED_WHITE) | (frame <= CLIPPED_BLACK)).mean()) for frame in (first, second)]
    source, target = (first, second) if clipped[0] <= clipped[1] else (second, first)
    source_sorted, target_sorted = np.sort(source, axis=None), np.sort(target, axis=None)
    values, starts, counts = np.unique(source_sorted, return_index=True, return_counts=True)
    sums = np.concatenate([[0.0], np.cumsum(target_sorted, dtype=np.float64)])
    levels = (sums[starts + counts] - sums[starts]) / counts
    aligned = _aligned(first, second)
    if not any(
        np.median(np.abs(np.interp(one, values, levels) - two)) <= MATCH_GAIN * np.median(np.abs(one - two))
        for one, two in [(source, target), aligned if source is first else aligned[::-1]]
    ):
        return first, second, True
    mapped = np.interp(source, values, levels).astype(np.float32)
    residual = float(np.median(np.abs(mapped - target)))
    trusted = abs(clipped[0] - clipped[1]) <= MAX_NEW_CLIPPED_SHARE or residual <= NOISE_FACTOR * math.hypot(*noise_sigmas(mapped, target))
    return ((mapped, second) if source is first else (first, mapped)) + (trusted,)


def match_tone_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`match_tone` applied to each pair of (N, H, W) float32 frames; (N,) trusted."""
    pairs = [match_tone(one, two) for one, two in zip(first, second)]
    return np.stack([one for one, _, _ in pairs]), np.stack([two for _, two, _ in pairs]), np.array([trusted for _, _, trusted in pairs])


# Clipped grey levels (a flash's white, crushed black), [0, 1].
CLIPPED_WHITE, CLIPPED_BLACK = 254.5 / 255, 0.5 / 255
MATCH_GAIN = 0.5
MAX_NEW_CLIPPED_SHARE = 0.1
NOISE_FACTOR = 3.0  # local contrast or differences within this many noise deviations are noise


def _spatial_noise(image: np.ndarray) -> float:
    import cv2  # noqa: PLC0415 - OpenCV loads only when this runs

    laplacian = cv2.filter2D(image, -1, _NOISE_LAPLACIAN)[1:-1, 1:-1]
    return MAD_TO_SIGMA * float(np.median(np.abs(laplacian))) / 6.0  # the kernel's L2 norm is 6


_NOISE_LAPLACIAN = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


@functools.cache
def pyramid_noise_gains(levels: int) -> tuple[float, ...]:
    """How much each pyramid level (blur 0.75 + 2x2 area halving, per level) scales white noise's deviation."""
    import cv2  # noqa: PLC0415 - OpenCV loads only when this runs

    noise = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    gains = [1.0]
    for _ in range(levels - 1):
        noise = cv2.resize(cv2.GaussianBlur(noise, (0, 0), 0.75), (noise.shape[1] // 2, noise.shape[0] // 2), interpolation=cv2.INTER_AREA)
        gains.append(float(noise.std()))
    return tuple(gains)


def confident_mean(magnitude: np.ndarray, confidence: np.ndarray) -> float:
    """The confidence-weighted mean of a flow magnitude map; 0 where (almost) nothing is measurable: below
    MIN_CONFIDENT_SHARE of the pixels' worth of confidence, the frame holds no evidence of motion."""
    total = float(confidence.sum())
    if total < MIN_CONFIDENT_SHARE * confidence.size:
        return 0.0
    return float((magnitude * confidence).sum()) / total


MIN_CONFIDENT_SHARE = 0.01
