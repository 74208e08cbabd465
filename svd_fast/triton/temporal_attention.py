"""Triton kernels of the fused temporal attention (forward and flash-style backward) and their launchers.

Same contract as the C++ kernels (csrc/temporal_attention.cpp); ground truth: svd_fast.reference.temporal_attention.
q, k, v are (B*F, S, H*D) with row b*F + f; each position (b, s, h) attends over its F frames. F is small
(<= MAX_FRAMES), so one program owns ALL frames of a block of BLOCK_P consecutive flattened positions
p = s*H + h of one video b: it reads q/k/v once and writes out (+ lse) once, and in the backward it can
compute every gradient of its positions without atomics. Consecutive p are consecutive D-sized chunks of
a row in the usual layout, so each frame's [BLOCK_P, D] slice is one coalesced run of memory.

Tiles are [BLOCK_P, F_PAD, D_PAD] (frames and head_dim padded to powers of two, masked: padded frames are
never loaded). The forward loads q, k and v of all frames once and computes scores and output as batched
matrix products with an exact softmax; the backward streams key frames one at a time as [BLOCK_P, D_PAD]
tiles, recomputing the probabilities from the saved log-sum-exp.
Grid: 1-D, B * cdiv(S*H, BLOCK_P) programs (grid dim 0 allows 2^31 - 1; dims 1 and 2 only 65,535).
All offsets are int64. Accumulation is float32; the backward converts loads to float32 before any
arithmetic (the interpreter's bf16 arithmetic is wrong), the forward multiplies float16 natively and
bfloat16/float32 in float32.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from svd_fast import _triton

# Limits the public op checks before choosing this backend.
MAX_FRAMES = 64
MAX_HEAD_DIM = 128

# Elements of one [BLOCK_P, F_PAD, D_PAD] tile. The forward holds q, k, v tiles and a [BLOCK_P, F_PAD, F_PAD]
# score tile; 2048 elements (one position at F=25 -> 32, D=64; two at F=14) with 4 warps compile to 60
# registers and 9 KB of shared memory on sm_90, no spills, 50% occupancy (bench/kernel_report.py); 4096
# elements needed 79 registers (37.5%). The backward streams key frames one at a time
# and holds three tiles (q, grad_out, grad_q): about 8 registers per tile element per thread, so one warp
# per 256 elements, e.g. F=25, D=64: 111 registers at 2048 elements and 8 warps, no spills. Under the CPU
# interpreter BLOCK_P is capped small so that the tests' tiny tensors span several blocks per video.
GPU_FORWARD_TILE_ELEMENTS = 2048
FORWARD_WARPS = 4
GPU_BACKWARD_TILE_ELEMENTS = 2048
BACKWARD_ELEMENTS_PER_WARP = 256
# tl.dot's smallest operand dimension.
DOT_MIN = 16
MIN_WARPS, MAX_WARPS = 4, 16
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
def _one_frame_offsets(b, j, p, heads, stride_row, stride_s, stride_c, F: tl.constexpr, D: tl.constexpr,
                       D_PAD: tl.constexpr):  # fmt: skip
    """Offsets of the [BLOCK_P, D_PAD] tile of frame ``j`` of positions ``p`` of video ``b``."""
    s = p // heads
    h = p % heads
    d = tl.arange(0, D_PAD).to(tl.int64)
    return (b * F + j) * stride_row + (s * stride_s + h * D * stride_c)[:, None] + (d * stride_c)[None, :]


@triton.jit
def _masks(position_valid, F: tl.constexpr, D: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Validity of the [BLOCK_P, F_PAD, D_PAD] tile, of a [BLOCK_P, D_PAD] frame and of a [BLOCK_P, F_PAD] statistic."""
    frame_valid = tl.arange(0, F_PAD) < F
    channel_valid = tl.arange(0, D_PAD) < D
    tile_mask = position_valid[:, None, None] & frame_valid[None, :, None] & channel_valid[None, None, :]
    frame_mask = position_valid[:, None] & channel_valid[None, :]
    stat_mask = position_valid[:, None] & frame_valid[None, :]
    return tile_mask, frame_mask, stat_mask


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
    tile_mask, _frame_mask, stat_mask = _masks(position_valid, F, D, F_PAD, D_PAD)
    q = tl.load(q_ptr + _frame_tile_offsets(b, p, heads, q_s0, q_s1, q_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    k = tl.load(k_ptr + _frame_tile_offsets(b, p, heads, k_s0, k_s1, k_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    v = tl.load(v_ptr + _frame_tile_offsets(b, p, heads, v_s0, v_s1, v_s2, F, D, F_PAD, D_PAD), mask=tile_mask, other=0.0)
    if not NATIVE_DOT:
        # bfloat16 and float32 multiply in float32 (bfloat16 values are exact in TF32; float32 needs IEEE).
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    # Scores in log2 units (exp2 is the cheap instruction), scale * log2(e) applied in float32.
    score = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PRECISION) * score_scale  # [BLOCK_P, F_PAD, F_PAD]
    key_valid = (tl.arange(0, F_PAD) < F)[None, None, :]
    score = tl.where(key_valid, score, float("-inf"))
    row_max = tl.max(score, axis=2)
    prob = tl.exp2(score - row_max[:, :, None])
    row_sum = tl.sum(prob, axis=2)
    out = tl.dot(prob.to(v.dtype), v, input_precision=PRECISION) / row_sum[:, :, None]
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
):  # fmt: skip
    b, p, position_valid = _block_positions(positions, BLOCK_P)
    tile_mask, frame_mask, stat_mask = _masks(position_valid, F, D, F_PAD, D_PAD)
    q_offsets = _frame_tile_offsets(b, p, heads, q_s0, q_s1, q_s2, F, D, F_PAD, D_PAD)
    do_offsets = _frame_tile_offsets(b, p, heads, do_s0, do_s1, do_s2, F, D, F_PAD, D_PAD)
    o_offsets = _frame_tile_offsets(b, p, heads, o_s0, o_s1, o_s2, F, D, F_PAD, D_PAD)
    q = tl.load(q_ptr + q_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    grad_out = tl.load(do_ptr + do_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    out = tl.load(o_ptr + o_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    delta = tl.sum(grad_out * out, axis=2)  # [BLOCK_P, F_PAD]
    grad_offsets, lse_offsets = _contiguous_offsets(b, p, positions, F, D, F_PAD, D_PAD)
    lse_log2 = tl.load(lse_ptr + lse_offsets, mask=stat_mask, other=0.0) * _LOG2_E
    score_scale = scale * _LOG2_E
    grad_q = tl.zeros([BLOCK_P, F_PAD, D_PAD], dtype=tl.float32)
    for j in range(F):
        k_offsets = _one_frame_offsets(b, j, p, heads, k_s0, k_s1, k_s2, F, D, D_PAD)
        v_offsets = _one_frame_offsets(b, j, p, heads, v_s0, v_s1, v_s2, F, D, D_PAD)
        k_j = tl.load(k_ptr + k_offsets, mask=frame_mask, other=0.0).to(tl.float32)
        v_j = tl.load(v_ptr + v_offsets, mask=frame_mask, other=0.0).to(tl.float32)
        score = tl.sum(q * k_j[:, None, :], axis=2) * score_scale
        # Padded query frames would get exp2(0 - 0) = 1: zero them so they add nothing to grad_k/grad_v.
        prob = tl.where(stat_mask, tl.exp2(score - lse_log2), 0.0)  # P[:, i, j]
        grad_v_j = tl.sum(prob[:, :, None] * grad_out, axis=1)
        grad_prob = tl.sum(grad_out * v_j[:, None, :], axis=2)
        grad_score = prob * (grad_prob - delta)
        grad_q += grad_score[:, :, None] * k_j[:, None, :]
        grad_k_j = tl.sum(grad_score[:, :, None] * q, axis=1) * scale
        # Gradients are contiguous: frame j of these positions starts at row b*F + j.
        frame_offsets = ((b * F + j) * positions + p)[:, None] * D + tl.arange(0, D_PAD).to(tl.int64)[None, :]
        tl.store(dk_ptr + frame_offsets, grad_k_j.to(dk_ptr.dtype.element_ty), mask=frame_mask)
        tl.store(dv_ptr + frame_offsets, grad_v_j.to(dv_ptr.dtype.element_ty), mask=frame_mask)
    tl.store(dq_ptr + grad_offsets, (grad_q * scale).to(dq_ptr.dtype.element_ty), mask=tile_mask)


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


def launch_plan(
    q_shape: tuple[int, int, int], num_frames: int, num_heads: int, backward: bool = False, interpreter: bool = False
) -> LaunchPlan:
    """Blocking of the forward (or backward) kernel for q of ``q_shape`` (B*F, S, H*D). The forward's batched
    matrix products need every dimension >= 16, so it pads frames and head channels to at least 16 (padded
    frames are masked, never loaded). Neither the dtype, the strides nor the compute capability change it."""
    batch = q_shape[0] // num_frames
    positions = q_shape[1] * num_heads
    head_dim = q_shape[2] // num_heads
    minimum = 1 if backward else DOT_MIN
    frames_pad = max(minimum, triton.next_power_of_2(num_frames))
    head_dim_pad = max(minimum, triton.next_power_of_2(head_dim))
    per_position = frames_pad * head_dim_pad
    tile_elements = GPU_BACKWARD_TILE_ELEMENTS if backward else GPU_FORWARD_TILE_ELEMENTS
    block_p = INTERPRETER_MAX_BLOCK_P if interpreter else max(1, tile_elements // per_position)
    block_p = max(1, min(block_p, triton.next_power_of_2(max(positions, 1))))
    num_warps = (
        min(MAX_WARPS, max(MIN_WARPS, block_p * per_position // BACKWARD_ELEMENTS_PER_WARP)) if backward else FORWARD_WARPS
    )
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
    grad_q, grad_k, grad_v = (
        torch.empty(q.shape, dtype=_kernel_output_dtype(q.dtype), device=q.device) for _ in range(3)
    )
    if plan.batch * plan.positions == 0:
        return grad_q.to(q.dtype), grad_k.to(q.dtype), grad_v.to(q.dtype)
    _triton.launch(
        _backward_kernel, plan.grid,
        grad_out, q, k, v, out, lse.contiguous(), grad_q, grad_k, grad_v,
        plan.positions, num_heads, scale,
        *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        **plan.kwargs(interpreter),
    )  # fmt: skip
    return grad_q.to(q.dtype), grad_k.to(q.dtype), grad_v.to(q.dtype)
