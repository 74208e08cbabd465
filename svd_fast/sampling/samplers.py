"""SVD's sampling loop on the fused ops, framework-free.

Per step: one :func:`~svd_fast.ops.edm_prepare_model_input` (c_in scaling, conditioning concat, CFG batch),
one call of the raw UNet, one :func:`~svd_fast.ops.edm_euler_step` (per-frame guidance + v-prediction
denoiser + Euler step). Three samplers, one UNet call per step each:

* ``"euler"``: SVD's (and diffusers' EulerDiscreteScheduler's) deterministic Euler step; equal to
  diffusers' StableVideoDiffusionPipeline denoising loop.
* ``"dpmpp-2m"``: DPM-Solver++(2M) (Lu et al. 2022) in the EDM parametrisation (as k-diffusion's
  ``sample_dpmpp_2m``). Its update is the Euler step with the denoised estimate D replaced by the
  extrapolation D + (D - D_prev) / (2 r), r = h_prev / h, h = ln(sigma / sigma_next); since the Euler
  step is affine in D, that is the fused Euler result plus one correction term. Second order, one UNet
  call per step, first order on the first step and on the step into sigma = 0.
* ``"ipndm-2"``: second-order Adams-Bashforth in sigma on the slope d = (x - D) / sigma of the EDM ODE
  dx/dsigma = d, with the fixed coefficients of a uniform grid: x_next = x + (sigma_next - sigma) (3 d - d_prev) / 2,
  first order on the first step. This is iPNDM (Zhang & Chen 2023, "DEIS"; the improved pseudo linear multistep
  method that Zhou et al. 2024 found the strongest training-free EDM sampler at few steps) capped at order 2.
  Since Euler is x + (sigma_next - sigma) d, it is the fused Euler result plus (sigma_next - sigma) (d - d_prev) / 2.
  At 15 steps it reaches Euler's 25-step ODE error on every model measured, and is the more accurate of the two
  multistep samplers on five of six cases (bench/RESULTS.md, ODE accuracy).

Sampling only: run under ``torch.no_grad()`` (the fused ops have no autograd formula).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from svd_fast.ops.edm_step import edm_euler_step, edm_prepare_model_input
from svd_fast.sampling.guidance import uses_guidance

SAMPLERS = ("euler", "dpmpp-2m", "ipndm-2")

SigmasLike = torch.Tensor | Sequence[float]
# model(model_input, step) -> the raw UNet output for step ``step`` (its timestep is 0.25 ln sigmas[step]).
StepModel = Callable[[torch.Tensor, int], torch.Tensor]
# on_step_end(step, x_next) -> the latents to continue from (diffusers' callback_on_step_end may replace them).
StepEnd = Callable[[int, torch.Tensor], torch.Tensor]


def sample(
    model: StepModel,
    x: torch.Tensor,
    cond_latents: torch.Tensor,
    sigmas: SigmasLike,
    guidance: torch.Tensor | float | None = None,
    sampler: str = "euler",
    on_step_end: StepEnd | None = None,
) -> torch.Tensor:
    """Run SVD's sampler from the initial latents ``x`` (B, F, C, H, W), already scaled by the schedule's
    init_noise_sigma, down the noise levels ``sigmas`` (ending in 0).

    ``model(model_input, step)``: the raw UNet on (2B or B, F, C + C_cond, H, W) inputs; with guidance it
    returns the unconditional half first. ``cond_latents``: (B, F | 1, C_cond, H, W) or (B, C_cond, H, W).
    ``guidance``: per-frame weights (F,), (B, F) or (B, F, 1, 1, 1), or a float; classifier-free guidance
    runs when some weight exceeds 1 (as diffusers decides), else the model sees the conditional batch only.
    ``sampler``: one of :data:`SAMPLERS`.
    """
    check_sampler(sampler)
    sigma_values = sigma_list(sigmas)
    do_cfg = uses_guidance(guidance)
    multistep = sampler != "euler"
    # dpmpp-2m: (denoised, sigma) of the previous step; ipndm-2: the previous slope (x - denoised) / sigma.
    previous: tuple[torch.Tensor, float] | torch.Tensor | None = None
    for step, (sigma, sigma_next) in enumerate(zip(sigma_values[:-1], sigma_values[1:])):
        model_input = edm_prepare_model_input(x, cond_latents, sigma, do_cfg)
        output = model(model_input, step)
        # Released before the next step allocates its input, which can then reuse this memory (on the CPU a fresh
        # block costs a page fault per 4 KiB on first touch; see bench/RESULTS.md, fused EDM ops).
        del model_input
        # Views of the (2B, ...) output: the fused step reads them in place.
        uncond, cond = output.chunk(2) if do_cfg else (output, None)
        result = edm_euler_step(x, uncond, cond, sigma, sigma_next, guidance if do_cfg else None, return_denoised=multistep)
        del output, uncond, cond
        if sampler == "dpmpp-2m":
            x_next, denoised = result
            if previous is not None and sigma_next > 0:
                x_next = x_next + _dpmpp_2m_correction(denoised, *previous, sigma, sigma_next)
            previous = (denoised, sigma)
        elif sampler == "ipndm-2":
            x_next, denoised = result
            slope = (x - denoised).div_(sigma)
            del denoised
            if previous is not None:
                x_next = x_next.add_(slope - previous, alpha=(sigma_next - sigma) / 2)
            previous = slope
        else:
            x_next = result
        x = on_step_end(step, x_next) if on_step_end is not None else x_next
    return x


def _dpmpp_2m_correction(
    denoised: torch.Tensor, denoised_prev: torch.Tensor, sigma_prev: float, sigma: float, sigma_next: float
) -> torch.Tensor:
    """What DPM-Solver++(2M) adds to the Euler step: (1 - sigma_next / sigma) (D - D_prev) / (2 r)."""
    h = math.log(sigma / sigma_next)
    r = math.log(sigma_prev / sigma) / h
    return (denoised - denoised_prev).mul_((1 - sigma_next / sigma) / (2 * r)).to(denoised.dtype)


def check_sampler(sampler: object) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


def sigma_list(sigmas: SigmasLike) -> list[float]:
    """Noise levels as Python floats (read once, no device sync per step), checked: at least two, finite,
    > 0 except the last (>= 0, usually 0)."""
    if isinstance(sigmas, torch.Tensor) and sigmas.dim() != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    values = sigmas.detach().cpu().tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(f"sigmas must hold at least 2 noise levels (start and end), got {len(values)}")
    if not all(math.isfinite(s) for s in values) or any(s <= 0 for s in values[:-1]) or values[-1] < 0:
        raise ValueError(f"sigmas must be finite, > 0 except the last (>= 0), got {values}")
    return values
