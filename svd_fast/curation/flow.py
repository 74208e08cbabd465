"""Dense optical flow for the motion filter: coarse-to-fine Lucas-Kanade in PyTorch (GPU or CPU, batched
over frame pairs), and NVIDIA's optical-flow hardware through DALI where the device has it.

Motion statistic (what the manifest records):
  flow_mean_px   mean flow magnitude, in source-resolution pixels, between frames sampled at 2 FPS (rescaled to
                 exactly 0.5 s when the frame step is rounded or the clip is shorter than one step)
  flow_mean_norm flow_mean_px / source frame diagonal (resolution independent)
motion_bucket_id (SVD's motion conditioning, 0..255) is linear in the normalised flow per second and saturates:
  motion_bucket_id = clamp(round(255 * flow_mean_norm * sample_fps / MOTION_SATURATION_PER_SECOND), 0, 255)
with MOTION_SATURATION_PER_SECOND = 0.5: content moving half the frame diagonal per second or more is 255,
and SVD's default 127 corresponds to about a quarter diagonal per second.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MOTION_SATURATION_PER_SECOND = 0.5


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with replicate padding."""
    kernel = _gaussian_kernel(sigma, images.device)
    radius = kernel.numel() // 2
    channels = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def _gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (N, 1, H, W) -> (d/dx, d/dy), one-sided at the border."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    grad_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) * 0.5
    grad_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) * 0.5
    return grad_x, grad_y


def _warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``images`` at x + flow (flow (N, 2, H, W) in pixels, channel 0 = dx); bilinear, border clamp."""
    _, _, height, width = images.shape
    ys, xs = torch.meshgrid(
        torch.arange(height, device=images.device, dtype=images.dtype),
        torch.arange(width, device=images.device, dtype=images.dtype),
        indexing="ij",
    )
    grid_x = (xs + flow[:, 0]) * (2.0 / max(width - 1, 1)) - 1.0
    grid_y = (ys + flow[:, 1]) * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack([grid_x, grid_y], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def lucas_kanade_flow(
    first: torch.Tensor,
    second: torch.Tensor,
    levels: int = 4,
    iterations: int = 3,
    window_sigma: float = 2.0,
    regularization: float = 1e-3,
) -> torch.Tensor:
    """Dense flow (N, 2, H, W) from ``first`` to ``second`` (N, H, W) grayscale in [0, 1]; channel 0 = dx.

    Coarse-to-fine: at each pyramid level (coarsest first) the second image is warped by the current flow and
    a Gaussian-windowed Lucas-Kanade step solves the 2x2 normal equations per pixel (Tikhonov-regularised,
    so flat regions get ~0 update rather than noise); the flow is upsampled x2 to the next level.
    """
    if first.shape != second.shape or first.ndim != 3:
        raise ValueError(f"lucas_kanade_flow: first and second must both be (N, H, W), got {tuple(first.shape)} and {tuple(second.shape)}")
    if levels < 1 or iterations < 1:
        raise ValueError(f"lucas_kanade_flow: levels and iterations must be >= 1, got {levels}, {iterations}")
    first, second = first.float().unsqueeze(1), second.float().unsqueeze(1)
    # Gaussian pyramid; a level is only built while both sides stay >= 8 pixels.
    pyramid = [(first, second)]
    for _ in range(levels - 1):
        low_first, low_second = pyramid[-1]
        if min(low_first.shape[-2:]) < 16:
            break
        pyramid.append(tuple(F.avg_pool2d(_blur(image, 1.0), 2) for image in (low_first, low_second)))
    flow = None
    for level_first, level_second in reversed(pyramid):
        height, width = level_first.shape[-2:]
        if flow is None:
            flow = level_first.new_zeros(level_first.shape[0], 2, height, width)
        else:
            flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False) * torch.tensor(
                [width / flow.shape[-1], height / flow.shape[-2]], device=flow.device
            ).view(1, 2, 1, 1)
        grad_x, grad_y = _gradients(level_first)
        sum_xx = _blur(grad_x * grad_x, window_sigma)
        sum_xy = _blur(grad_x * grad_y, window_sigma)
        sum_yy = _blur(grad_y * grad_y, window_sigma)
        trace = sum_xx + sum_yy
        # Regularisation relative to the local texture keeps the solve scale-free and stable.
        sum_xx_reg = sum_xx + regularization * (trace + 1e-6)
        sum_yy_reg = sum_yy + regularization * (trace + 1e-6)
        determinant = (sum_xx_reg * sum_yy_reg - sum_xy * sum_xy).clamp_min(1e-12)
        for _ in range(iterations):
            temporal = _warp(level_second, flow) - level_first
            rhs_x = _blur(grad_x * temporal, window_sigma)
            rhs_y = _blur(grad_y * temporal, window_sigma)
            step_x = -(sum_yy_reg * rhs_x - sum_xy * rhs_y) / determinant
            step_y = -(sum_xx_reg * rhs_y - sum_xy * rhs_x) / determinant
            flow = flow + torch.cat([step_x, step_y], dim=1)
    return flow


def to_gray(frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, H, W) float32 luma in [0, 1] (BT.601 weights)."""
    video = torch.as_tensor(frames)
    if device is not None:
        video = video.to(device)
    weights = torch.tensor([0.299, 0.587, 0.114], device=video.device)
    return (video.float() / 255.0) @ weights


