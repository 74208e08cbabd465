"""EDM samplers for SVD.

* :func:`sample_guided_euler`: SVD's sampler with the fused ops: per step one
  :func:`~svd_fast.ops.edm_prepare_model_input` (c_in scaling, conditioning concat, CFG batch), one call
  of the raw UNet, one :func:`~svd_fast.ops.edm_euler_step` (guidance + denoiser + Euler step).
  Equal to diffusers' StableVideoDiffusionPipeline denoising loop.
* :func:`sample_euler` / :func:`sample_heun`: EDM (Karras et al. 2022, Algorithm 2) on any denoiser
  ``D(x, sigma)`` (see :class:`~svd_fast.sampling.denoiser.EDMDenoiser`), first or second order, with
  the optional stochastic "churn" (s_churn, s_tmin, s_tmax, s_noise) drawn from ``generator``.

Sampling only: run under ``torch.no_grad()`` (the fused ops have no autograd formula).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from svd_fast.ops.edm_step import edm_euler_step, edm_prepare_model_input
from svd_fast.sampling.denoiser import Denoise, RawModel
from svd_fast.sampling.guidance import uses_guidance
from svd_fast.sampling.schedule import edm_timesteps

SigmasLike = torch.Tensor | Sequence[float]


def sample_guided_euler(
    model: RawModel,
    x: torch.Tensor,
    cond_latents: torch.Tensor,
    sigmas: SigmasLike,
    guidance: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Run SVD's Euler sampler from the initial latents ``x`` (B, F, C, H, W), already scaled by the
    schedule's init_noise_sigma, down the noise levels ``sigmas`` (ending in 0).

    ``model(model_input, timestep)``: the raw UNet on (2B or B, F, C + C_cond, H, W) inputs, timestep a
    float32 0-d tensor on x's device (0.25 ln sigma); with guidance it returns the unconditional half
    first. ``cond_latents``: (B, F | 1, C_cond, H, W) or (B, C_cond, H, W). ``guidance``: per-frame
    weights (F,), (B, F) or (B, F, 1, 1, 1), or a float; classifier-free guidance runs when some weight
    exceeds 1 (as diffusers decides), else the model sees the conditional batch only.
    """
    sigma_values = sigma_list(sigmas)
    timesteps = edm_timesteps(torch.tensor(sigma_values, dtype=torch.float32)).to(x.device)
    do_cfg = uses_guidance(guidance)
    for step, (sigma, sigma_next) in enumerate(zip(sigma_values[:-1], sigma_values[1:])):
        model_input = edm_prepare_model_input(x, cond_latents, sigma, do_cfg)
        output = model(model_input, timesteps[step])
        if do_cfg:
            uncond, cond = output.chunk(2)  # views of the (2B, ...) output: read in place by the fused step
            x = edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance)
        else:
            x = edm_euler_step(x, output, None, sigma, sigma_next, None)
    return x


def sample_euler(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: SigmasLike,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """First-order EDM sampler (Euler); with s_churn = 0 it is the deterministic probability-flow ODE."""
    return _sample_edm(denoise, x, sigmas, False, s_churn, s_tmin, s_tmax, s_noise, generator)


def sample_heun(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: SigmasLike,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Second-order EDM sampler (Heun's method; an Euler step into sigma = 0), two denoiser calls per step."""
    return _sample_edm(denoise, x, sigmas, True, s_churn, s_tmin, s_tmax, s_noise, generator)


def _sample_edm(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: SigmasLike,
    second_order: bool,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    sigma_values = sigma_list(sigmas)
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    num_steps = len(sigma_values) - 1
    for sigma, sigma_next in zip(sigma_values[:-1], sigma_values[1:]):
        # Churn: raise the noise level from sigma to sigma_hat by adding fresh noise, then step from there.
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
        slope = (x - denoise(x, sigma_hat)) / sigma_hat
        x_next = x + slope * (sigma_next - sigma_hat)
        if second_order and sigma_next > 0:
            slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (slope + slope_next) * (0.5 * (sigma_next - sigma_hat))
        x = x_next
    return x


def sigma_list(sigmas: SigmasLike) -> list[float]:
    """Noise levels as Python floats (read once, no device sync per step), checked: at least two, finite,
    > 0 except the last (>= 0, usually 0)."""
    values = sigmas.detach().cpu().tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
    if isinstance(sigmas, torch.Tensor) and sigmas.dim() != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if len(values) < 2:
        raise ValueError(f"sigmas must hold at least 2 noise levels (start and end), got {len(values)}")
    if not all(math.isfinite(s) for s in values) or any(s <= 0 for s in values[:-1]) or values[-1] < 0:
        raise ValueError(f"sigmas must be finite, > 0 except the last (>= 0), got {values}")
    return values


def _check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn!r}")
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmin ({s_tmin}) must be <= s_tmax ({s_tmax})")
    if s_noise < 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise!r}")
