"""Triton kernels of the fused temporal attention (forward and flash-style backward) and their launchers.

Same contract as the C++ kernels (csrc/temporal_attention.cpp); ground truth: svd_fast.reference.temporal_attention.
q, k, v are (B*F, S, H*D) with row b*F + f; each position (b, s, h) attends over its F frames. F is small
(<= MAX_FRAMES), so one program owns ALL frames of a block of BLOCK_P consecutive flattened positions
p = s*H + h of one video b: it reads q/k/v once and writes out (+ lse) once, and in the backward it can
compute every gradient of its positions without atomics. Consecutive p are consecutive D-sized chunks of
a row in the usual layout, so each frame's [BLOCK_P, D] slice is one coalesced run of memory.

Tiles are [BLOCK_P, F_PAD, D_PAD] (frames and head_dim padded to powers of two of at least 16, tl.dot's
smallest operand; masked: padded frames are never loaded). Both kernels load their tiles once and compute
every product as a batched matrix product with float32 accumulation: the forward's scores and output with
an exact softmax, the backward's scores (probabilities recomputed exactly from the saved log-sum-exp),
grad_v, grad_prob, grad_q and grad_k, each gradient stored once.
Grid: 1-D, B * cdiv(S*H, BLOCK_P) programs (grid dim 0 allows 2^31 - 1; dims 1 and 2 only 65,535).
All offsets are int64. float16 multiplies natively (probabilities and their gradients rounded to float16
for the products, as flash-attention does); bfloat16 and float32 are converted to float32 before any
arithmetic (the interpreter's bfloat16 arithmetic is wrong; bfloat16 values are exact in TF32), float32
products in IEEE precision.
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

# Limits the public op checks before choosing this backend.
MAX_FRAMES = 64
MAX_HEAD_DIM = 128

# Launch plan: one position per warp (BLOCK_P == num_warps). Triton 3.6 lays a 3-D tl.dot out with all warps
# on the BLOCK_P axis: with fewer positions than warps every warp computes the whole product (4x the tensor-core
# work at F=25 with (BLOCK_P, warps) = (1, 4), 8x in the backward at (1, 8)); Triton 3.9 splits the frame axis
# instead but repeats 1.5x at F=14 with (1, 4). With (2, 2) neither version repeats any product (HMMA per
# position = what the padded products need), and at SVD-XT shapes (F=25 -> 32, D=64) 18 positions stay resident
# per SM in the forward (106 registers under both) and 8 in the backward (206 registers under 3.9, 255 under
# 3.6, no spills); bench/kernel_report.py and tests/test_triton_aot.py check both versions.
POSITIONS_PER_PROGRAM = 2
# One warp's [F_PAD, D_PAD] share at most: larger positions (F > 32 or D > 64, not SVD's) get one program of
# several warps each, so that no warp holds more than the compiled SVD-XT tile.
WARP_TILE_ELEMENTS = 2048
MAX_WARPS = 8
# tl.dot's smallest operand dimension.
DOT_MIN = 16
# Under the CPU interpreter BLOCK_P is capped small so that the tests' tiny tensors span several blocks per video.
INTERPRETER_MAX_BLOCK_P = 4
LOG2_E = 1.4426950408889634
# Kernels may only read globals that are constexpr.
_LOG2_E = tl.constexpr(LOG2_E)
_LN_2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _frame_tile_offsets(b, p, heads, stride_row, stride_s, stride_c,
                        F: tl.constexpr, D: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
    """Offsets of the [BLOCK_P, F_PAD, D_PAD] tile of all frames of positions ``p`` of video ``b``."""
    s = p // heads
    h = p % heads
    frame = tl.arange(0, F_PAD).to(tl.int64)
    d = tl.arange(0, D_PAD).to(tl.int64)
    position_offset = s * stride_s + h * D * stride_c
    frame_offset = (b * F + frame) * stride_row
    return position_offset[:, None, None] + frame_offset[None, :, None] + (d * stride_c)[None, None, :]


@triton.jit
def _masks(position_valid, F: tl.constexpr, D: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Validity of the [BLOCK_P, F_PAD, D_PAD] tile and of a [BLOCK_P, F_PAD] statistic."""
    frame_valid = tl.arange(0, F_PAD) < F
    channel_valid = tl.arange(0, D_PAD) < D
    tile_mask = position_valid[:, None, None] & frame_valid[None, :, None] & channel_valid[None, None, :]
    stat_mask = position_valid[:, None] & frame_valid[None, :]
    return tile_mask, stat_mask


