"""Triton backward of GroupNorm(+SiLU), on the two-pass tiles of :mod:`svd_fast.triton.group_norm`.

1. _backward_partials_kernel: per (group, tile) sums of dxhat and dxhat * xhat, and per (channel, frame, position
   block) sums of dz * xhat and dz (for dweight and dbias); summed by torch in a fixed order (deterministic:
   no atomics).
2. _backward_dx_kernel: elementwise dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), walking the
   tiles last to first as the forward's normalize pass does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svd_fast import _triton
from svd_fast.reference.group_norm import suggest_memory_format
from svd_fast.triton.group_norm import (
    LaunchPlan,
    _load_tile,
    _reversed_program_id,
    _sum2,
    _tile_offsets,
    _tile_position,
    launch_plan,
    layout_strides,
    readable,
    walk,
)


@triton.jit
def _xhat_and_affine(x_ptr, offsets, s, positions, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, row, channel,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_S: tl.constexpr):  # fmt: skip
    """xhat of a tile (0 on padding lanes), its groups' rstd [G, 1, 1] and the affine weight and bias [G, C, 1]."""
    x = _load_tile(x_ptr, offsets, s, positions, EVEN_S)
    mean = tl.load(mean_ptr + row)[:, None, None]
    rstd = tl.load(rstd_ptr + row)[:, None, None]
    xhat = (x - mean) * rstd
    if not EVEN_S:
        xhat = tl.where((s < positions)[None, None, :], xhat, 0.0)
    weight = tl.full(channel.shape, 1.0, tl.float32)[:, :, None]
    bias = tl.zeros(channel.shape, dtype=tl.float32)[:, :, None]
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + channel).to(tl.float32)[:, :, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel).to(tl.float32)[:, :, None]
    return xhat, rstd, weight, bias


@triton.jit
def _grad_before_affine(dy_ptr, offsets, s, positions, xhat, weight, bias, SILU: tl.constexpr, EVEN_S: tl.constexpr):
    """dz (gradient w.r.t. the affine output z, recomputing z; equals dy without SiLU) and dxhat."""
    dz = _load_tile(dy_ptr, offsets, s, positions, EVEN_S)
    if SILU:
        z = xhat * weight + bias
        sig = tl.sigmoid(z)
        # Padding lanes stay 0: dy loads as 0 there and z = bias is finite.
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return dz, dz * weight


