"""Videos longer than the model's window, framework-free part: where the windows go, how overlapping latents
are blended and how the overlap is held to the previous window while a window samples.

A video of N frames is sampled as windows of W frames (the model's trained count); window k starts at
``starts[k]`` and shares ``overlap`` frames with window k - 1 (the last window is moved back to end at frame
N, so it may share more). See :mod:`svd_fast.diffusers.long_video` for the method as a whole.
"""

from __future__ import annotations

import torch

__all__ = ["blend", "blend_weights", "check_long_video", "overlap_replacement", "window_starts"]


def check_long_video(num_frames: object, window: object, overlap: object) -> None:
    """ValueError naming the argument: num_frames >= 2, 2 <= window, 0 <= overlap < window."""
    for name, value, minimum in (("num_frames", num_frames, 2), ("window", window, 2), ("overlap", overlap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if overlap >= window:
        raise ValueError(f"overlap must be smaller than window ({window}), got {overlap}")


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """First frame of each window: a stride of ``window - overlap``, the last window ending at ``num_frames``
    (one window, starting at 0, when ``num_frames <= window``)."""
    check_long_video(num_frames, window, overlap)
    if num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window, window - overlap))
    return [*starts, num_frames - window]


def blend_weights(shared: int) -> torch.Tensor:
    """Weight of the previous window on each of the ``shared`` frames two windows share: ``shared / (shared + 1)``
    down to ``1 / (shared + 1)`` in equal steps (the next window gets ``1 - w``), so the video passes linearly from
    one window to the next and neither window's edge frame is used alone next to the other's."""
    return torch.arange(shared, 0, -1, dtype=torch.float64) / (shared + 1)


def blend(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The frames two windows share ((B, shared, C, H, W) latents of each: the video so far and the new window),
    blended with :func:`blend_weights`."""
    if previous.shape != current.shape:
        raise ValueError(f"previous and current must have the same shape, got {tuple(previous.shape)} and {tuple(current.shape)}")
    shared = previous.shape[1]
    weight = blend_weights(shared).to(device=previous.device, dtype=previous.dtype).view(1, shared, 1, 1, 1)
    return weight * previous + (1 - weight) * current


def overlap_replacement(known: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The latents of frames already sampled (``known``, noise-free) brought to noise level ``sigma`` with the
    noise those frames started from: what a window's shared frames are set to after each step, so the rest of the
    window is sampled around them (replacement, as in inpainting by diffusion)."""
    return known + sigma * noise
