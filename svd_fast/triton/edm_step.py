"""Triton kernels of the fused EDM sampling ops and their launchers (algorithm as csrc/edm_step.cpp).

Grid: (B*F slabs, blocks of one slab). Each (b, f) slab of C*H*W elements must be contiguous; the
batch and frame strides are free, so the halves of the UNet's (2B, ...) output and frame-broadcast
conditioning latents are read in place. Loads are converted to float32 before any arithmetic (the
interpreter's bf16 arithmetic is wrong, and float32 is the intended math precision anyway).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svd_fast import _triton
from svd_fast.reference.edm_step import euler_coefficients, input_scale

BLOCK = 1024


@triton.jit
def _euler_step_kernel(
    x_ptr, u_ptr, c_ptr, g_ptr, out_ptr, den_ptr,
    frames, slab,
    x_sb, x_sf, u_sb, u_sf, c_sb, c_sf, g_sb, g_sf,
    c_skip, c_out, ratio,
    HAS_COND: tl.constexpr, WRITE_DENOISED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // frames
    f = row % frames
    offsets = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < slab
    x = tl.load(x_ptr + b * x_sb + f * x_sf + offsets, mask=mask).to(tl.float32)
    guided = tl.load(u_ptr + b * u_sb + f * u_sf + offsets, mask=mask).to(tl.float32)
    if HAS_COND:
        cond = tl.load(c_ptr + b * c_sb + f * c_sf + offsets, mask=mask).to(tl.float32)
        weight = tl.load(g_ptr + b * g_sb + f * g_sf).to(tl.float32)
        guided = guided + weight * (cond - guided)
    denoised = c_skip * x + c_out * guided
    x_next = x + (x - denoised) * ratio
    tl.store(out_ptr + row * slab + offsets, x_next.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_DENOISED:
        tl.store(den_ptr + row * slab + offsets, denoised.to(den_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prepare_model_input_kernel(
    x_ptr, c_ptr, out_ptr,
    batch, frames, x_slab, cond_slab,
    x_sb, x_sf, c_sb, c_sf,
    c_in,
    DO_CFG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    out_batch = row // frames
    f = row % frames
    b = out_batch % batch
    out_slab = x_slab + cond_slab
    offsets = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_x = offsets < x_slab
    in_cond = (offsets >= x_slab) & (offsets < out_slab)
    x = tl.load(x_ptr + b * x_sb + f * x_sf + offsets, mask=in_x, other=0.0).to(tl.float32)
    # With CFG, output samples [0, B) are the unconditional half: their conditioning latents are zero.
    cond_mask = in_cond
    if DO_CFG:
        # Broadcast the per-row test to a block first: the interpreter rejects scalar & block masks.
        cond_mask = cond_mask & ((offsets * 0 + out_batch) >= batch)
    cond = tl.load(c_ptr + b * c_sb + f * c_sf + (offsets - x_slab), mask=cond_mask, other=0.0)
    value = tl.where(in_x, (x * c_in).to(out_ptr.dtype.element_ty), cond.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + row * out_slab + offsets, value, mask=offsets < out_slab)


def _slab_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` when each (b, f) slab is contiguous, else a contiguous copy."""
    expected = 1
    for dim in range(t.dim() - 1, 1, -1):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            return t.contiguous()
        expected *= t.shape[dim]
    return t


def euler_step(
    x: torch.Tensor,
    model_out_uncond: torch.Tensor,
    model_out_cond: torch.Tensor | None,
    sigma: float,
    sigma_next: float,
    guidance: torch.Tensor | None,
    return_denoised: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments as checked by svd_fast.ops.edm_step; returns (x_next, denoised or an empty tensor)."""
    x, uncond = _slab_view(x), _slab_view(model_out_uncond)
    cond = None if model_out_cond is None else _slab_view(model_out_cond)
    batch, frames = x.shape[:2]
    slab = x.numel() // (batch * frames)
    x_next = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    denoised = torch.empty(x.shape if return_denoised else (0,), dtype=x.dtype, device=x.device)
    c_skip, c_out, ratio = euler_coefficients(sigma, sigma_next)
    has_cond = cond is not None
    # Unused pointer arguments get x: the kernel never reads them (constexpr branches).
    cond_arg = cond if has_cond else x
    guidance_arg = guidance if has_cond else x
    g_strides = guidance.stride() if has_cond else (0, 0)
    grid = (batch * frames, triton.cdiv(slab, BLOCK))
    _triton.launch(
        _euler_step_kernel, grid,
        x, uncond, cond_arg, guidance_arg, x_next, denoised if return_denoised else x_next,
        frames, slab,
        x.stride(0), x.stride(1), uncond.stride(0), uncond.stride(1), cond_arg.stride(0), cond_arg.stride(1),
        g_strides[0], g_strides[1],
        c_skip, c_out, ratio,
        HAS_COND=has_cond, WRITE_DENOISED=return_denoised, BLOCK=BLOCK,
    )  # fmt: skip
    return x_next, denoised


def prepare_model_input(x: torch.Tensor, cond_latents: torch.Tensor, sigma: float, do_cfg: bool) -> torch.Tensor:
    """Arguments as checked by svd_fast.ops.edm_step; returns (2B or B, F, C + C_cond, H, W)."""
    x, cond = _slab_view(x), _slab_view(cond_latents)
    batch, frames, channels, height, width = x.shape
    cond_channels = cond.shape[2]
    out = torch.empty(
        (batch * (2 if do_cfg else 1), frames, channels + cond_channels, height, width), dtype=x.dtype, device=x.device
    )
    x_slab = channels * height * width
    cond_slab = cond_channels * height * width
    grid = (out.shape[0] * frames, triton.cdiv(x_slab + cond_slab, BLOCK))
    _triton.launch(
        _prepare_model_input_kernel, grid,
        x, cond, out,
        batch, frames, x_slab, cond_slab,
        x.stride(0), x.stride(1), cond.stride(0), cond.stride(1),
        input_scale(sigma),
        DO_CFG=do_cfg, BLOCK=BLOCK,
    )  # fmt: skip
    return out