@triton.jit
def _backward_partials_kernel(
    dy_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    sum_dxhat_ptr, sum_dxhat_xhat_ptr, dweight_ptr, dbias_ptr,
    positions, num_groups, group_blocks, channel_blocks, s_blocks, tiles, channels,
    x_sn, x_sc, x_sf, x_ss, dy_sn, dy_sc, dy_sf, dy_ss,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, EVEN_S: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    n, g_block, tile, frame, c_block, s_block = _tile_position(pid, group_blocks, channel_blocks, s_blocks, tiles)
    offsets, group, channel, s = _tile_offsets(n, g_block, frame, c_block, s_block, x_sn, x_sc, x_sf, x_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    dy_offsets, _group, _channel, _s = _tile_offsets(n, g_block, frame, c_block, s_block, dy_sn, dy_sc, dy_sf, dy_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    row = n * num_groups + group
    xhat, _rstd, weight, bias = _xhat_and_affine(x_ptr, offsets, s, positions, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, row, channel,
                                                 HAS_WEIGHT, HAS_BIAS, EVEN_S)  # fmt: skip
    dz, dxhat = _grad_before_affine(dy_ptr, dy_offsets, s, positions, xhat, weight, bias, SILU, EVEN_S)
    tl.store(sum_dxhat_ptr + row * tiles + tile, _sum2(dxhat))
    tl.store(sum_dxhat_xhat_ptr + row * tiles + tile, _sum2(dxhat * xhat))
    # Per-channel partials laid out (N, frames x position blocks, C): each slot written by exactly one program.
    channel_out = (n * (tiles // channel_blocks) + frame * s_blocks + s_block) * channels + channel
    tl.store(dweight_ptr + channel_out, tl.sum(dz * xhat, axis=2))
    tl.store(dbias_ptr + channel_out, tl.sum(dz, axis=2))


@triton.jit
def _backward_dx_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, mean_dxhat_ptr, mean_dxhat_xhat_ptr,
    positions, num_groups, group_blocks, channel_blocks, s_blocks, tiles,
    x_sn, x_sc, x_sf, x_ss, dy_sn, dy_sc, dy_sf, dy_ss, dx_sn, dx_sc, dx_sf, dx_ss,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, EVEN_S: tl.constexpr,
):  # fmt: skip
    pid = _reversed_program_id()
    n, g_block, _tile, frame, c_block, s_block = _tile_position(pid, group_blocks, channel_blocks, s_blocks, tiles)
    offsets, group, channel, s = _tile_offsets(n, g_block, frame, c_block, s_block, x_sn, x_sc, x_sf, x_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    dy_offsets, _group, _channel, _s = _tile_offsets(n, g_block, frame, c_block, s_block, dy_sn, dy_sc, dy_sf, dy_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    dx_offsets, _group, _channel, _s = _tile_offsets(n, g_block, frame, c_block, s_block, dx_sn, dx_sc, dx_sf, dx_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    row = n * num_groups + group
    xhat, rstd, weight, bias = _xhat_and_affine(x_ptr, offsets, s, positions, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, row, channel,
                                                HAS_WEIGHT, HAS_BIAS, EVEN_S)  # fmt: skip
    _dz, dxhat = _grad_before_affine(dy_ptr, dy_offsets, s, positions, xhat, weight, bias, SILU, EVEN_S)
    mean_dxhat = tl.load(mean_dxhat_ptr + row)[:, None, None]
    mean_dxhat_xhat = tl.load(mean_dxhat_xhat_ptr + row)[:, None, None]
    dx = (rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)).to(dx_ptr.dtype.element_ty)
    if EVEN_S:
        tl.store(dx_ptr + dx_offsets, dx)
    else:
        tl.store(dx_ptr + dx_offsets, dx, mask=(s < positions)[None, None, :])


def backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of svd_fast.triton.group_norm.forward: (dx, dweight, dbias); dweight/dbias have shape (C,) in
    weight's (else x's) dtype."""
    plan: LaunchPlan = launch_plan(tuple(x.shape), num_groups, _triton.interpreting(), backward=True)
    x, grad_output = readable(x), readable(grad_output)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    batch, channels = x.shape[0], x.shape[1]
    rows = batch * num_groups
    group_partials = torch.empty((2, rows, plan.tiles), dtype=torch.float32, device=x.device)
    channel_partials = torch.empty((2, batch, plan.frames * plan.s_blocks, channels), dtype=torch.float32, device=x.device)
    affine = (x if weight is None else weight, x if bias is None else bias)
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "SILU": silu}
    _triton.launch(
        _backward_partials_kernel, plan.grid,
        grad_output, x, mean, rstd, *affine, group_partials[0], group_partials[1], channel_partials[0], channel_partials[1],
        plan.positions, num_groups, *walk(plan), channels, *layout_strides(x), *layout_strides(grad_output),
        **flags, **plan.constexprs,
    )  # fmt: skip
    group_count = plan.channels_per_group * plan.frames * plan.positions
    mean_dxhat, mean_dxhat_xhat = (group_partials.sum(dim=2) / group_count).unbind(0)
    grad_x = torch.empty_like(x, memory_format=suggest_memory_format(x))
    _triton.launch(
        _backward_dx_kernel, plan.grid,
        grad_output, x, grad_x, mean, rstd, *affine, mean_dxhat, mean_dxhat_xhat,
        plan.positions, num_groups, *walk(plan), *layout_strides(x), *layout_strides(grad_output), *layout_strides(grad_x),
        **flags, **plan.constexprs,
    )  # fmt: skip
    param_dtype = x.dtype if weight is None else weight.dtype
    # Separate sums, not views of one tensor: custom-op outputs must not alias each other.
    grad_weight = channel_partials[0].sum(dim=(0, 1)).to(param_dtype)
    grad_bias = channel_partials[1].sum(dim=(0, 1)).to(param_dtype)
    return grad_x, grad_weight, grad_bias
