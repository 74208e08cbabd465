"""Triton kernels of GroupNorm(+SiLU): a two-pass plan with each group's reduction split across many programs,
and a one-pass plan that holds a whole group in one program's registers.

Layouts: every tensor is addressed as (N, C, F, S) through its own four strides, S = H*W the merged spatial
positions of one frame (F = 1 for 4-D input). That covers contiguous, channels_last(_3d) and the temporal
resnets' permuted (B, C, F, H, W) view of (B*F, C, H, W) activations, read in place without a copy; outputs
are written in the input's suggested memory format. Loads are converted to float32 before any arithmetic
(the interpreter's bf16 arithmetic is wrong; float32 is the intended accumulation precision anyway).

Two-pass (x read twice, y written once: 3N bytes). A tile is [BLOCK_G groups, BLOCK_C channels of each,
BLOCK_S positions of one frame], each size a power of two that DIVIDES its axis (32 groups; D = C / 32 =
10, 20, 40, ... channels per group; H*W = 9*16 * 4^k at every SVD latent level), so at SVD's shapes no lane
is padding: D = 10 is covered by 5 tiles of 2 channels, not one tile of 16 lanes with 6 idle. Where H*W has
a small power-of-two factor (odd sizes), BLOCK_S covers the frame's positions with a masked tail (EVEN_S
false). The grid is 1-D (programs = N x group blocks x tiles), clear of the 65,535 limit of grid
dimensions 1 and 2; tiles never cross a frame, so no per-element division is needed.

forward   1. _partial_stats_kernel: per (group, tile) count, mean and M2 (squared deviations from the tile's
             own mean: accurate for inputs far from zero, unlike a sum of squares).
          2. _combine_stats_kernel: one program per group merges its tiles with Chan's formula -> mean, rstd
             (float32, shape (N, G)).
          3. _normalize_kernel: (x - mean) * rstd * weight + bias, optional SiLU, walking the programs last to
             first, so that the tail of pass 1 is re-read from L2.
backward  svd_fast.triton.group_norm_backward, on the same tiles (always two-pass).

One-pass (x read once, y written once: 2N bytes; one launch instead of three). _one_pass_kernel: one program
per (sample, group) loads the group into registers, reduces it and writes y from the same registers. It
applies where the group fits the register budget (ONE_PASS_MAX_ELEMENTS, padded to a power of two: the
deep UNet levels, e.g. 40 channels x 9*16 positions) and there are enough groups to fill the GPU; larger
groups would spill to local memory, which is memory traffic again.
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

# Elements per two-pass tile. Under the CPU interpreter the tile is tiny so that the tests' tiny tensors
# still span several tiles per group and exercise the cross-tile combination.
GPU_TILE_ELEMENTS = 4096
INTERPRETER_TILE_ELEMENTS = 64
# Below this power-of-two factor of H*W, a tile spans the frame's positions with a masked tail instead.
MIN_EVEN_BLOCK_S = 16
COMBINE_BLOCK = 256
# The one-pass program holds its group as ONE_PASS_ELEMENTS_PER_THREAD float32 values per thread (64 data
# registers of at most 255), with up to 16 warps: groups up to 32,768 elements once padded to a power of two.
ONE_PASS_ELEMENTS_PER_THREAD = 64
ONE_PASS_MAX_ELEMENTS = 32768
# One-pass programs are whole groups: with fewer groups than 2 per SM of an H100/H200 (132 SMs) the split
# reduction of the two-pass plan fills the GPU better.
ONE_PASS_MIN_GROUPS = 264
INTERPRETER_ONE_PASS_MAX_ELEMENTS = 64


@triton.jit
def _tile_position(pid, group_blocks, channel_blocks, s_blocks, tiles):
    """(n, group block, tile of those groups, frame, channel block, position block) of a program."""
    tile = pid % tiles
    rest = pid // tiles
    frame_channel = tile // s_blocks
    return rest // group_blocks, rest % group_blocks, tile, frame_channel // channel_blocks, frame_channel % channel_blocks, tile % s_blocks


@triton.jit
def _tile_offsets(n, g_block, frame, c_block, s_block, stride_n, stride_c, stride_f, stride_s,
                  D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """Offsets of one [BLOCK_G, BLOCK_C, BLOCK_S] tile, its groups [BLOCK_G], channels [BLOCK_G, BLOCK_C]
    and positions [BLOCK_S]."""
    group = g_block * BLOCK_G + tl.arange(0, BLOCK_G)
    channel = group[:, None] * D + (c_block * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    offsets = (
        n * stride_n + frame * stride_f
        + channel[:, :, None].to(tl.int64) * stride_c + s[None, None, :].to(tl.int64) * stride_s
    )  # fmt: skip
    return offsets, group, channel, s


@triton.jit
def _load_tile(ptr, offsets, s, positions, EVEN_S: tl.constexpr):
    if EVEN_S:
        return tl.load(ptr + offsets).to(tl.float32)
    return tl.load(ptr + offsets, mask=s[None, None, :] < positions, other=0.0).to(tl.float32)


@triton.jit
def _sum2(x):
    """Sum of a [G, C, S] tile over its last two axes -> [G]."""
    return tl.sum(tl.sum(x, axis=2), axis=1)


@triton.jit
def _partial_stats_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    positions, num_groups, group_blocks, channel_blocks, s_blocks, tiles, x_sn, x_sc, x_sf, x_ss,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, EVEN_S: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    n, g_block, tile, frame, c_block, s_block = _tile_position(pid, group_blocks, channel_blocks, s_blocks, tiles)
    offsets, group, _channel, s = _tile_offsets(n, g_block, frame, c_block, s_block, x_sn, x_sc, x_sf, x_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    x = _load_tile(x_ptr, offsets, s, positions, EVEN_S)
    # Sum deviations from the tile's maximum, not raw values: for data far from zero (SVD's norms see
    # means of 100 and more) the raw float32 sum loses the digits the mean needs; x - shift is exact.
    if EVEN_S:
        count = BLOCK_C * BLOCK_S + tl.zeros([BLOCK_G], dtype=tl.float32)
        shift = tl.max(tl.max(x, axis=2), axis=1)
        mean = shift + _sum2(x - shift[:, None, None]) / count
        deviation = x - mean[:, None, None]
    else:
        valid = (s < positions)[None, None, :]
        count = BLOCK_C * tl.sum(valid.to(tl.float32)) + tl.zeros([BLOCK_G], dtype=tl.float32)
        shift = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=2), axis=1)
        mean = shift + _sum2(tl.where(valid, x - shift[:, None, None], 0.0)) / count
        deviation = tl.where(valid, x - mean[:, None, None], 0.0)
    slot = (n * num_groups + group) * tiles + tile
    tl.store(count_ptr + slot, count)
    tl.store(mean_ptr + slot, mean)
    tl.store(m2_ptr + slot, _sum2(deviation * deviation))


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
def _affine_silu(z, weight_ptr, bias_ptr, channel, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """weight[channel] * z + bias[channel], optional SiLU; ``channel`` broadcasts against z."""
    if HAS_WEIGHT:
        z = z * tl.load(weight_ptr + channel).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + channel).to(tl.float32)
    if SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _normalize_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    positions, num_groups, group_blocks, channel_blocks, s_blocks, tiles,
    x_sn, x_sc, x_sf, x_ss, y_sn, y_sc, y_sf, y_ss,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, EVEN_S: tl.constexpr,
):  # fmt: skip
    pid = _reversed_program_id()
    n, g_block, _tile, frame, c_block, s_block = _tile_position(pid, group_blocks, channel_blocks, s_blocks, tiles)
    offsets, group, channel, s = _tile_offsets(n, g_block, frame, c_block, s_block, x_sn, x_sc, x_sf, x_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    y_offsets, _group, _channel, _s = _tile_offsets(n, g_block, frame, c_block, s_block, y_sn, y_sc, y_sf, y_ss, D, BLOCK_G, BLOCK_C, BLOCK_S)
    x = _load_tile(x_ptr, offsets, s, positions, EVEN_S)
    mean = tl.load(mean_ptr + n * num_groups + group)
    rstd = tl.load(rstd_ptr + n * num_groups + group)
    xhat = (x - mean[:, None, None]) * rstd[:, None, None]
    if EVEN_S:
        z = _affine_silu(xhat, weight_ptr, bias_ptr, channel[:, :, None], HAS_WEIGHT, HAS_BIAS, SILU)
        tl.store(y_ptr + y_offsets, z.to(y_ptr.dtype.element_ty))
    else:
        valid = (s < positions)[None, None, :]
        # Padding lanes get 0, not (0 - mean) * rstd, which for off-centre data overflows exp() in SiLU.
        z = _affine_silu(tl.where(valid, xhat, 0.0), weight_ptr, bias_ptr, channel[:, :, None], HAS_WEIGHT, HAS_BIAS, SILU)
        tl.store(y_ptr + y_offsets, z.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _one_pass_kernel(
    x_ptr, y_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr,
    num_groups, eps, x_sn, x_sc, x_sf, x_ss, y_sn, y_sc, y_sf, y_ss,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, X_PLANAR: tl.constexpr, Y_PLANAR: tl.constexpr,
    D: tl.constexpr, FRAMES: tl.constexpr, POSITIONS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n = row // num_groups
    group = row % num_groups
    # Element i of the group: frame i // (D * POSITIONS), channel (i // POSITIONS) % D, position i % POSITIONS
    # (divisions by compile-time constants: multiply and shift).
    GROUP_SIZE: tl.constexpr = D * FRAMES * POSITIONS
    i = tl.arange(0, BLOCK)
    valid = i < GROUP_SIZE
    frame = i // (D * POSITIONS)
    c = (i // POSITIONS) % D
    s = i % POSITIONS
    channel = group * D + c
    x_base = n * x_sn + group * D * x_sc
    y_base = n * y_sn + group * D * y_sc
    # Planar 4-D (channel stride = H*W x position stride): the group is one run at a fixed stride, and offsets
    # linear in i let the compiler vectorise the loads and stores.
    if X_PLANAR:
        x_offsets = x_base + i * x_ss
    else:
        x_offsets = x_base + frame.to(tl.int64) * x_sf + c.to(tl.int64) * x_sc + s.to(tl.int64) * x_ss
    if Y_PLANAR:
        y_offsets = y_base + i * y_ss
    else:
        y_offsets = y_base + frame.to(tl.int64) * y_sf + c.to(tl.int64) * y_sc + s.to(tl.int64) * y_ss
    x = tl.load(x_ptr + x_offsets, mask=valid, other=0.0).to(tl.float32)
    shift = tl.max(tl.where(valid, x, float("-inf")))
    mean = shift + tl.sum(tl.where(valid, x - shift, 0.0)) / GROUP_SIZE
    deviation = tl.where(valid, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(deviation * deviation) / GROUP_SIZE + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    # channel < C on every lane (c is taken modulo D): the affine loads need no mask.
    z = _affine_silu(deviation * rstd, weight_ptr, bias_ptr, channel, HAS_WEIGHT, HAS_BIAS, SILU)
    tl.store(y_ptr + y_offsets, z.to(y_ptr.dtype.element_ty), mask=valid)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How one call is cut into programs, a pure function of the shape (see :func:`launch_plan`)."""

    frames: int
    positions: int  # H*W: spatial positions of one frame
    channels_per_group: int
    one_pass: bool
    block_g: int
    block_c: int
    block_s: int
    even_s: bool  # H*W is a multiple of block_s: no masked lanes
    group_blocks: int
    channel_blocks: int
    s_blocks: int
    tiles: int  # per (sample, group) in the two-pass plan
    grid: tuple[int]
    num_warps: int

    @property
    def constexprs(self) -> dict[str, int | bool]:
        if self.one_pass:
            return {"D": self.channels_per_group, "FRAMES": self.frames, "POSITIONS": self.positions, "BLOCK": self.block_s,
                    "num_warps": self.num_warps}  # fmt: skip
        return {"D": self.channels_per_group, "BLOCK_G": self.block_g, "BLOCK_C": self.block_c, "BLOCK_S": self.block_s,
                "EVEN_S": self.even_s, "num_warps": self.num_warps}  # fmt: skip

    @property
    def idle_lane_fraction(self) -> float:
        """Share of the lanes a program computes that hold no element (padding of the power-of-two tile)."""
        if self.one_pass:
            return 1.0 - self.channels_per_group * self.frames * self.positions / self.block_s
        return 1.0 - self.positions / (self.s_blocks * self.block_s)


