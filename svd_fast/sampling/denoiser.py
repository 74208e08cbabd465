"""SVD's denoiser: EDM preconditioning for v-prediction ("VScalingWithEDMcNoise").

For a noise level s:  c_skip = 1/(s^2+1),  c_out = -s/sqrt(s^2+1),  c_in = 1/sqrt(s^2+1),  c_noise = 0.25 ln s
and D(x; s) = c_skip * x + c_out * F(c_in * x, c_noise), with F the raw network (SVD's UNet takes
c_noise as its timestep). Works on Python floats and on tensors (broadcasting).
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
