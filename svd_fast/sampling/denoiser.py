"""SVD's denoiser: EDM preconditioning for v-prediction ("VScalingWithEDMcNoise").

For a noise level s:  c_skip = 1/(s^2+1),  c_out = -s/sqrt(s^2+1),  c_in = 1/sqrt(s^2+1),  c_noise = 0.25 ln s
and D(x; s) = c_skip * x + c_out * F(c_in * x, c_noise), with F the raw network (SVD's UNet takes
c_noise as its timestep). Works on Python floats and on tensors (broadcasting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

Sigma = float | torch.Tensor


class EDMScalings(NamedTuple):
    c_skip: Sigma
    c_out: Sigma
    c_in: Sigma
    c_noise: Sigma


def edm_scalings(sigma: Sigma) -> EDMScalings:
    """The four EDM v-prediction preconditioning factors at noise level ``sigma`` (> 0 for c_noise)."""
    if isinstance(sigma, torch.Tensor):
        variance = sigma * sigma + 1
        return EDMScalings(1 / variance, -sigma * variance.rsqrt(), variance.rsqrt(), 0.25 * sigma.log())
    sigma = float(sigma)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    variance = sigma * sigma + 1.0
    return EDMScalings(1.0 / variance, -sigma / variance**0.5, 1.0 / variance**0.5, 0.25 * math.log(sigma))


class RawModel(Protocol):
    """The raw network F: ``model(model_input, timestep) -> output`` with model_input = c_in * x (plus any
    conditioning channels) and timestep = c_noise = 0.25 ln sigma, as SVD's UNet is called."""

    def __call__(self, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...


Denoise = Callable[[torch.Tensor, float], torch.Tensor]


class EDMDenoiser:
    """Wraps a raw v-prediction network into the denoiser ``D(x, sigma)`` the generic samplers take."""

    def __init__(self, model: RawModel) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = edm_scalings(float(sigma))
        # The timestep as diffusers passes it to the UNet: a 0-d float32 tensor (float64 for float64 x).
        timestep_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        timestep = torch.tensor(c_noise, dtype=timestep_dtype, device=x.device)
        return c_skip * x + c_out * self.model(c_in * x, timestep)
