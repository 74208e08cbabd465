"""Dense optical flow for the motion filter, and the motion statistics the manifest records.

:func:`optical_flow` takes (N, H, W) float32 grayscale frames in [0, 1] on any device and returns (N, 2, H, W)
(x, y) displacements in input pixels, on the same device. Backends:

* ``"opencv"``: OpenCV's Farneback solver (its defaults winsize 15, iterations 3, poly_n 5, poly_sigma 1.2)
  run level by level over a halving pyramid with as many levels as keep the coarsest side >= 16 px (OpenCV's
  default is 3; more catch large motions), one pair at a time on the CPU. ``"auto"`` picks it for CPU tensors.
* ``"torch"``: Farneback's polynomial-expansion method in PyTorch, batched, on any device (``"auto"`` on
  CUDA): coarse-to-fine over the same levels, each update bounded to ``MAX_UPDATE_PX`` per iteration and damped where there is no texture
  (a Tikhonov term relative to the frame's mean structure), so flat or dark regions get ~0 flow, never a
  divergent one.
* ``"dali"``: NVIDIA's optical-flow engine through DALI (4x4 grid, upsampled). Untested: the project's
  machines have no GPU with the engine; :func:`dali_unavailable_reason` says why it cannot run.

Photometric robustness: every backend first undoes a global brightness change between the two frames
(:func:`~svd_fast.curation.noise.match_tone`: one frame's histogram mapped onto the other's, which reproduces a
flash's saturation in both); the torch and opencv backends then see each pyramid level normalised to local zero
mean and unit contrast (Gaussian window of ``NORMALISE_SIGMA`` px of that level), so a fade, a flash or a
local brightness change is not motion. Frames with too little texture to measure anything (black, uniform;
see :func:`texture_level`) are reported by the pipeline as static.

Noise and texture (issue #33; both backends, same steps): each frame's noise level is estimated
(:func:`noise_sigmas`: robust Laplacian, capped by the frame-to-frame difference after the global shift) and
floors the contrast normalisation (grain is not amplified into structure); a level's Farneback update is kept
in proportion to its confidence (contrast above the noise floor, no clipped pixels), starting per pixel from
the coarser level's flow or zero, whichever matches better (a coarse level cannot drag still fine texture along
with a moving object); where the two frames differ by no more than their noise the flow is 0.
:func:`pair_flow_magnitudes` (the motion score) is the confidence-weighted mean (:func:`confident_mean`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from svd_fast.curation.flow_dali import dali_flow, dali_unavailable_reason
from svd_fast.curation.noise import (
    CLIPPED_BLACK,
    CLIPPED_WHITE,
    NOISE_FACTOR,
    confident_mean,
    match_tone,
    match_tone_pairs,
    noise_sigmas,
    pyramid_noise_gains,
)

FLOW_BACKENDS = ("auto", "opencv", "torch", "dali")
# OpenCV's defaults for Farneback's solver at one pyramid level (both backends; the pyramid is built here).
FARNEBACK_SOLVER = {"winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2}
DAMPING = 1e-3  # Tikhonov weight, relative to the mean structure tensor trace
MAX_UPDATE_PX = 2.0  # per iteration, in the pixels of the pyramid level
NORMALISE_SIGMA = 6.0
# Contrast below this fraction of the frame's mean local contrast (or below ABSOLUTE_CONTRAST_FLOOR grey levels
# in [0, 1]) is treated as noise, not structure. Relative to the frame, so a fade's gain cancels exactly.
RELATIVE_CONTRAST_FLOOR = 0.2
ABSOLUTE_CONTRAST_FLOOR = 1e-3
NORMALISED_SCALE = 64.0  # normalised images are scaled to the spread of 8-bit images Farneback was tuned for
# Local contrast within NOISE_FACTOR x the frame's noise level is noise: floored there, and no confidence.
# Clipped pixels (a flash's white, crushed black) hold no structure: no confidence where more than
# MAX_CLIPPED_SHARE of the normalisation window is clipped.
MAX_CLIPPED_SHARE = 0.1
# Where the two frames' mean squared difference over a STILL_WINDOW square is within STILL_TOLERANCE x the
# variance that the difference of two noisy frames has (the mean of 31 x 31 squares of pure noise stays within
# 1.15x at 3 sigma), nothing measurably moved: flow 0 there.
STILL_WINDOW = 31
STILL_TOLERANCE = 1.15


def optical_flow(first: torch.Tensor, second: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dense flow from ``first`` to ``second`` (N, H, W) float32 in [0, 1]: (N, 2, H, W), channel 0 = dx."""
    backend = _resolve_backend(first, second, backend)
    if backend == "opencv":
        return _opencv_flow(first, second)
    if backend == "dali":
        reason = dali_unavailable_reason()
        if reason:
            raise RuntimeError(f"optical_flow: backend='dali' cannot run: {reason}; use 'torch' or 'opencv'")
        *matched, _ = match_tone_pairs(first.detach().float().cpu().numpy(), second.detach().float().cpu().numpy())
        return dali_flow(*(torch.from_numpy(frames).to(first.device) for frames in matched))
    return torch_farneback_flow(first.float(), second.float())


