"""Consistency sampling for SVD, framework-free: the multistep sampler of consistency models (Song et al. 2023,
Algorithm 1) as AnimateLCM-SVD-xt runs it (G-U-N/AnimateLCM, animatelcm_svd/animatelcm_scheduler.py).

A consistency model maps a noisy latent at any noise level straight to its clean estimate; sampling alternates
that estimate with re-noising to the next, lower level:

    x = noise * sqrt(sigma_max^2 + 1)
    per step i:  D = c_skip x + c_out F(c_in x, c_noise)      (F the UNet, guided per frame when CFG is on)
                 D = clamp(D, -1, 1)                          (only with clip_denoised)
                 x = D + s_noise * z_i * sigma_{i+1},  z_i ~ N(0, I)      (sigma_n = 0: the last step returns D)
    c_skip = sd^2 / (s^2 + sd^2),  c_out = -s sd / sqrt(s^2 + sd^2),  c_in = 1 / sqrt(s^2 + sd^2),  c_noise = ln(s) / 4

with sd = sigma_data. The noise levels are Karras sigmas on a ramp of ``num_train_timesteps`` indices; n inference
steps take every (num_train_timesteps // n)-th index from the top (:func:`consistency_sigmas`).

For sd = 1 these scalings are SVD's EDM v-prediction ones, so a step is the fused
:func:`~svd_fast.ops.edm_prepare_model_input` and the denoised output of the fused
:func:`~svd_fast.ops.edm_euler_step` (guidance + denoiser in one pass), then the clamp and the re-noising, which
the loop applies in place. For another sd the same ops run on x / sd at s / sd: c_skip(s; sd) = c_skip(s / sd),
c_in(s; sd) x = c_in(s / sd) x / sd and c_out(s; sd) = sd c_out(s / sd), so D(x; s, sd) = sd D(x / sd; s / sd, 1).
Sampling only: run under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from svd_fast.ops.edm_step import edm_euler_step, edm_prepare_model_input
from svd_fast.sampling.guidance import uses_guidance
from svd_fast.sampling.samplers import SigmasLike, StepEnd, StepModel, sigma_list

# AnimateLCM-SVD-xt's scheduler configuration: the keys (and only these) a consistency scheduler config holds.
ANIMATELCM_SVD_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 40,
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "sigma_data": 1.0,
    "s_noise": 1.0,
    "rho": 7,
    "clip_denoised": False,
}
CONSISTENCY_CONFIG_KEYS = tuple(ANIMATELCM_SVD_CONFIG)
# Few-step models are run at this step count unless told otherwise (AnimateLCM-SVD-xt samples in 2-8 steps).
DEFAULT_CONSISTENCY_STEPS = 4

# noise(step) -> standard normal noise shaped like the latents, for the re-noising after step ``step``.
NoiseSource = Callable[[int], torch.Tensor]


def check_consistency_config(config: Mapping[str, Any], where: str = "consistency scheduler config") -> dict[str, Any]:
    """The config's keys and values checked (ValueError naming the key): exactly :data:`CONSISTENCY_CONFIG_KEYS`,
    missing keys take AnimateLCM-SVD-xt's values; keys starting with "_" (diffusers' bookkeeping) are ignored."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(config).__name__}")
    unknown = sorted(key for key in config if not str(key).startswith("_") and key not in CONSISTENCY_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a consistency scheduler takes {list(CONSISTENCY_CONFIG_KEYS)}")
    values = {key: config.get(key, default) for key, default in ANIMATELCM_SVD_CONFIG.items()}
    steps = values["num_train_timesteps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"{where}: num_train_timesteps must be an int >= 2, got {steps!r}")
    for key, minimum in (("sigma_min", 0.0), ("sigma_max", 0.0), ("sigma_data", 0.0), ("rho", 0.0), ("s_noise", None)):
        value = values[key]
        positive = minimum is not None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
        if (positive and value <= 0) or (not positive and value < 0):
            raise ValueError(f"{where}: {key} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    if values["sigma_min"] >= values["sigma_max"]:
        raise ValueError(f"{where}: sigma_min ({values['sigma_min']}) must be < sigma_max ({values['sigma_max']})")
    if not isinstance(values["clip_denoised"], bool):
        raise ValueError(f"{where}: clip_denoised must be true or false, got {values['clip_denoised']!r}")
    return values


def consistency_sigmas(
    num_steps: int, num_train_timesteps: int, sigma_min: float, sigma_max: float, rho: float
) -> torch.Tensor:
    """The n noise levels of n-step consistency sampling, then 0: float32 (n + 1,).

    sigma_i = karras(i * (N // n) / (N - 1)), karras(r) = (s_max^(1/rho) + r (s_min^(1/rho) - s_max^(1/rho)))^rho,
    computed in float64 (AnimateLCM's set_timesteps). n = N ends at sigma_min; fewer steps end above it."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ValueError(
            f"num_steps ({num_steps}) must be <= num_train_timesteps ({num_train_timesteps}): a consistency model "
            "samples at most at the noise levels it was trained on"
        )
    ramp = np.arange(num_steps) * (num_train_timesteps // num_steps) / (num_train_timesteps - 1)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def consistency_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """The UNet's time input c_noise = ln(sigma) / 4 for every sigma but the trailing 0 (float32)."""
    return (0.25 * sigmas[:-1].to(torch.float64).log()).to(torch.float32)


def consistency_init_noise_sigma(sigma_max: float) -> float:
    """Standard deviation of the initial latents, sqrt(sigma_max^2 + 1) (AnimateLCM's, independent of sigma_data)."""
    return (sigma_max**2 + 1) ** 0.5


def consistency_step(
    x: torch.Tensor,
    model_out_uncond: torch.Tensor,
    model_out_cond: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    guidance: torch.Tensor | float | None,
    noise: torch.Tensor | None,
    s_noise: float = 1.0,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One consistency step with sigma_data = 1 on latents (B, F, C, H, W): (x_next, denoised).

    The guided v-prediction denoiser is the fused Euler op's denoised output; the clamp to [-clip, clip] (None:
    none) runs in place on it, then x_next = D + s_noise * noise * sigma_next (``noise`` may be None when s_noise *
    sigma_next is 0; x_next is then D itself)."""
    _, denoised = edm_euler_step(x, model_out_uncond, model_out_cond, sigma, sigma_next, guidance, return_denoised=True)
    if clip is not None:
        denoised.clamp_(-clip, clip)
    scale = s_noise * sigma_next
    if scale == 0:
        return denoised, denoised
    if noise is None:
        raise ValueError(f"consistency_step: noise is required when s_noise * sigma_next = {scale} is not 0")
    return torch.add(denoised, noise, alpha=scale), denoised


def consistency_sample(
    model: StepModel,
    x: torch.Tensor,
    cond_latents: torch.Tensor,
    sigmas: SigmasLike,
    guidance: torch.Tensor | float | None = None,
    noise: NoiseSource | None = None,
    s_noise: float = 1.0,
    clip_denoised: bool = False,
    sigma_data: float = 1.0,
    on_step_end: StepEnd | None = None,
) -> torch.Tensor:
    """Consistency sampling from the initial latents ``x`` (B, F, C, H, W), already scaled by
    sqrt(sigma_max^2 + 1), down ``sigmas`` (:func:`consistency_sigmas`, ending in 0).

    ``model``, ``cond_latents``, ``guidance`` and ``on_step_end`` as :func:`svd_fast.sampling.sample`.
    ``noise(step)``: the standard normal noise of the re-noising after step ``step``; called once per step
    that re-noises (not for the last step, nor with s_noise 0), in step order, so a generator-backed source
    gives the noise stream of AnimateLCM's scheduler. Required unless s_noise is 0 or there is one step.
    """
    sigma_values = sigma_list(sigmas)
    for name, value, positive in (("s_noise", s_noise, False), ("sigma_data", sigma_data, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"consistency_sample: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    if noise is None and s_noise != 0 and len(sigma_values) > 2:
        raise ValueError("consistency_sample: noise is required for multistep sampling with s_noise > 0")
    do_cfg = uses_guidance(guidance)
    # Latents and noise levels in units of sigma_data, where the scalings are SVD's (module docstring).
    unit = float(sigma_data)
    clip = 1.0 / unit if clip_denoised else None
    if unit != 1.0:
        x = x / unit
        sigma_values = [s / unit for s in sigma_values]
    for step, (sigma, sigma_next) in enumerate(zip(sigma_values[:-1], sigma_values[1:])):
        model_input = edm_prepare_model_input(x, cond_latents, sigma, do_cfg)
        output = model(model_input, step)
        del model_input
        uncond, cond = output.chunk(2) if do_cfg else (output, None)
        renoise = s_noise != 0 and sigma_next > 0
        step_noise = noise(step) if renoise else None
        x_next, _ = consistency_step(
            x, uncond, cond, sigma, sigma_next, guidance if do_cfg else None, step_noise, s_noise if renoise else 0.0, clip,
        )  # fmt: skip
        del output, uncond, cond, step_noise
        if on_step_end is not None:
            x_next = on_step_end(step, x_next * unit) / unit if unit != 1.0 else on_step_end(step, x_next)
        x = x_next
    return x * unit if unit != 1.0 else x
