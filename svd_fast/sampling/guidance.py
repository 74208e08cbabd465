"""Per-frame classifier-free guidance for SVD: the weight rises linearly from the first to the last frame.

    w_f = linspace(min_guidance, max_guidance, F)[f],   guided = u + w_f * (c - u)

Defaults differ between implementations (SVD_NOTES.md): diffusers uses 1.0 -> 3.0 with 25 steps for both
models; Stability's reference sampling configs use 1.0 -> 2.5 with 25 steps (SVD) and 1.5 -> 3.0 with
30 steps (SVD-XT / XT-1.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidancePreset:
    min_guidance: float
    max_guidance: float
    num_inference_steps: int


GUIDANCE_PRESETS: dict[str, GuidancePreset] = {
    "diffusers": GuidancePreset(1.0, 3.0, 25),
    "svd": GuidancePreset(1.0, 2.5, 25),
    "svd-xt": GuidancePreset(1.5, 3.0, 30),
}


def guidance_preset(name: str) -> GuidancePreset:
    if name not in GUIDANCE_PRESETS:
        raise ValueError(f"unknown guidance preset {name!r}; expected one of {sorted(GUIDANCE_PRESETS)}")
    return GUIDANCE_PRESETS[name]


def frame_guidance(
    num_frames: int,
    min_guidance: float = 1.0,
    max_guidance: float = 3.0,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Guidance weights of shape (B, F, 1, 1, 1), computed exactly as diffusers' StableVideoDiffusionPipeline
    (float32 linspace, then cast to ``dtype``, the latents' dtype there). svd_fast's fused step also takes
    the (F,) or (B, F) forms."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for name, value in (("min_guidance", min_guidance), ("max_guidance", max_guidance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    weights = torch.linspace(min_guidance, max_guidance, num_frames).unsqueeze(0)
    weights = weights.to(device, dtype).repeat(batch_size, 1)
    return weights[:, :, None, None, None]


def uses_guidance(guidance: torch.Tensor | float | None) -> bool:
    """Whether classifier-free guidance is on: as diffusers decides it, some weight must exceed 1."""
    if guidance is None:
        return False
    if isinstance(guidance, torch.Tensor):
        return bool(guidance.max() > 1)
    return guidance > 1