def _resolve_backend(first: torch.Tensor, second: torch.Tensor, backend: str) -> str:
    """Check :func:`optical_flow`'s arguments; the backend that runs ("auto" resolved)."""
    if first.shape != second.shape or first.ndim != 3:
        raise ValueError(f"optical_flow: first and second must both be (N, H, W), got {tuple(first.shape)} and {tuple(second.shape)}")
    if min(first.shape[-2:]) < 8:
        raise ValueError(f"optical_flow: frames must be at least 8x8, got {tuple(first.shape[-2:])}")
    if backend not in FLOW_BACKENDS:
        raise ValueError(f"optical_flow: backend must be one of {FLOW_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch" if first.device.type == "cuda" else "opencv"
    return backend


def normalise_contrast(images: torch.Tensor, sigma: float = NORMALISE_SIGMA, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, H, W) -> local zero mean, unit local contrast x NORMALISED_SCALE, floored at RELATIVE_CONTRAST_FLOOR
    of the frame's mean contrast and at NOISE_FACTOR x its ``noise`` (N,) level; and the (N, 1, H, W) confidence:
    0 where the local contrast is within that noise floor, 1 from twice it (all 1 without ``noise``)."""
    centred = images - _gaussian_blur(images, sigma)
    spread = _gaussian_blur(centred * centred, sigma).clamp_min(0).sqrt()
    floor = (RELATIVE_CONTRAST_FLOOR * spread.mean(dim=(1, 2, 3), keepdim=True)).clamp_min(ABSOLUTE_CONTRAST_FLOOR)
    if noise is None:
        return centred / torch.maximum(spread, floor) * NORMALISED_SCALE, torch.ones_like(spread)
    noise_floor = NOISE_FACTOR * noise.view(-1, 1, 1, 1)
    confidence = (spread / noise_floor - 1.0).clamp(0.0, 1.0)
    clipped_share = _gaussian_blur(((images >= CLIPPED_WHITE) | (images <= CLIPPED_BLACK)).float(), sigma)
    confidence = confidence * (1.0 - clipped_share / MAX_CLIPPED_SHARE).clamp(0.0, 1.0)
    return centred / torch.maximum(spread, torch.maximum(floor, noise_floor)) * NORMALISED_SCALE, confidence


def texture_level(images: torch.Tensor) -> torch.Tensor:
    """Per frame of (N, H, W) in [0, 1]: the mean local contrast (grey levels, 0 for a uniform frame): the mean
    absolute deviation from a 9x9 box mean (box filters keep this cheap; it only gates "measurable or not").
    On a CPU, OpenCV's box filter (same border: replicate) instead of torch's, which costs far more there."""
    if images.device.type == "cpu":
        return _texture_level_opencv(images)
    return _texture_level_torch(images)


def _texture_level_opencv(images: torch.Tensor) -> torch.Tensor:
    import cv2  # noqa: PLC0415 - in the data extra, as PyAV is

    frames = images.detach().float().cpu().numpy()
    return torch.tensor([float(np.abs(frame - cv2.blur(frame, (9, 9), borderType=cv2.BORDER_REPLICATE)).mean()) for frame in frames])


def _texture_level_torch(images: torch.Tensor) -> torch.Tensor:
    gray = images.float().unsqueeze(1)
    local_mean = F.avg_pool2d(F.pad(gray, (4, 4, 4, 4), mode="replicate"), 9, stride=1)
    return (gray - local_mean).abs().mean(dim=(1, 2, 3))


def pyramid_levels(size: tuple[int, int], min_side: int = 16) -> int:
    """Pyramid levels (the full size included) while the coarsest level keeps its shorter side >= ``min_side``."""
    levels, side = 1, min(size)
    while side >= 2 * min_side:
        levels, side = levels + 1, side // 2
    return levels


def _pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Finest first. Blur before halving, as OpenCV's Farneback pyramid does (sigma = (1/scale - 1) / 2 per octave)."""
    pyramid = [images]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(_gaussian_blur(pyramid[-1], 0.75), 2))
    return pyramid