_plan_override: contextvars.ContextVar[tuple[int | None, bool | None]] = contextvars.ContextVar("plan_override", default=(None, None))


@contextlib.contextmanager
def launch_plan_override(tile_elements: int | None = None, one_pass: bool | None = None) -> Iterator[None]:
    """Inside the block, two-pass launches use tiles of ``tile_elements`` elements and ``one_pass`` forces
    (True, where the group fits) or forbids (False) the one-pass plan; None keeps the default choice
    (bench/gpu_check.py times launch-plan variants this way)."""
    if tile_elements is not None and (tile_elements < 1 or tile_elements & (tile_elements - 1)):
        raise ValueError(f"tile_elements must be a power of two >= 1, got {tile_elements}")
    token = _plan_override.set((tile_elements, one_pass))
    try:
        yield
    finally:
        _plan_override.reset(token)


def _power_of_two_factor(value: int) -> int:
    return value & -value


def launch_plan(shape: tuple[int, ...], num_groups: int, interpreter: bool = False, backward: bool = False) -> LaunchPlan:
    """Programs for x of ``shape`` (N, C, H, W) or (N, C, F, H, W). One-pass where the group fits
    (ONE_PASS_MAX_ELEMENTS) and there are ONE_PASS_MIN_GROUPS groups (never for the backward), else two-pass
    tiles of at most GPU_TILE_ELEMENTS (fewer under the interpreter); :func:`launch_plan_override` replaces
    either choice. Neither the dtype, the strides nor the compute capability change it."""
    # Plain ints: under torch.compile / opcheck the sizes can be SymInts, and the plan's power-of-two arithmetic
    # on them builds guard expressions that take minutes to simplify.
    shape = tuple(int(size) for size in shape)
    batch, channels = shape[0], shape[1]
    frames = shape[2] if len(shape) == 5 else 1
    positions = shape[-1] * shape[-2]
    per_group = channels // num_groups
    tile_override, one_pass_override = _plan_override.get()
    one_pass_block = triton.next_power_of_2(per_group * frames * positions)
    fits = one_pass_block <= (INTERPRETER_ONE_PASS_MAX_ELEMENTS if interpreter else ONE_PASS_MAX_ELEMENTS)
    enough_groups = interpreter or batch * num_groups >= ONE_PASS_MIN_GROUPS
    if not backward and fits and (one_pass_override if one_pass_override is not None else enough_groups):
        warps = max(1, min(16, one_pass_block // (32 * ONE_PASS_ELEMENTS_PER_THREAD)))
        return LaunchPlan(frames, positions, per_group, True, 1, per_group, one_pass_block, False, num_groups, 1, 1, 1,
                          (batch * num_groups,), warps)  # fmt: skip
    tile = tile_override or (INTERPRETER_TILE_ELEMENTS if interpreter else GPU_TILE_ELEMENTS)
    s_factor = _power_of_two_factor(positions)
    even_s = s_factor >= min(MIN_EVEN_BLOCK_S, positions)
    block_s = min(tile, s_factor if even_s else triton.next_power_of_2(positions))
    block_c = min(_power_of_two_factor(per_group), max(1, tile // block_s))
    block_g = min(_power_of_two_factor(num_groups), max(1, tile // (block_s * block_c)))
    s_blocks = triton.cdiv(positions, block_s)
    channel_blocks, group_blocks = per_group // block_c, num_groups // block_g
    tiles = frames * channel_blocks * s_blocks
    # Every lane holds elements: at least one 16-byte vector of fp16 (8 elements) per thread, at most 4 warps.
    warps = max(1, min(4, block_g * block_c * block_s // (32 * 8)))
    return LaunchPlan(frames, positions, per_group, False, block_g, block_c, block_s, even_s or positions % block_s == 0,
                      group_blocks, channel_blocks, s_blocks, tiles, (batch * group_blocks * tiles,), warps)  # fmt: skip


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


def readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its H and W merge into one strided axis (every layout torch and SVD produce), else a copy."""
    return t if layout_strides(t) is not None else t.contiguous(memory_format=suggest_memory_format(t))


def walk(plan: LaunchPlan) -> tuple[int, ...]:
    """The two-pass kernels' position arguments after ``positions, num_groups``."""
    return plan.group_blocks, plan.channel_blocks, plan.s_blocks, plan.tiles


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
    x = readable(x)
    y = torch.empty_like(x, memory_format=suggest_memory_format(x))
    batch = x.shape[0]
    rows = batch * num_groups
    mean = torch.empty((batch, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    # Unused pointer arguments get x: the kernels never read them (constexpr branches).
    affine = (x if weight is None else weight, x if bias is None else bias)
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None, "SILU": silu}
    if plan.one_pass:
        planar = {f"{name}_PLANAR": plan.frames == 1 and strides[1] == plan.positions * strides[3]
                  for name, strides in (("X", layout_strides(x)), ("Y", layout_strides(y)))}  # fmt: skip
        _triton.launch(
            _one_pass_kernel, plan.grid, x, y, mean, rstd, *affine, num_groups, eps, *layout_strides(x), *layout_strides(y),
            **flags, **planar, **plan.constexprs,
        )  # fmt: skip
        return y, mean, rstd
    partial = torch.empty((3, rows, plan.tiles), dtype=torch.float32, device=x.device)
    count, tile_mean, tile_m2 = partial[0], partial[1], partial[2]
    _triton.launch(
        _partial_stats_kernel, plan.grid, x, count, tile_mean, tile_m2, plan.positions, num_groups, *walk(plan),
        *layout_strides(x), **plan.constexprs,
    )  # fmt: skip
    block = min(COMBINE_BLOCK, triton.next_power_of_2(plan.tiles))
    _triton.launch(_combine_stats_kernel, (rows,), count, tile_mean, tile_m2, mean, rstd, plan.tiles, eps, BLOCK=block)
    _triton.launch(
        _normalize_kernel, plan.grid, x, y, mean, rstd, *affine, plan.positions, num_groups, *walk(plan),
        *layout_strides(x), *layout_strides(y), **flags, **plan.constexprs,
    )  # fmt: skip
    return y, mean, rstd

