"""Triton kernels of GroupNorm(+SiLU) with each group's reduction split across many programs.

PyTorch (and a one-program-per-group kernel) reduces a whole (sample, group) in one block: for
SVD's temporal norms, e.g. x of shape (2, 320, 25, 72, 128) with 32 groups, that is 64 blocks of
2.3M elements each, far too few to fill a GPU. Here every group is cut into tiles of
[BLOCK_S spatial positions of one frame, BLOCK_D channels] and each tile is its own program:

forward   1. _partial_stats_kernel: per tile count, mean and M2 (sum of squared deviations from the
             tile's own mean: stays accurate for inputs far from zero, unlike sum of squares).
          2. _combine_stats_kernel: one program per group merges its tiles with Chan's formula
             -> mean, rstd (float32, shape (N, G)).
          3. _normalize_kernel: elementwise (x - mean) * rstd * weight + bias, optional SiLU, walking
             the tiles last to first, so that the tail of pass 1 is re-read from L2.
          x is read twice and y written once.
backward  1. _backward_partials_kernel: per tile sums of dxhat and dxhat * xhat (per group) and of
             dz * xhat and dz (per channel, for dweight and dbias); summed over tiles by torch, in a
             fixed order (deterministic: no atomics).
          2. _backward_dx_kernel: elementwise dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
             last tile first as in the forward.

Layouts: every tensor is addressed as (N, C, F, S) through its own four strides, S = H*W the merged
spatial positions of one frame (F = 1 for 4-D input). That covers contiguous, channels_last(_3d) and
the temporal resnets' permuted (B, C, F, H, W) view of (B*F, C, H, W) activations, read in place
without a copy; outputs are written in the input's suggested memory format. Tiles never cross a frame,
so no per-element division is needed. The grid is 1-D (rows x tiles), clear of the 65,535 limit of
grid dimensions 1 and 2. Loads are converted to float32 before any arithmetic (the interpreter's bf16
arithmetic is wrong; float32 is the intended accumulation precision anyway).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from svd_fast import _triton
from svd_fast.reference.group_norm import suggest_memory_format

# Elements per tile. Under the CPU interpreter the tile is tiny so that the tests' tiny tensors
# still span several tiles per group and exercise the cross-tile combination.
GPU_TILE_ELEMENTS = 4096
INTERPRETER_TILE_ELEMENTS = 64
COMBINE_BLOCK = 256


@triton.jit
def _tile_position(pid, num_groups, tiles_per_frame, tiles):
    """(row = n * num_groups + group, tile, n, group, frame, block of positions in the frame) of a program."""
    row = pid // tiles
    tile = pid % tiles
    return row, tile, row // num_groups, row % num_groups, tile // tiles_per_frame, tile % tiles_per_frame


@triton.jit
def _tile_offsets(n, group, frame, s_block, positions, stride_n, stride_c, stride_f, stride_s,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Offsets and mask of one [BLOCK_S, BLOCK_D] tile, and its channels."""
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    channel = group * D + d
    mask = (s[:, None] < positions) & (d[None, :] < D)
    offsets = (
        n * stride_n + frame * stride_f + channel[None, :].to(tl.int64) * stride_c + s[:, None].to(tl.int64) * stride_s
    )
    return offsets, mask, channel


@triton.jit
def _partial_stats_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    positions, num_groups, tiles_per_frame, tiles, x_sn, x_sc, x_sf, x_ss,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row, tile, n, group, frame, s_block = _tile_position(pid, num_groups, tiles_per_frame, tiles)
    offsets, mask, _channel = _tile_offsets(n, group, frame, s_block, positions, x_sn, x_sc, x_sf, x_ss, D, BLOCK_S, BLOCK_D)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    count = tl.sum(mask.to(tl.float32))
    # Sum deviations from the tile's maximum, not raw values: for data far from zero (SVD's norms see
    # means of 100 and more) the raw float32 sum loses the digits the mean needs; x - shift is exact.
    shift = tl.max(tl.where(mask, x, float("-inf")))
    mean = shift + tl.sum(tl.where(mask, x - shift, 0.0)) / count
    deviation = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(deviation * deviation)
    tl.store(count_ptr + pid, count)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, m2)