def _upsample_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    scale = torch.tensor([size[1] / flow.shape[-1], size[0] / flow.shape[-2]], device=flow.device).view(1, 2, 1, 1)
    return F.interpolate(flow, size=size, mode="bilinear", align_corners=False) * scale


def _opencv_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The "opencv" backend of :func:`optical_flow` (see :func:`_opencv_flow_arrays`)."""
    flows = _opencv_flow_arrays(first.detach().float().cpu().numpy(), second.detach().float().cpu().numpy())
    return torch.from_numpy(np.stack([flow for flow, _ in flows])).permute(0, 3, 1, 2).contiguous().to(first.device)


# ---------------------------------------------------------------- noise level and confidence (both backends)


def _normalised_with_confidence(image: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`normalise_contrast` for one (h, w) float32 level with the noise floor, and the level's confidence:
    0 where the local contrast is within NOISE_FACTOR x ``noise`` (nothing but noise), 1 from twice that."""
    import cv2  # noqa: PLC0415 - OpenCV loads only when this runs

    centred = image - cv2.GaussianBlur(image, (0, 0), NORMALISE_SIGMA)
    spread = np.sqrt(np.maximum(cv2.GaussianBlur(centred * centred, (0, 0), NORMALISE_SIGMA), 0))
    noise_floor = NOISE_FACTOR * noise
    floor = max(RELATIVE_CONTRAST_FLOOR * float(spread.mean()), noise_floor, ABSOLUTE_CONTRAST_FLOOR)
    confidence = np.clip(spread / noise_floor - 1.0, 0.0, 1.0)
    clipped_share = cv2.GaussianBlur(((image >= CLIPPED_WHITE) | (image <= CLIPPED_BLACK)).astype(np.float32), (0, 0), NORMALISE_SIGMA)
    confidence *= np.clip(1.0 - clipped_share / MAX_CLIPPED_SHARE, 0.0, 1.0)
    return centred / np.maximum(spread, floor) * NORMALISED_SCALE, confidence


