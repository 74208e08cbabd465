"""Triton kernels of GroupNorm(+SiLU) with each group's reduction split across many programs.

PyTorch (and a one-program-per-group kernel) reduces a whole (sample, group) in one block: for
SVD's temporal norms, e.g. x of shape (2, 320, 25, 72, 128) with 32 groups, that is 64 blocks of
2.3M elements each, far too few to fill a GPU. Here every group is cut into tiles of
[BLOCK_S spatial positions, BLOCK_D channels] and each tile is its own program:

forward   1. _partial_stats_kernel: per tile count, mean and M2 (sum of squared deviations from the
             tile's own mean: stays accurate for inputs far from zero, unlike sum of squares).
          2. _combine_stats_kernel: one program per group merges its tiles with Chan's formula
             -> mean, rstd (float32, shape (N, G)).
          3. _normalize_kernel: elementwise (x - mean) * rstd * weight + bias, optional SiLU.
backward  1. _backward_partials_kernel: per tile sums of dxhat and dxhat * xhat (per group) and of
             dz * xhat and dz (per channel, for dweight and dbias); summed over tiles by torch.
          2. _backward_dx_kernel: elementwise dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).

Layouts: x is (N, C, S) contiguous or (N, S, C) channels_last(_3d); both are addressed through a
channel stride and a spatial stride, so one set of kernels serves both. Loads are converted to
float32 before any arithmetic (the interpreter's bf16 arithmetic is wrong; float32 is the intended
accumulation precision anyway).
"""

