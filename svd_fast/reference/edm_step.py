"""Reference EDM sampling ops (plain PyTorch): the ground truth for the fused kernels.

SVD's denoiser is EDM with v-prediction (Karras et al. 2022; SVD, Blattmann et al. 2023, App. D):
    c_skip = 1 / (s^2 + 1),  c_out = -s / sqrt(s^2 + 1),  c_in = 1 / sqrt(s^2 + 1)
    D = c_skip * x + c_out * F,  x_next = x + (x - D) / s * (s_next - s)
with F the (guided) model output. The math runs in float32 (float64 for float64 input); the
results have the dtype of ``x``. Sampling only: nothing here is meant to be differentiated.
"""

from __future__ import annotations

import math

import torch


def euler_coefficients(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """(c_skip, c_out, step_ratio) of one Euler step, in float64; step_ratio = (sigma_next - sigma) / sigma."""
    c_skip = 1.0 / (sigma * sigma + 1.0)
    c_out = -sigma / math.sqrt(sigma * sigma + 1.0)
    return c_skip, c_out, (sigma_next - sigma) / sigma


def input_scale(sigma: float) -> float:
    """c_in = 1 / sqrt(sigma^2 + 1), in float64."""
    return 1.0 / math.sqrt(sigma * sigma + 1.0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def edm_euler_step(
    x: torch.Tensor,
    model_out_uncond: torch.Tensor,
    model_out_cond: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    guidance: torch.Tensor | None,
    return_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Guidance + v-prediction denoiser + Euler step. ``guidance`` has shape (B, F) (used only with model_out_cond)."""
    dtype = _compute_dtype(x)
    guided = model_out_uncond.to(dtype)
    if model_out_cond is not None:
        weight = guidance.to(dtype)[:, :, None, None, None]
        guided = guided + weight * (model_out_cond.to(dtype) - guided)
    c_skip, c_out, step_ratio = euler_coefficients(sigma, sigma_next)
    x_wide = x.to(dtype)
    denoised = c_skip * x_wide + c_out * guided
    x_next = x_wide + (x_wide - denoised) * step_ratio
    return x_next.to(x.dtype), denoised.to(x.dtype) if return_denoised else None


def edm_prepare_model_input(
    x: torch.Tensor, cond_latents: torch.Tensor, sigma: float, do_cfg: bool
) -> torch.Tensor:
    """cat([c_in * x, cond_latents], channels); with do_cfg the batch is doubled, uncond half first with zero
    conditioning latents (diffusers' StableVideoDiffusionPipeline order). cond_latents: (B, F, C_cond, H, W)."""
    scaled = (x.to(_compute_dtype(x)) * input_scale(sigma)).to(x.dtype)
    cond = cond_latents.to(x.dtype)
    conditional = torch.cat([scaled, cond], dim=2)
    if not do_cfg:
        return conditional
    unconditional = torch.cat([scaled, torch.zeros_like(cond)], dim=2)
    return torch.cat([unconditional, conditional], dim=0)