@triton.jit
def _combine_stats_kernel(
    count_ptr, mean_ptr, m2_ptr, mean_out_ptr, rstd_out_ptr,
    num_tiles, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    # Tile means are combined as deviations from the first one, for the accuracy reason of the partial sums.
    shift = tl.load(mean_ptr + row * num_tiles)
    total_count = 0.0
    total_mean = shift
    total_m2 = 0.0
    for start in range(0, num_tiles, BLOCK):
        index = start + tl.arange(0, BLOCK)
        valid = index < num_tiles
        count = tl.load(count_ptr + row * num_tiles + index, mask=valid, other=0.0)
        mean = tl.load(mean_ptr + row * num_tiles + index, mask=valid, other=0.0)
        m2 = tl.load(m2_ptr + row * num_tiles + index, mask=valid, other=0.0)
        # Merge this block of tiles among themselves, then into the running total (Chan et al.).
        block_count = tl.sum(count)
        block_mean = shift + tl.sum(count * (mean - shift)) / block_count
        spread = tl.where(valid, mean - block_mean, 0.0)
        block_m2 = tl.sum(m2) + tl.sum(count * spread * spread)
        merged_count = total_count + block_count
        delta = block_mean - total_mean
        total_mean = total_mean + delta * (block_count / merged_count)
        total_m2 = total_m2 + block_m2 + delta * delta * (total_count * block_count / merged_count)
        total_count = merged_count
    variance = total_m2 / total_count
    tl.store(mean_out_ptr + row, total_mean)
    tl.store(rstd_out_ptr + row, 1.0 / tl.sqrt(variance + eps))


@triton.jit
def _reversed_program_id():
    """Tile of a second pass over x, walking the tiles last to first: the first pass ended on the last tiles,
    which are still in L2 when the second pass starts (up to the L2's size of the re-read comes from cache)."""
    return (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)


@triton.jit
def _normalize_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    positions, num_groups, tiles_per_frame, tiles, x_sn, x_sc, x_sf, x_ss, y_sn, y_sc, y_sf, y_ss,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = _reversed_program_id()
    row, _tile, n, group, frame, s_block = _tile_position(pid, num_groups, tiles_per_frame, tiles)
    offsets, mask, channel = _tile_offsets(n, group, frame, s_block, positions, x_sn, x_sc, x_sf, x_ss, D, BLOCK_S, BLOCK_D)
    y_offsets, _mask, _channel = _tile_offsets(n, group, frame, s_block, positions, y_sn, y_sc, y_sf, y_ss, D, BLOCK_S, BLOCK_D)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    # Padding lanes get 0, not (0 - mean) * rstd, which for off-centre data overflows exp() in SiLU.
    z = tl.where(mask, (x - mean) * rstd, 0.0)
    channel_valid = tl.arange(0, BLOCK_D) < D
    if HAS_WEIGHT:
        z = z * tl.load(weight_ptr + channel, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + channel, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + y_offsets, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_before_affine(dy_ptr, offsets, mask, xhat, weight, bias,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):  # fmt: skip
    """dz (gradient w.r.t. the affine output z, recomputing z; equals dy without SiLU) and dxhat."""
    dz = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        z = xhat
        if HAS_WEIGHT:
            z = z * weight
        if HAS_BIAS:
            z = z + bias
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    dz = tl.where(mask, dz, 0.0)
    dxhat = dz
    if HAS_WEIGHT:
        dxhat = dz * weight
    return dz, dxhat


@triton.jit
def _load_affine(weight_ptr, bias_ptr, channel, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 D: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    channel_valid = tl.arange(0, BLOCK_D) < D
    weight = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    bias = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + channel, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel, mask=channel_valid, other=0.0).to(tl.float32)[None, :]
    return weight, bias


@triton.jit
def _backward_partials_kernel(
    dy_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    sum_dxhat_ptr, sum_dxhat_xhat_ptr, dweight_ptr, dbias_ptr,
    positions, num_groups, tiles_per_frame, tiles, channels,
    x_sn, x_sc, x_sf, x_ss, dy_sn, dy_sc, dy_sf, dy_ss,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row, tile, n, group, frame, s_block = _tile_position(pid, num_groups, tiles_per_frame, tiles)
    offsets, mask, channel = _tile_offsets(n, group, frame, s_block, positions, x_sn, x_sc, x_sf, x_ss, D, BLOCK_S, BLOCK_D)
    dy_offsets, _mask, _channel = _tile_offsets(n, group, frame, s_block, positions, dy_sn, dy_sc, dy_sf, dy_ss, D, BLOCK_S, BLOCK_D)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    weight, bias = _load_affine(weight_ptr, bias_ptr, channel, HAS_WEIGHT, HAS_BIAS, D, BLOCK_D)
    dz, dxhat = _grad_before_affine(dy_ptr, dy_offsets, mask, xhat, weight, bias, HAS_WEIGHT, HAS_BIAS, SILU)
    tl.store(sum_dxhat_ptr + pid, tl.sum(dxhat))
    tl.store(sum_dxhat_xhat_ptr + pid, tl.sum(dxhat * xhat))
    # Per-channel partials laid out (N, tiles, C): summed over N and tiles afterwards.
    channel_out = (n * tiles + tile) * channels + channel
    channel_valid = tl.arange(0, BLOCK_D) < D
    tl.store(dweight_ptr + channel_out, tl.sum(dz * xhat, axis=0), mask=channel_valid)
    tl.store(dbias_ptr + channel_out, tl.sum(dz, axis=0), mask=channel_valid)


@triton.jit
def _backward_dx_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, mean_dxhat_ptr, mean_dxhat_xhat_ptr,
    positions, num_groups, tiles_per_frame, tiles,
    x_sn, x_sc, x_sf, x_ss, dy_sn, dy_sc, dy_sf, dy_ss, dx_sn, dx_sc, dx_sf, dx_ss,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = _reversed_program_id()
    row, _tile, n, group, frame, s_block = _tile_position(pid, num_groups, tiles_per_frame, tiles)
    offsets, mask, channel = _tile_offsets(n, group, frame, s_block, positions, x_sn, x_sc, x_sf, x_ss, D, BLOCK_S, BLOCK_D)
    dy_offsets, _mask, _channel = _tile_offsets(n, group, frame, s_block, positions, dy_sn, dy_sc, dy_sf, dy_ss, D, BLOCK_S, BLOCK_D)
    dx_offsets, _mask, _channel = _tile_offsets(n, group, frame, s_block, positions, dx_sn, dx_sc, dx_sf, dx_ss, D, BLOCK_S, BLOCK_D)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    weight, bias = _load_affine(weight_ptr, bias_ptr, channel, HAS_WEIGHT, HAS_BIAS, D, BLOCK_D)
    _dz, dxhat = _grad_before_affine(dy_ptr, dy_offsets, mask, xhat, weight, bias, HAS_WEIGHT, HAS_BIAS, SILU)
    mean_dxhat = tl.load(mean_dxhat_ptr + row)
    mean_dxhat_xhat = tl.load(mean_dxhat_xhat_ptr + row)
    dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Tile shape and 1-D grid of one call, a pure function of the shape (see :func:`launch_plan`)."""

    frames: int
    positions: int  # H*W: spatial positions of one frame
    channels_per_group: int
    block_s: int
    block_d: int
    tiles_per_frame: int
    tiles: int  # per (sample, group)
    grid: tuple[int]


_tile_override: contextvars.ContextVar[int | None] = contextvars.ContextVar("tile_override", default=None)


@contextlib.contextmanager
def launch_plan_override(tile_elements: int) -> Iterator[None]:
    """Inside the block, every launch uses tiles of ``tile_elements`` elements (bench/gpu_check.py times
    launch-plan variants this way)."""
    if tile_elements < 1 or tile_elements & (tile_elements - 1):
        raise ValueError(f"tile_elements must be a power of two >= 1, got {tile_elements}")
    token = _tile_override.set(tile_elements)
    try:
        yield
    finally:
        _tile_override.reset(token)


def launch_plan(shape: tuple[int, ...], num_groups: int, interpreter: bool = False) -> LaunchPlan:
    """Tiles for x of ``shape`` (N, C, H, W) or (N, C, F, H, W). The tile holds GPU_TILE_ELEMENTS (fewer
    under the interpreter; :func:`launch_plan_override` replaces either); neither the dtype, the strides nor
    the compute capability change the choice."""
    batch, channels = shape[0], shape[1]
    frames = shape[2] if len(shape) == 5 else 1
    positions = shape[-1] * shape[-2]
    channels_per_group = channels // num_groups
    tile_elements = _tile_override.get() or (INTERPRETER_TILE_ELEMENTS if interpreter else GPU_TILE_ELEMENTS)
    block_d = triton.next_power_of_2(channels_per_group)
    block_s = max(1, min(triton.next_power_of_2(positions), tile_elements // block_d))
    tiles_per_frame = triton.cdiv(positions, block_s)
    tiles = frames * tiles_per_frame
    return LaunchPlan(frames, positions, channels_per_group, block_s, block_d, tiles_per_frame, tiles, (batch * num_groups * tiles,))


def layout_strides(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(N, C, F, S) element strides of ``t`` with S = the merged H*W, or None when H and W cannot merge."""
    if t.dim() == 4:
        stride_n, stride_c, stride_h, stride_w = t.stride()
        stride_f = 0
    else:
        stride_n, stride_c, stride_f, stride_h, stride_w = t.stride()
    height, width = t.shape[-2:]
    if height > 1 and width > 1 and stride_h != width * stride_w:
        return None
    return stride_n, stride_c, stride_f, (stride_w if width > 1 else stride_h)


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its H and W merge into one strided axis (every layout torch and SVD produce), else a copy."""
    return t if layout_strides(t) is not None else t.contiguous(memory_format=suggest_memory_format(t))


def _plan_kwargs(plan: LaunchPlan) -> dict[str, int]:
    return {"D": plan.channels_per_group, "BLOCK_S": plan.block_s, "BLOCK_D": plan.block_d}


def forward(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments as checked by svd_fast.ops.group_norm; returns (y, mean, rstd), stats float32 (N, G)."""
    plan = launch_plan(tuple(x.shape), num_groups, _triton.interpreting())
    x = _readable(x)
    y = torch.empty_like(x, memory_format=suggest_memory_format(x))
    batch = x.shape[0]
    rows = batch * num_groups
    partial = torch.empty((3, rows, plan.tiles), dtype=torch.float32, device=x.device)
    count, tile_mean, tile_m2 = partial[0], partial[1], partial[2]
    walk = (plan.positions, num_groups, plan.tiles_per_frame, plan.tiles)
    _triton.launch(
        _partial_stats_kernel, plan.grid, x, count, tile_mean, tile_m2, *walk, *layout_strides(x), **_plan_kwargs(plan),
    )  # fmt: skip
    mean = torch.empty((batch, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block = min(COMBINE_BLOCK, triton.next_power_of_2(plan.tiles))
    _triton.launch(_combine_stats_kernel, (rows,), count, tile_mean, tile_m2, mean, rstd, plan.tiles, eps, BLOCK=block)
    # Unused pointer arguments get x: the kernel never reads them (constexpr branches).
    _triton.launch(
        _normalize_kernel, plan.grid,
        x, y, mean, rstd, x if weight is None else weight, x if bias is None else bias,
        *walk, *layout_strides(x), *layout_strides(y),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, **_plan_kwargs(plan),
    )  # fmt: skip
    return y, mean, rstd


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
    """Gradients of forward(): (dx, dweight, dbias); dweight/dbias have shape (C,) in weight's (else x's) dtype."""
    plan = launch_plan(tuple(x.shape), num_groups, _triton.interpreting())
    x, grad_output = _readable(x), _readable(grad_output)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    batch, channels = x.shape[0], x.shape[1]
    rows = batch * num_groups
    group_partials = torch.empty((2, rows, plan.tiles), dtype=torch.float32, device=x.device)
    channel_partials = torch.empty((2, batch, plan.tiles, channels), dtype=torch.float32, device=x.device)
    weight_arg = x if weight is None else weight
    bias_arg = x if bias is None else bias
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "SILU": silu}
    walk = (plan.positions, num_groups, plan.tiles_per_frame, plan.tiles)
    _triton.launch(
        _backward_partials_kernel, plan.grid,
        grad_output, x, mean, rstd, weight_arg, bias_arg,
        group_partials[0], group_partials[1], channel_partials[0], channel_partials[1],
        *walk, channels, *layout_strides(x), *layout_strides(grad_output),
        **flags, **_plan_kwargs(plan),
    )  # fmt: skip
    group_count = plan.channels_per_group * plan.frames * plan.positions
    mean_dxhat, mean_dxhat_xhat = (group_partials.sum(dim=2) / group_count).unbind(0)
    grad_x = torch.empty_like(x, memory_format=suggest_memory_format(x))
    _triton.launch(
        _backward_dx_kernel, plan.grid,
        grad_output, x, grad_x, mean, rstd, weight_arg, bias_arg, mean_dxhat, mean_dxhat_xhat,
        *walk, *layout_strides(x), *layout_strides(grad_output), *layout_strides(grad_x),
        **flags, **_plan_kwargs(plan),
    )  # fmt: skip
    param_dtype = x.dtype if weight is None else weight.dtype
    # Separate sums, not views of one tensor: custom-op outputs must not alias each other.
    grad_weight = channel_partials[0].sum(dim=(0, 1)).to(param_dtype)
    grad_bias = channel_partials[1].sum(dim=(0, 1)).to(param_dtype)
    return grad_x, grad_weight, grad_bias
