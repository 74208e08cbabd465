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

Photometric robustness: both the torch and opencv backends see each frame normalised to local zero mean
and unit contrast (Gaussian window of ``NORMALISE_SIGMA`` px per pyramid level for torch, at full size for
opencv), so a fade, a flash or a global brightness change is not motion. Frames with too little texture
to measure anything (black, uniform; see :func:`texture_level`) are reported by the pipeline as static.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

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


def optical_flow(first: torch.Tensor, second: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dense flow from ``first`` to ``second`` (N, H, W) float32 in [0, 1]: (N, 2, H, W), channel 0 = dx."""
    backend = _resolve_backend(first, second, backend)
    if backend == "opencv":
        return _opencv_flow(first, second)
    if backend == "dali":
        reason = dali_unavailable_reason()
        if reason:
            raise RuntimeError(f"optical_flow: backend='dali' cannot run: {reason}; use 'torch' or 'opencv'")
        return _dali_flow(first, second)
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


def normalise_contrast(images: torch.Tensor, sigma: float = NORMALISE_SIGMA) -> torch.Tensor:
    """(N, 1, H, W) -> local zero mean, unit local contrast (floored, see RELATIVE_CONTRAST_FLOOR), x NORMALISED_SCALE."""
    centred = images - _gaussian_blur(images, sigma)
    spread = _gaussian_blur(centred * centred, sigma).clamp_min(0).sqrt()
    floor = (RELATIVE_CONTRAST_FLOOR * spread.mean(dim=(1, 2, 3), keepdim=True)).clamp_min(ABSOLUTE_CONTRAST_FLOOR)
    return centred / torch.maximum(spread, floor) * NORMALISED_SCALE


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
    """OpenCV's Farneback solve at each level of a contrast-normalised pyramid (as the torch backend's, built
    with OpenCV's filters: several times faster than torch convolutions on a CPU), passing the flow down as
    the initial flow. OpenCV's own pyramid would blur away the normalised detail."""
    flows = _opencv_flow_arrays(first.detach().float().cpu().numpy(), second.detach().float().cpu().numpy())
    return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous().to(first.device)


def _opencv_flow_arrays(first: np.ndarray, second: np.ndarray) -> list[np.ndarray]:
    """:func:`_opencv_flow` on (N, H, W) float32 arrays: N (H, W, 2) flows. A frame that is the second of one
    pair and the first of the next (consecutive samples) has its pyramid built once."""
    import cv2  # noqa: PLC0415 - only the CPU backend needs OpenCV

    solver = FARNEBACK_SOLVER
    levels = pyramid_levels(first.shape[-2:])

    def normalised(image: np.ndarray) -> np.ndarray:
        centred = image - cv2.GaussianBlur(image, (0, 0), NORMALISE_SIGMA)
        spread = np.sqrt(np.maximum(cv2.GaussianBlur(centred * centred, (0, 0), NORMALISE_SIGMA), 0))
        floor = max(RELATIVE_CONTRAST_FLOOR * float(spread.mean()), ABSOLUTE_CONTRAST_FLOOR)
        return centred / np.maximum(spread, floor) * NORMALISED_SCALE

    def pyramid(image: np.ndarray) -> list[np.ndarray]:
        images = [image]
        for _ in range(levels - 1):
            smaller = (images[-1].shape[1] // 2, images[-1].shape[0] // 2)
            images.append(cv2.resize(cv2.GaussianBlur(images[-1], (0, 0), 0.75), smaller, interpolation=cv2.INTER_AREA))
        return [normalised(level) for level in images]

    flows = []
    previous: tuple[np.ndarray, list[np.ndarray]] | None = None  # the last pair's second frame and its pyramid
    for one, two in zip(first, second):
        one_pyramid = previous[1] if previous is not None and np.array_equal(previous[0], one) else pyramid(one)
        two_pyramid = pyramid(two)
        previous = (two, two_pyramid)
        flow = None
        for level_one, level_two in reversed(list(zip(one_pyramid, two_pyramid))):
            height, width = level_one.shape
            if flow is None:
                flow = np.zeros((height, width, 2), np.float32)
            else:
                flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR) * np.array([width / flow.shape[1], height / flow.shape[0]], np.float32)
            flow = cv2.calcOpticalFlowFarneback(
                level_one, level_two, flow, 0.5, 1, solver["winsize"], solver["iterations"], solver["poly_n"], solver["poly_sigma"],
                cv2.OPTFLOW_USE_INITIAL_FLOW,
            )
        flows.append(flow)
    return flows


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
    iterations, winsize, poly_n, poly_sigma = (FARNEBACK_SOLVER[key] for key in ("iterations", "winsize", "poly_n", "poly_sigma"))
    images = torch.stack([first, second], dim=1).reshape(-1, 1, *first.shape[-2:])
    pyramid = _pyramid(images, pyramid_levels(first.shape[-2:], min_side))
    window = torch.ones(winsize, device=first.device) / winsize
    flow = None
    for level in reversed(pyramid):
        height, width = level.shape[-2:]
        coefficients = _expand(normalise_contrast(level), poly_n, poly_sigma).reshape(first.shape[0], 2, 5, height, width)
        if flow is None:
            flow = level.new_zeros(first.shape[0], 2, height, width)
        else:
            flow = _upsample_flow(flow, (height, width))
        for _ in range(iterations):
            flow = _farneback_step(coefficients[:, 0], coefficients[:, 1], flow, window)
    return flow


# ---------------------------------------------------------------- DALI (untested)


def dali_unavailable_reason() -> str | None:
    """None when DALI's optical flow can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (7, 5):
        return "the GPU has no optical-flow engine (needs Turing or newer)"
    try:
        import nvidia.dali  # noqa: F401, PLC0415 - DALI is optional (GPU decoding)
    except ImportError:
        return "nvidia-dali is not installed"
    return None


def _dali_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """DALI's fn.optical_flow per pair (output grid 4x4 in input pixels), upsampled to (N, 2, H, W)."""
    from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415 - DALI is optional (GPU decoding)

    height, width = first.shape[-2:]
    pairs = (torch.stack([first, second], dim=1) * 255).round().to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, -1, 3).cpu().numpy()

    @pipeline_def(batch_size=len(pairs), num_threads=2, device_id=torch.cuda.current_device())
    def flow_pipeline():
        video = fn.external_source(source=lambda: [np.ascontiguousarray(pair) for pair in pairs], layout="FHWC", dtype=types.UINT8, batch=True)
        return fn.optical_flow(video.gpu(), output_grid=4, preset=0.0)

    pipe = flow_pipeline()
    pipe.build()
    (output,) = pipe.run()
    grid = torch.from_numpy(np.stack([np.asarray(sample)[0] for sample in output.as_cpu()])).permute(0, 3, 1, 2).float()
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False).to(first.device)


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