def _opencv_flow_arrays(first: np.ndarray, second: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The "opencv" backend on (N, H, W) float32 arrays: per pair its (H, W, 2) flow and (H, W) confidence.

    Coarse to fine over a halving pyramid (OpenCV's filters: several times faster than torch convolutions on a
    CPU; OpenCV's own pyramid would blur away the normalised detail), at each level:
    * the initial flow is, per pixel, the coarser level's or zero, whichever matches the two frames better
      (window-mean absolute difference): a coarse level too small to resolve fine texture cannot then drag a
      still background along with a moving object;
    * OpenCV's Farneback refines it on the noise-floored, contrast-normalised images;
    * the refinement is kept in proportion to the level's confidence (both frames' contrast above their noise:
      :func:`noise_sigmas`, scaled to the level), so grain on a smooth scene never becomes motion.
    The confidence of a pair is, per pixel, the highest of its levels' (upsampled).
    """
    import cv2  # noqa: PLC0415 - only the CPU backend needs OpenCV

    solver = FARNEBACK_SOLVER
    levels = pyramid_levels(first.shape[-2:])
    gains = pyramid_noise_gains(levels)

    def pyramid(image: np.ndarray) -> list[np.ndarray]:
        images = [image]
        for _ in range(levels - 1):
            smaller = (images[-1].shape[1] // 2, images[-1].shape[0] // 2)
            images.append(cv2.resize(cv2.GaussianBlur(images[-1], (0, 0), 0.75), smaller, interpolation=cv2.INTER_AREA))
        return images

    results = []
    previous: tuple[np.ndarray, list[np.ndarray]] | None = None  # the last pair's second frame and its pyramid
    for one, two in zip(first, second):
        one, two, trusted = match_tone(one, two)
        one_pyramid = previous[1] if previous is not None and np.array_equal(previous[0], one) else pyramid(one)
        two_pyramid = pyramid(two)
        previous = (two, two_pyramid)
        noise_one, noise_two = noise_sigmas(one, two)
        flow = confidence = None
        for level in reversed(range(levels)):
            level_one, confidence_one = _normalised_with_confidence(one_pyramid[level], noise_one * gains[level])
            level_two, confidence_two = _normalised_with_confidence(two_pyramid[level], noise_two * gains[level])
            height, width = level_one.shape
            if flow is None:
                flow, confidence = np.zeros((height, width, 2), np.float32), np.zeros((height, width), np.float32)
            else:
                flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR) * np.array([width / flow.shape[1], height / flow.shape[0]], np.float32)
                confidence = cv2.resize(confidence, (width, height), interpolation=cv2.INTER_LINEAR)
                flow = _better_of_flow_or_zero(level_one, level_two, flow)
            refined = cv2.calcOpticalFlowFarneback(
                level_one, level_two, flow.copy(), 0.5, 1, solver["winsize"], solver["iterations"], solver["poly_n"], solver["poly_sigma"],
                cv2.OPTFLOW_USE_INITIAL_FLOW,
            )
            level_confidence = np.minimum(confidence_one, confidence_two).astype(np.float32)
            flow = flow + level_confidence[..., None] * (refined - flow)
            confidence = np.maximum(confidence, level_confidence)
        still = cv2.blur(np.square(one - two), (STILL_WINDOW,) * 2) <= STILL_TOLERANCE * (noise_one**2 + noise_two**2)
        results.append((np.where(still[..., None], np.float32(0), flow), confidence if trusted else np.zeros_like(confidence)))
    return results


def _better_of_flow_or_zero(first: np.ndarray, second: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Per pixel, ``flow`` or zero, whichever leaves the smaller window-mean |first - second warped|."""
    import cv2  # noqa: PLC0415 - OpenCV loads only when this runs

    height, width = first.shape
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    warped = cv2.remap(second, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    window = (FARNEBACK_SOLVER["winsize"],) * 2
    zero_is_better = cv2.blur(np.abs(first - second), window) <= cv2.blur(np.abs(first - warped), window)
    return np.where(zero_is_better[..., None], np.float32(0), flow).astype(np.float32)


# ---------------------------------------------------------------- Farneback in PyTorch


def _gaussian_taps(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def _separable(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Filter every channel of (N, C, H, W) by ``taps`` along x then y, replicate border."""
    radius = taps.numel() // 2
    channels = images.shape[1]
    horizontal = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return _separable(images, _gaussian_taps(sigma, max(1, math.ceil(3 * sigma)), images.device))


@functools.cache
def _expansion_kernels(poly_n: int, poly_sigma: float) -> torch.Tensor:
    """(5, 1, 2n+1, 2n+1) correlation kernels giving (b_x, b_y, a_xx, a_yy, a_xy) of the local fit
    f(x, y) ~ c + b_x x + b_y y + a_xx x^2 + a_yy y^2 + a_xy x y, Gaussian-weighted (Farneback's applicability)."""
    offsets = torch.arange(-poly_n, poly_n + 1, dtype=torch.float64)
    ys, xs = torch.meshgrid(offsets, offsets, indexing="ij")
    weights = torch.exp(-(xs**2 + ys**2) / (2 * poly_sigma**2)).flatten()
    basis = torch.stack([torch.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys], dim=-1).reshape(-1, 6)
    gram = basis.T @ (weights[:, None] * basis)
    projection = torch.linalg.solve(gram, basis.T * weights[None, :])  # (6, taps): coefficients = projection @ patch
    return projection[1:].reshape(5, 1, 2 * poly_n + 1, 2 * poly_n + 1).float()


def _expand(images: torch.Tensor, poly_n: int, poly_sigma: float) -> torch.Tensor:
    kernels = _expansion_kernels(poly_n, poly_sigma).to(images.device)
    return F.conv2d(F.pad(images, (poly_n,) * 4, mode="replicate"), kernels)


def _warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample (N, C, H, W) ``images`` at x + flow; bilinear, border clamp."""
    _, _, height, width = images.shape
    ys, xs = torch.meshgrid(
        torch.arange(height, device=images.device, dtype=images.dtype),
        torch.arange(width, device=images.device, dtype=images.dtype),
        indexing="ij",
    )
    grid_x = (xs + flow[:, 0]) * (2.0 / max(width - 1, 1)) - 1.0
    grid_y = (ys + flow[:, 1]) * (2.0 / max(height - 1, 1)) - 1.0
    return F.grid_sample(images, torch.stack([grid_x, grid_y], dim=-1), mode="bilinear", padding_mode="border", align_corners=True)


def _farneback_step(first: torch.Tensor, second: torch.Tensor, flow: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """One Farneback update: with A = (A1 + A2(x+d)) / 2 and db = -(b2(x+d) - b1) / 2 + A d, solve the
    window-weighted least squares A d' = db per pixel, damped where the window has no structure."""
    warped = _warp(second, flow)
    b_x = (first[:, 0] - warped[:, 0]) * 0.5
    b_y = (first[:, 1] - warped[:, 1]) * 0.5
    a_xx = (first[:, 2] + warped[:, 2]) * 0.5
    a_yy = (first[:, 3] + warped[:, 3]) * 0.5
    a_xy = (first[:, 4] + warped[:, 4]) * 0.25  # off-diagonal of the symmetric A is a_xy / 2
    b_x = b_x + a_xx * flow[:, 0] + a_xy * flow[:, 1]
    b_y = b_y + a_xy * flow[:, 0] + a_yy * flow[:, 1]
    terms = torch.stack(
        [a_xx * a_xx + a_xy * a_xy, a_xy * (a_xx + a_yy), a_yy * a_yy + a_xy * a_xy, a_xx * b_x + a_xy * b_y, a_xy * b_x + a_yy * b_y], dim=1
    )
    g_xx, g_xy, g_yy, h_x, h_y = _separable(terms, window).unbind(1)
    damping = DAMPING * (g_xx + g_yy).mean(dim=(1, 2), keepdim=True) + 1e-6
    g_xx, g_yy = g_xx + damping, g_yy + damping
    determinant = g_xx * g_yy - g_xy * g_xy
    solved = torch.stack([(g_yy * h_x - g_xy * h_y) / determinant, (g_xx * h_y - g_xy * h_x) / determinant], dim=1)
    return flow + (solved - flow).clamp(-MAX_UPDATE_PX, MAX_UPDATE_PX)


def torch_farneback_flow(first: torch.Tensor, second: torch.Tensor, min_side: int = 16) -> torch.Tensor:
    """The "torch" backend of :func:`optical_flow` (see the module docstring)."""
    return torch_farneback_flow_with_confidence(first, second, min_side)[0]


def torch_farneback_flow_with_confidence(first: torch.Tensor, second: torch.Tensor, min_side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2, H, W) flow and (N, H, W) confidence; per level as the opencv backend (:func:`_opencv_flow_arrays`):
    the initial flow is the coarser level's or zero, whichever matches better, and the level's update is kept in
    proportion to its noise-aware confidence."""
    iterations, winsize, poly_n, poly_sigma = (FARNEBACK_SOLVER[key] for key in ("iterations", "winsize", "poly_n", "poly_sigma"))
    count = first.shape[0]
    levels = pyramid_levels(first.shape[-2:], min_side)
    first_cpu, second_cpu, trusted = match_tone_pairs(first.detach().float().cpu().numpy(), second.detach().float().cpu().numpy())
    first, second = torch.from_numpy(first_cpu).to(first.device), torch.from_numpy(second_cpu).to(second.device)
    noise = torch.tensor([noise_sigmas(one, two) for one, two in zip(first_cpu, second_cpu)], dtype=torch.float32, device=first.device).reshape(-1)
    images = torch.stack([first, second], dim=1).reshape(-1, 1, *first.shape[-2:])
    pyramid = _pyramid(images, levels)
    gains = pyramid_noise_gains(levels)
    window = torch.ones(winsize, device=first.device) / winsize
    flow = confidence = None
    for index in reversed(range(levels)):
        level = pyramid[index]
        height, width = level.shape[-2:]
        normalised, level_confidence = normalise_contrast(level, noise=noise * gains[index])
        normalised = normalised.reshape(count, 2, height, width)
        level_confidence = level_confidence.reshape(count, 2, height, width).amin(dim=1)
        coefficients = _expand(normalised.reshape(-1, 1, height, width), poly_n, poly_sigma).reshape(count, 2, 5, height, width)
        if flow is None:
            flow, confidence = level.new_zeros(count, 2, height, width), level.new_zeros(count, height, width)
        else:
            flow = _upsample_flow(flow, (height, width))
            confidence = F.interpolate(confidence[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            flow = _better_of_flow_or_zero_torch(normalised, flow, winsize)
        refined = flow
        for _ in range(iterations):
            refined = _farneback_step(coefficients[:, 0], coefficients[:, 1], refined, window)
        flow = flow + level_confidence[:, None] * (refined - flow)
        confidence = torch.maximum(confidence, level_confidence)
    pair_variance = noise.view(count, 2).square().sum(dim=1).view(-1, 1, 1, 1)
    still = _separable((first - second).square()[:, None], torch.ones(STILL_WINDOW, device=first.device) / STILL_WINDOW) <= STILL_TOLERANCE * pair_variance
    confidence = confidence * torch.from_numpy(trusted).to(confidence).view(-1, 1, 1)
    return torch.where(still, torch.zeros_like(flow), flow), confidence


def _better_of_flow_or_zero_torch(normalised: torch.Tensor, flow: torch.Tensor, winsize: int) -> torch.Tensor:
    """:func:`_better_of_flow_or_zero` for (N, 2, h, w) normalised pairs and (N, 2, h, w) flows."""
    box = torch.ones(winsize, device=flow.device) / winsize
    warped = _warp(normalised[:, 1:], flow)[:, 0]
    residual_flow = _separable((normalised[:, 0] - warped).abs()[:, None], box)[:, 0]
    residual_zero = _separable((normalised[:, 0] - normalised[:, 1]).abs()[:, None], box)[:, 0]
    return torch.where((residual_zero <= residual_flow)[:, None], torch.zeros_like(flow), flow)


# ---------------------------------------------------------------- motion statistics


MOTION_SATURATION_PER_SECOND = 0.5


def to_gray(frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, H, W) float32 luma in [0, 1] (BT.601 weights)."""
    video = torch.as_tensor(frames)
    if device is not None:
        video = video.to(device)
    weights = torch.tensor([0.299, 0.587, 0.114], device=video.device)
    return (video.float() / 255.0) @ weights


def mean_flow_magnitude(frames: np.ndarray | torch.Tensor, backend: str = "auto", device: torch.device | str | None = None, border_fraction: float = 0.05) -> float:
    """Mean flow magnitude (pixels of ``frames``) over consecutive pairs of (N, H, W, 3) uint8 RGB ``frames``.

    A ``border_fraction`` margin is excluded: content entering or leaving the frame has no correspondence.
    """
    gray = to_gray(frames, device)
    if gray.shape[0] < 2:
        raise ValueError(f"mean_flow_magnitude: need at least 2 frames, got {gray.shape[0]}")
    return float(pair_flow_magnitudes(gray[:-1], gray[1:], backend, border_fraction).mean())


def optical_flow_with_confidence(first: torch.Tensor, second: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`optical_flow` and its (N, H, W) confidence in [0, 1] (0: nothing but noise or no structure there,
    in either frame, at any pyramid level), for the "opencv" and "torch" backends."""
    backend = _resolve_backend(first, second, backend)
    if backend == "opencv":
        results = _opencv_flow_arrays(first.detach().float().cpu().numpy(), second.detach().float().cpu().numpy())
        flow = torch.from_numpy(np.stack([flow for flow, _ in results])).permute(0, 3, 1, 2).contiguous().to(first.device)
        return flow, torch.from_numpy(np.stack([confidence for _, confidence in results])).to(first.device)
    if backend == "dali":
        raise ValueError("optical_flow_with_confidence: backend 'dali' gives no confidence; use 'opencv' or 'torch'")
    return torch_farneback_flow_with_confidence(first.float(), second.float())


def pair_flow_magnitudes(first: torch.Tensor, second: torch.Tensor, backend: str = "auto", border_fraction: float = 0.05) -> torch.Tensor:
    """The motion score of each pair (N,) of (N, H, W) grayscale frames: the confidence-weighted mean flow
    magnitude (:func:`confident_mean`), border margin excluded. "dali" (no confidence): the plain mean."""
    height, width = first.shape[-2:]
    margin_y, margin_x = int(height * border_fraction), int(width * border_fraction)
    inner = (slice(margin_y, height - margin_y), slice(margin_x, width - margin_x))
    backend = _resolve_backend(first, second, backend)
    if backend == "opencv":
        # OpenCV's flow as arrays, its magnitude in NumPy: torch's CPU ops would cost more than the flow itself.
        results = _opencv_flow_arrays(first.detach().float().cpu().numpy(), second.detach().float().cpu().numpy())
        return torch.tensor([confident_mean(np.hypot(flow[..., 0], flow[..., 1])[inner], confidence[inner]) for flow, confidence in results], dtype=torch.float32)
    if backend == "dali":
        return optical_flow(first, second, backend).norm(dim=1)[(slice(None), *inner)].mean(dim=(1, 2))
    flow, confidence = optical_flow_with_confidence(first, second, backend)
    magnitudes = flow.norm(dim=1)[(slice(None), *inner)].cpu().numpy()
    confidences = confidence[(slice(None), *inner)].cpu().numpy()
    return torch.tensor([confident_mean(magnitude, weights) for magnitude, weights in zip(magnitudes, confidences)], dtype=torch.float32)


def motion_bucket_id(flow_mean_norm: float, sample_fps: float = 2.0, saturation_per_second: float = MOTION_SATURATION_PER_SECOND) -> int:
    """SVD's motion conditioning (0..255), monotone (linear, then saturating) in ``flow_mean_norm``:

    ``clamp(round(255 * flow_mean_norm * sample_fps / saturation_per_second), 0, 255)``. flow_mean_norm is the
    mean flow per 1/sample_fps s over the frame diagonal, so content moving half the diagonal per second or more
    is 255 and SVD's default 127 is about a quarter diagonal per second.
    """
    if not math.isfinite(flow_mean_norm):
        raise ValueError(f"motion_bucket_id: flow_mean_norm must be finite, got {flow_mean_norm}")
    return int(min(255, max(0, round(255 * flow_mean_norm * sample_fps / saturation_per_second))))
