"""Karras (EDM) noise schedule for SVD sampling, numerically as diffusers' EulerDiscreteScheduler computes it.

    sigma_i = (s_max^(1/rho) + i/(n-1) * (s_min^(1/rho) - s_max^(1/rho)))^rho,  i = 0..n-1, then a trailing 0
    timestep_i = c_noise(sigma_i) = 0.25 * ln(sigma_i)     (what SVD's UNet takes as its time input)
    init_noise_sigma = sqrt(max_sigma^2 + 1)  for timestep_spacing "leading" (SVD's config), max_sigma otherwise

diffusers computes the ramp in float64 NumPy and stores float32; so does this module, so the two
schedules agree to the last bit (tests check it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SVD_SIGMA_MIN = 0.002
SVD_SIGMA_MAX = 700.0
SVD_RHO = 7.0
# SVD's scheduler_config.json says "leading"; diffusers then scales the initial noise by
# sqrt(sigma_max^2 + 1) rather than sigma_max (the variance of x at sigma for unit-variance data).
SVD_TIMESTEP_SPACING = "leading"
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def karras_sigmas(
    num_steps: int, sigma_min: float = SVD_SIGMA_MIN, sigma_max: float = SVD_SIGMA_MAX, rho: float = SVD_RHO
) -> torch.Tensor:
    """The n Karras sigmas from sigma_max down to sigma_min, then 0: float32 tensor of shape (n + 1,)."""
    check_schedule_arguments(num_steps, sigma_min, sigma_max, rho)
    ramp = np.linspace(0, 1, num_steps)  # n = 1 gives [0]: the single step starts at sigma_max
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def edm_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """c_noise = 0.25 * ln(sigma) for every sigma but the trailing one (float32)."""
    return 0.25 * sigmas[:-1].to(torch.float32).log()


def init_noise_sigma(sigmas: torch.Tensor, timestep_spacing: str = SVD_TIMESTEP_SPACING) -> torch.Tensor:
    """Standard deviation of the initial latents, as diffusers' EulerDiscreteScheduler.init_noise_sigma (float32 0-d)."""
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    max_sigma = sigmas.to(torch.float32).max()
    if timestep_spacing in ("linspace", "trailing"):
        return max_sigma
    return (max_sigma**2 + 1) ** 0.5


def check_schedule_arguments(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be < sigma_max ({sigma_max})")