@triton.jit
def _contiguous_offsets(b, p, positions, F: tl.constexpr, D: tl.constexpr,
                        F_PAD: tl.constexpr, D_PAD: tl.constexpr):  # fmt: skip
    """Offsets of the [BLOCK_P, F_PAD, D_PAD] tile in a contiguous (B*F, S, H*D) output and of the
    [BLOCK_P, F_PAD] tile in a contiguous (B*F, S, H) statistic."""
    frame = tl.arange(0, F_PAD).to(tl.int64)
    d = tl.arange(0, D_PAD).to(tl.int64)
    stat_offsets = (b * F + frame)[None, :] * positions + p[:, None]
    tile_offsets = stat_offsets[:, :, None] * D + d[None, None, :]
    return tile_offsets, stat_offsets


@triton.jit
def _block_positions(positions, BLOCK_P: tl.constexpr):
    """(video b, flattened positions p, their validity) of this program."""
    blocks_per_video = tl.cdiv(positions, BLOCK_P)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks_per_video
    p = (pid % blocks_per_video) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    return b, p, p < positions


@triton.jit
def _dot(a, b, NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Batched a @ b with float32 accumulation. Native (float16): a float32 operand (probabilities or their
    gradients) is rounded to the other operand's float16, as flash-attention does. Otherwise both operands
    are converted to float32 (bfloat16 values are exact in TF32; float32 inputs use PRECISION="ieee")."""
    if NATIVE_DOT:
        if a.dtype == tl.float32:
            a = a.to(b.dtype)
        if b.dtype == tl.float32:
            b = b.to(a.dtype)
    else:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    positions, heads, score_scale,
    q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2,
    F: tl.constexpr, D: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Exact softmax over all F key frames at once: each program loads the q, k and v of all frames of its
    BLOCK_P positions once ([BLOCK_P, F_PAD, D_PAD] tiles, padded frames and channels masked, never loaded)
    and computes scores and output as batched matrix products with float32 accumulation."""
    b, p, position_valid = _block_positions(positions, BLOCK_P)
    tile_mask, stat_mask = _masks(position_valid, F, D, F_PAD, D_PAD)
    q = tl.load(q_ptr + _frame_tile_offsets(b, p, heads, q_s0, q_s1, q_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    k = tl.load(k_ptr + _frame_tile_offsets(b, p, heads, k_s0, k_s1, k_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    v = tl.load(v_ptr + _frame_tile_offsets(b, p, heads, v_s0, v_s1, v_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    if not NATIVE_DOT:
        # Converted once here rather than in _dot: 66 instead of 70 registers for bfloat16 on sm_90.
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    # Scores in log2 units (exp2 is the cheap instruction), scale * log2(e) applied in float32.
    score = _dot(q, tl.permute(k, (0, 2, 1)), NATIVE_DOT, PRECISION) * score_scale  # [BLOCK_P, F_PAD, F_PAD]
    key_valid = (tl.arange(0, F_PAD) < F)[None, None, :]
    score = tl.where(key_valid, score, float("-inf"))
    row_max = tl.max(score, axis=2)
    prob = tl.exp2(score - row_max[:, :, None])
    row_sum = tl.sum(prob, axis=2)
    out = _dot(prob, v, NATIVE_DOT, PRECISION) / row_sum[:, :, None]
    lse = (row_max + tl.log2(row_sum)) * _LN_2
    out_offsets, lse_offsets = _contiguous_offsets(b, p, positions, F, D, F_PAD, D_PAD)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(lse_ptr + lse_offsets, lse, mask=stat_mask)


@triton.jit
def _backward_kernel(
    do_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    positions, heads, scale,
    do_s0, do_s1, do_s2, q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, o_s0, o_s1, o_s2,
    F: tl.constexpr, D: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Gradients of all F frames of BLOCK_P positions from one load of their q, k, v, out and grad_out
    ([BLOCK_P, F_PAD, D_PAD] tiles, padded frames and channels masked, never loaded): the probabilities are
    recomputed exactly from the saved log-sum-exp, the five products are batched matrix products with
    float32 accumulation, and grad_q, grad_k, grad_v are each stored once."""
    b, p, position_valid = _block_positions(positions, BLOCK_P)
    tile_mask, stat_mask = _masks(position_valid, F, D, F_PAD, D_PAD)
    grad_offsets, lse_offsets = _contiguous_offsets(b, p, positions, F, D, F_PAD, D_PAD)
    # delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id, before q, k, v are live: out is needed for nothing else.
    grad_out = tl.load(do_ptr + _frame_tile_offsets(b, p, heads, do_s0, do_s1, do_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    out = tl.load(o_ptr + _frame_tile_offsets(b, p, heads, o_s0, o_s1, o_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), axis=2)  # [BLOCK_P, F_PAD]
    lse_log2 = tl.load(lse_ptr + lse_offsets, mask=stat_mask, other=0.0) * _LOG2_E
    q = tl.load(q_ptr + _frame_tile_offsets(b, p, heads, q_s0, q_s1, q_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    k = tl.load(k_ptr + _frame_tile_offsets(b, p, heads, k_s0, k_s1, k_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    v = tl.load(v_ptr + _frame_tile_offsets(b, p, heads, v_s0, v_s1, v_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    score = _dot(q, tl.permute(k, (0, 2, 1)), NATIVE_DOT, PRECISION) * (scale * _LOG2_E)  # log2 units
    # Padded key frames (k = 0) score 0 and would get exp2(-lse), which overflows to inf where every real score
    # is far below zero (inf * 0 = NaN in grad_q). Padded query frames need no mask: their grad_out is zero,
    # so they add nothing to any gradient.
    key_valid = (tl.arange(0, F_PAD) < F)[None, None, :]
    prob = tl.where(key_valid, tl.exp2(score - lse_log2[:, :, None]), 0.0)  # P[:, i, j]
    grad_v = _dot(tl.permute(prob, (0, 2, 1)), grad_out, NATIVE_DOT, PRECISION)
    grad_prob = _dot(grad_out, tl.permute(v, (0, 2, 1)), NATIVE_DOT, PRECISION)
    grad_score = prob * (grad_prob - delta[:, :, None])
    grad_q = _dot(grad_score, k, NATIVE_DOT, PRECISION) * scale
    grad_k = _dot(tl.permute(grad_score, (0, 2, 1)), q, NATIVE_DOT, PRECISION) * scale
    tl.store(dq_ptr + grad_offsets, grad_q.to(dq_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dk_ptr + grad_offsets, grad_k.to(dk_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dv_ptr + grad_offsets, grad_v.to(dv_ptr.dtype.element_ty), mask=tile_mask)


def _kernel_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the kernels store. The interpreter converts float32 to bfloat16 by truncation (a GPU rounds to
    nearest even), which doubles the output error: under the interpreter bfloat16 results are stored as
    float32 and rounded by torch, so that CPU tests see what the GPU kernel writes."""
    if _triton.interpreting() and dtype == torch.bfloat16:
        return torch.float32
    return dtype


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Tile shape, warps and 1-D grid of one call (see :func:`launch_plan`)."""

    batch: int
    positions: int  # S * H per video
    frames: int
    head_dim: int
    frames_pad: int
    head_dim_pad: int
    block_p: int
    num_warps: int
    grid: tuple[int]

    def kwargs(self, interpreter: bool) -> dict[str, int]:
        launch_kwargs = {
            "F": self.frames, "D": self.head_dim, "F_PAD": self.frames_pad, "D_PAD": self.head_dim_pad,
            "BLOCK_P": self.block_p,
        }  # fmt: skip
        if not interpreter:
            launch_kwargs["num_warps"] = self.num_warps
        return launch_kwargs


_plan_override: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("plan_override", default=None)


@contextlib.contextmanager
def launch_plan_override(block_p: int, num_warps: int) -> Iterator[None]:
    """Inside the block, forward and backward launch ``block_p`` positions per program with ``num_warps``
    warps (bench/gpu_check.py times launch-plan variants this way)."""
    if block_p < 1 or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of two >= 1, got {block_p}")
    if num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two >= 1, got {num_warps}")
    token = _plan_override.set((block_p, num_warps))
    try:
        yield
    finally:
        _plan_override.reset(token)


def launch_plan(
    q_shape: tuple[int, int, int], num_frames: int, num_heads: int, backward: bool = False, interpreter: bool = False
) -> LaunchPlan:
    """Blocking of the forward (or backward) kernel for q of ``q_shape`` (B*F, S, H*D). The batched matrix
    products need every dimension >= 16, so frames and head channels are padded to at least 16 (padded
    frames are masked, never loaded). One position per warp where a position's tile fits one warp (see
    POSITIONS_PER_PROGRAM), else one position per program; :func:`launch_plan_override` replaces the choice.
    Neither the dtype, the strides nor the compute capability change it."""
    batch = q_shape[0] // num_frames
    positions = q_shape[1] * num_heads
    head_dim = q_shape[2] // num_heads
    frames_pad = max(DOT_MIN, triton.next_power_of_2(num_frames))
    head_dim_pad = max(DOT_MIN, triton.next_power_of_2(head_dim))
    warps_per_position = triton.cdiv(frames_pad * head_dim_pad, WARP_TILE_ELEMENTS)
    if warps_per_position == 1:
        block_p = num_warps = POSITIONS_PER_PROGRAM
    else:
        block_p, num_warps = 1, min(MAX_WARPS, warps_per_position)
    if interpreter:
        block_p = INTERPRETER_MAX_BLOCK_P
    override = _plan_override.get()
    if override is not None:
        block_p, num_warps = override
    block_p = max(1, min(block_p, triton.next_power_of_2(max(positions, 1))))
    # 1-D grid: B * blocks can exceed 65,535 (e.g. 2 * 9216 * 5 positions), dim 0 allows 2^31 - 1.
    grid = (batch * triton.cdiv(positions, block_p),)
    return LaunchPlan(batch, positions, num_frames, head_dim, frames_pad, head_dim_pad, block_p, num_warps, grid)


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, num_heads: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arguments as checked by svd_fast.ops.temporal_attention; returns (out, lse): out contiguous
    (B*F, S, H*D) in q's dtype, lse contiguous float32 (B*F, S, H) natural-log sums for the backward."""
    interpreter = _triton.interpreting()
    plan = launch_plan(tuple(q.shape), num_frames, num_heads, interpreter=interpreter)
    out = torch.empty(q.shape, dtype=_kernel_output_dtype(q.dtype), device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1], num_heads), dtype=torch.float32, device=q.device)
    if plan.batch * plan.positions == 0:
        return out.to(q.dtype), lse
    _triton.launch(
        _forward_kernel, plan.grid,
        q, k, v, out, lse,
        plan.positions, num_heads, scale * LOG2_E,
        *q.stride(), *k.stride(), *v.stride(),
        NATIVE_DOT=q.dtype == torch.float16, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **plan.kwargs(interpreter),
    )  # fmt: skip
    return out.to(q.dtype), lse


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_frames: int,
    num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of forward() (recomputing the probabilities from lse): (grad_q, grad_k, grad_v), each
    contiguous (B*F, S, H*D) in q's dtype."""
    interpreter = _triton.interpreting()
    plan = launch_plan(tuple(q.shape), num_frames, num_heads, backward=True, interpreter=interpreter)
    grad_q, grad_k, grad_v = (torch.empty(q.shape, dtype=_kernel_output_dtype(q.dtype), device=q.device) for _ in range(3))
    if plan.batch * plan.positions == 0:
        return grad_q.to(q.dtype), grad_k.to(q.dtype), grad_v.to(q.dtype)
    _triton.launch(
        _backward_kernel, plan.grid,
        grad_out, q, k, v, out, lse.contiguous(), grad_q, grad_k, grad_v,
        plan.positions, num_heads, scale,
        *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        NATIVE_DOT=q.dtype == torch.float16, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **plan.kwargs(interpreter),
    )  # fmt: skip
    return grad_q.to(q.dtype), grad_k.to(q.dtype), grad_v.to(q.dtype)