def pair_flow_magnitudes(first: torch.Tensor, second: torch.Tensor, backend: str = "auto", border_fraction: float = 0.05) -> torch.Tensor:
    """Mean flow magnitude per pair (N,) of (N, H, W) grayscale frames, border margin excluded."""
    height, width = first.shape[-2:]
    margin_y, margin_x = int(height * border_fraction), int(width * border_fraction)
    inner = (slice(margin_y, height - margin_y), slice(margin_x, width - margin_x))
    if _resolve_backend(first, second, backend) == "opencv":
        # OpenCV's flow as arrays, its magnitude in NumPy: torch's CPU ops would cost more than the flow itself.
        flows = _opencv_flow_arrays(first.detach().float().cpu().numpy(), second.detach().float().cpu().numpy())
        return torch.tensor([float(np.hypot(flow[..., 0], flow[..., 1])[inner].mean()) for flow in flows], dtype=torch.float32)
    magnitude = optical_flow(first, second, backend).norm(dim=1)[(slice(None), *inner)]
    return magnitude.mean(dim=(1, 2))


def motion_bucket_id(flow_mean_norm: float, sample_fps: float = 2.0, saturation_per_second: float = MOTION_SATURATION_PER_SECOND) -> int:
    """SVD's motion conditioning (0..255), monotone (linear, then saturating) in ``flow_mean_norm``:

    ``clamp(round(255 * flow_mean_norm * sample_fps / saturation_per_second), 0, 255)``. flow_mean_norm is the
    mean flow per 1/sample_fps s over the frame diagonal, so content moving half the diagonal per second or more
    is 255 and SVD's default 127 is about a quarter diagonal per second.
    """
    if not math.isfinite(flow_mean_norm):
        raise ValueError(f"motion_bucket_id: flow_mean_norm must be finite, got {flow_mean_norm}")
    return int(min(255, max(0, round(255 * flow_mean_norm * sample_fps / saturation_per_second))))