def mean_flow_magnitude(
    frames: np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
    border_fraction: float = 0.05,
    batch_size: int = 16,
) -> float:
    """Mean flow magnitude (pixels of ``frames``' resolution) over consecutive pairs of ``frames`` (N, H, W, 3).

    A ``border_fraction`` margin is excluded: content entering or leaving the frame has no correspondence.
    """
    gray = to_gray(frames, device)
    if gray.shape[0] < 2:
        raise ValueError(f"mean_flow_magnitude: need at least 2 frames, got {gray.shape[0]}")
    height, width = gray.shape[-2:]
    margin_y, margin_x = int(height * border_fraction), int(width * border_fraction)
    total, count = 0.0, 0
    for start in range(0, gray.shape[0] - 1, batch_size):
        stop = min(start + batch_size, gray.shape[0] - 1)
        flow = lucas_kanade_flow(gray[start:stop], gray[start + 1 : stop + 1])
        magnitude = flow.norm(dim=1)[:, margin_y : height - margin_y, margin_x : width - margin_x]
        total += float(magnitude.sum())
        count += magnitude.numel()
    return total / count


def dali_available() -> bool:
    """DALI's optical flow needs a CUDA device with the NVIDIA optical-flow engine (Turing or newer)."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvidia.dali  # noqa: F401, PLC0415
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (7, 5)


def dali_mean_flow_magnitude(frames: np.ndarray, border_fraction: float = 0.05) -> float:
    """As ``mean_flow_magnitude`` but computed by DALI's fn.optical_flow (GPU optical-flow hardware).

    DALI returns flow on a 4x4 grid (output_grid=4) in pixels of the input, as (pairs, H/4, W/4, 2).
    """
    from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415

    sequence = np.ascontiguousarray(frames)

    @pipeline_def(batch_size=1, num_threads=2, device_id=torch.cuda.current_device())
    def flow_pipeline():
        video = fn.external_source(source=lambda: [sequence], layout="FHWC", dtype=types.UINT8, batch=True)
        return fn.optical_flow(video.gpu(), output_grid=4, preset=0.0)

    pipe = flow_pipeline()
    pipe.build()
    (output,) = pipe.run()
    flow = np.asarray(output.as_cpu().as_array()[0], dtype=np.float32)
    height, width = flow.shape[1:3]
    margin_y, margin_x = int(height * border_fraction), int(width * border_fraction)
    magnitude = np.linalg.norm(flow, axis=-1)[:, margin_y : height - margin_y, margin_x : width - margin_x]
    return float(magnitude.mean())


def motion_bucket_id(flow_mean_norm: float, sample_fps: float, saturation_per_second: float = MOTION_SATURATION_PER_SECOND) -> int:
    """Map the normalised flow statistic to SVD's motion_bucket_id (see the module docstring)."""
    if not math.isfinite(flow_mean_norm):
        raise ValueError(f"motion_bucket_id: flow_mean_norm must be finite, got {flow_mean_norm}")
    return int(min(255, max(0, round(255 * flow_mean_norm * sample_fps / saturation_per_second))))