from __future__ import annotations

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
def _load_tile(ptr, n, group, tile, spatial, stride_n, stride_c, stride_s,
               D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Offsets, mask and float32 values of one [BLOCK_S, BLOCK_D] tile of group ``group`` of sample ``n``."""
    s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    channel = group * D + d
    mask = (s[:, None] < spatial) & (d[None, :] < D)
    offsets = n * stride_n + channel[None, :].to(tl.int64) * stride_c + s[:, None].to(tl.int64) * stride_s
    values = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return offsets, mask, values, channel


@triton.jit
def _partial_stats_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    spatial, num_groups, stride_n, stride_c, stride_s,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # n * num_groups + group
    tile = tl.program_id(1)
    n = (row // num_groups).to(tl.int64)
    group = row % num_groups
    _offsets, mask, x, _channel = _load_tile(
        x_ptr, n, group, tile, spatial, stride_n, stride_c, stride_s, D, BLOCK_S, BLOCK_D
    )
    count = tl.sum(mask.to(tl.float32))
    mean = tl.sum(x) / count
    deviation = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(deviation * deviation)
    out = row.to(tl.int64) * tl.num_programs(1) + tile
    tl.store(count_ptr + out, count)
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, m2)


@triton.jit
def _combine_stats_kernel(
    count_ptr, mean_ptr, m2_ptr, mean_out_ptr, rstd_out_ptr,
    num_tiles, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    total_count = 0.0
    total_mean = 0.0
    total_m2 = 0.0
    for start in range(0, num_tiles, BLOCK):
        index = start + tl.arange(0, BLOCK)
        valid = index < num_tiles
        count = tl.load(count_ptr + row * num_tiles + index, mask=valid, other=0.0)
        mean = tl.load(mean_ptr + row * num_tiles + index, mask=valid, other=0.0)
        m2 = tl.load(m2_ptr + row * num_tiles + index, mask=valid, other=0.0)
        # Merge this block of tiles among themselves, then into the running total (Chan et al.).
        block_count = tl.sum(count)
        block_mean = tl.sum(count * mean) / block_count
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
def _normalize_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    spatial, num_groups, stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    tile = tl.program_id(1)
    n = (row // num_groups).to(tl.int64)
    group = row % num_groups
    offsets, mask, x, channel = _load_tile(
        x_ptr, n, group, tile, spatial, stride_n, stride_c, stride_s, D, BLOCK_S, BLOCK_D
    )
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
    tl.store(y_ptr + offsets, z.to(y_ptr.dtype.element_ty), mask=mask)


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
    spatial, num_groups, channels, stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    tile = tl.program_id(1)
    num_tiles = tl.num_programs(1)
    n = (row // num_groups).to(tl.int64)
    group = row % num_groups
    offsets, mask, x, channel = _load_tile(
        x_ptr, n, group, tile, spatial, stride_n, stride_c, stride_s, D, BLOCK_S, BLOCK_D
    )
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    weight, bias = _load_affine(weight_ptr, bias_ptr, channel, HAS_WEIGHT, HAS_BIAS, D, BLOCK_D)
    dz, dxhat = _grad_before_affine(dy_ptr, offsets, mask, xhat, weight, bias, HAS_WEIGHT, HAS_BIAS, SILU)
    out = row.to(tl.int64) * num_tiles + tile
    tl.store(sum_dxhat_ptr + out, tl.sum(dxhat))
    tl.store(sum_dxhat_xhat_ptr + out, tl.sum(dxhat * xhat))
    # Per-channel partials laid out (N, tiles, C): summed over N and tiles afterwards.
    channel_out = (n * num_tiles + tile) * channels + channel
    channel_valid = tl.arange(0, BLOCK_D) < D
    tl.store(dweight_ptr + channel_out, tl.sum(dz * xhat, axis=0), mask=channel_valid)
    tl.store(dbias_ptr + channel_out, tl.sum(dz, axis=0), mask=channel_valid)


@triton.jit
def _backward_dx_kernel(
    dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, mean_dxhat_ptr, mean_dxhat_xhat_ptr,
    spatial, num_groups, stride_n, stride_c, stride_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    tile = tl.program_id(1)
    n = (row // num_groups).to(tl.int64)
    group = row % num_groups
    offsets, mask, x, channel = _load_tile(
        x_ptr, n, group, tile, spatial, stride_n, stride_c, stride_s, D, BLOCK_S, BLOCK_D
    )
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    weight, bias = _load_affine(weight_ptr, bias_ptr, channel, HAS_WEIGHT, HAS_BIAS, D, BLOCK_D)
    _dz, dxhat = _grad_before_affine(dy_ptr, offsets, mask, xhat, weight, bias, HAS_WEIGHT, HAS_BIAS, SILU)
    mean_dxhat = tl.load(mean_dxhat_ptr + row)
    mean_dxhat_xhat = tl.load(mean_dxhat_xhat_ptr + row)
    dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


class _Tiling:
    """Layout strides and tile shape of x viewed as (N, C, S) for one call."""

    def __init__(self, x: torch.Tensor, num_groups: int) -> None:
        self.batch, self.channels = x.shape[0], x.shape[1]
        self.spatial = x.numel() // (self.batch * self.channels)
        self.num_groups = num_groups
        self.channels_per_group = self.channels // num_groups
        self.memory_format = suggest_memory_format(x)
        channels_last = self.memory_format != torch.contiguous_format
        self.stride_n = self.channels * self.spatial
        self.stride_c = 1 if channels_last else self.spatial
        self.stride_s = self.channels if channels_last else 1
        tile_elements = INTERPRETER_TILE_ELEMENTS if _triton.interpreting() else GPU_TILE_ELEMENTS
        self.block_d = triton.next_power_of_2(self.channels_per_group)
        self.block_s = max(1, min(triton.next_power_of_2(self.spatial), tile_elements // self.block_d))
        self.num_tiles = triton.cdiv(self.spatial, self.block_s)
        self.grid = (self.batch * num_groups, self.num_tiles)

    def layout_args(self) -> tuple[int, ...]:
        return (self.spatial, self.num_groups, self.stride_n, self.stride_c, self.stride_s)

    def block_kwargs(self) -> dict[str, int]:
        return {"D": self.channels_per_group, "BLOCK_S": self.block_s, "BLOCK_D": self.block_d}


def forward(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arguments as checked by svd_fast.ops.group_norm; returns (y, mean, rstd), stats float32 (N, G)."""
    tiling = _Tiling(x, num_groups)
    x = x.contiguous(memory_format=tiling.memory_format)
    y = torch.empty_like(x, memory_format=tiling.memory_format)
    rows = tiling.batch * num_groups
    partial = torch.empty((3, rows, tiling.num_tiles), dtype=torch.float32, device=x.device)
    count, tile_mean, tile_m2 = partial[0], partial[1], partial[2]
    _triton.launch(
        _partial_stats_kernel, tiling.grid, x, count, tile_mean, tile_m2, *tiling.layout_args(),
        **tiling.block_kwargs(),
    )  # fmt: skip
    mean = torch.empty((tiling.batch, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block = min(COMBINE_BLOCK, triton.next_power_of_2(tiling.num_tiles))
    _triton.launch(
        _combine_stats_kernel, (rows,), count, tile_mean, tile_m2, mean, rstd, tiling.num_tiles, eps, BLOCK=block
    )
    # Unused pointer arguments get x: the kernel never reads them (constexpr branches).
    _triton.launch(
        _normalize_kernel, tiling.grid,
        x, y, mean, rstd, x if weight is None else weight, x if bias is None else bias, *tiling.layout_args(),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, **tiling.block_kwargs(),
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
    tiling = _Tiling(x, num_groups)
    x = x.contiguous(memory_format=tiling.memory_format)
    grad_output = grad_output.contiguous(memory_format=tiling.memory_format)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    rows = tiling.batch * num_groups
    group_partials = torch.empty((2, rows, tiling.num_tiles), dtype=torch.float32, device=x.device)
    channel_partials = torch.empty(
        (2, tiling.batch, tiling.num_tiles, tiling.channels), dtype=torch.float32, device=x.device
    )
    weight_arg = x if weight is None else weight
    bias_arg = x if bias is None else bias
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "SILU": silu}
    _triton.launch(
        _backward_partials_kernel, tiling.grid,
        grad_output, x, mean, rstd, weight_arg, bias_arg,
        group_partials[0], group_partials[1], channel_partials[0], channel_partials[1],
        tiling.spatial, num_groups, tiling.channels, tiling.stride_n, tiling.stride_c, tiling.stride_s,
        **flags, **tiling.block_kwargs(),
    )  # fmt: skip
    group_count = tiling.channels_per_group * tiling.spatial
    mean_dxhat, mean_dxhat_xhat = (group_partials.sum(dim=2) / group_count).unbind(0)
    grad_x = torch.empty_like(x, memory_format=tiling.memory_format)
    _triton.launch(
        _backward_dx_kernel, tiling.grid,
        grad_output, x, grad_x, mean, rstd, weight_arg, bias_arg, mean_dxhat, mean_dxhat_xhat,
        *tiling.layout_args(), **flags, **tiling.block_kwargs(),
    )  # fmt: skip
    param_dtype = x.dtype if weight is None else weight.dtype
    # Separate sums, not views of one tensor: custom-op outputs must not alias each other.
    grad_weight = channel_partials[0].sum(dim=(0, 1)).to(param_dtype)
    grad_bias = channel_partials[1].sum(dim=(0, 1)).to(param_dtype)
    return grad_x, grad_weight, grad_bias
