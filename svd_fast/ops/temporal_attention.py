"""Fused temporal attention: attention over the frame axis of frame-major activations, the public op.

SVD's UNet holds activations frame-major, (B*F, S, C): row b*F + f is frame f of video b. diffusers'
temporal transformer block permutes them to (B*S, F, C), attends over F, and permutes back: two full
copies per block. ``temporal_attention(q, k, v, num_frames, num_heads)`` reads q/k/v where they are (any
strides: slices of a fused projection work too) and writes the output in the same layout.

The compiled backends are torch ops (``torch.ops.svd_fast.temporal_attention_forward`` from C++ for CPU
and CUDA, ``torch.ops.svd_fast.temporal_attention_forward_triton`` from Triton) returning the output
and the log-sum-exp the backward needs; autograd is registered here, and what each backend accepts is
declared here to :mod:`svd_fast.backends`. Any
number of positions B*S*H works (the grids are 1-D), unlike PyTorch's flash/efficient SDPA kernels,
which fail above 65,535 batch*heads on CUDA.
"""

from __future__ import annotations

import math

import torch

from svd_fast import _extension, _triton, backends
from svd_fast.ops._library import extension_cuda_unavailable, extension_unavailable, register_differentiable_op, triton_unavailable
from svd_fast.reference import temporal_attention as reference

OP_NAME = "temporal_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT32_MATH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What the GPU kernels (Triton and CUDA) hold on chip: frames and head channels per position.
GPU_MAX_FRAMES = 64
GPU_MAX_HEAD_DIM = 128
GPU_LIMITS = (
    backends.Limit("num_frames", GPU_MAX_FRAMES, "frames per position"),
    backends.Limit("head_dim", GPU_MAX_HEAD_DIM, "channels per head"),
)



def _compiled_forward(q, k, v, num_frames, num_heads, scale):
    return torch.ops.svd_fast.temporal_attention_forward(q, k, v, num_frames, num_heads, scale)[0]


def _triton_forward(q, k, v, num_frames, num_heads, scale):
    return torch.ops.svd_fast.temporal_attention_forward_triton(q, k, v, num_frames, num_heads, scale)[0]


backends.register(OP_NAME, "reference", reference.temporal_attention, devices=("cpu", "cuda"), dtypes=SUPPORTED_DTYPES, priority={"cpu": 1, "cuda": 2})
backends.register(OP_NAME, "cpu", _compiled_forward, devices=("cpu",), dtypes=SUPPORTED_DTYPES, priority={"cpu": 0}, probe=extension_unavailable)
# The GPU kernels compute in float32 and do not take float64 input.
backends.register(
    OP_NAME, "cuda", _compiled_forward, devices=("cuda",), dtypes=FLOAT32_MATH_DTYPES, priority={"cuda": 1}, limits=GPU_LIMITS,
    probe=extension_cuda_unavailable,
)  # fmt: skip
backends.register(
    OP_NAME, "triton", _triton_forward, devices=("cuda", "cpu"), dtypes=FLOAT32_MATH_DTYPES, priority={"cuda": 0}, limits=GPU_LIMITS,
    probe=triton_unavailable,
)  # fmt: skip


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_frames: int,
    num_heads: int,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T) v over the ``num_frames`` frames of each spatial position and head.

    q, k, v: (B*F, S, H*D) frame-major, any strides, same shape/dtype/device. ``scale`` defaults to
    D**-0.5. Returns a contiguous (B*F, S, H*D) tensor in q's dtype; the math is in float32 (float64
    for float64 input). Differentiable with respect to q, k and v.
    """
    _check_arguments(q, k, v, num_frames, num_heads, scale)
    head_dim = q.shape[2] // num_heads
    scale = head_dim**-0.5 if scale is None else float(scale)
    entry = backends.select_backend(OP_NAME, q, num_frames=num_frames, head_dim=head_dim)
    return entry.implementation(q, k, v, num_frames, num_heads, scale)


def _check_arguments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, num_heads: int, scale: float | None
) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"temporal_attention: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if q.dim() != 3:
        raise ValueError(f"temporal_attention: q must be 3-D (B*F, S, H*D), got shape {tuple(q.shape)}")
    if q.numel() == 0:
        raise ValueError(f"temporal_attention: q must not be empty, got shape {tuple(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"temporal_attention: q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(f"temporal_attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(tensor.shape)}")
        if tensor.dtype != q.dtype:
            raise TypeError(f"temporal_attention: {name} dtype {tensor.dtype} must match q dtype {q.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"temporal_attention: {name} is on {tensor.device} but q is on {q.device}")
    for name, value in (("num_frames", num_frames), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"temporal_attention: {name} must be a positive int, got {value!r}")
    if q.shape[0] % num_frames != 0:
        raise ValueError(
            f"temporal_attention: q.shape[0] must be B*F, a multiple of num_frames={num_frames}, got {q.shape[0]}"
        )
    if q.shape[2] % num_heads != 0:
        raise ValueError(
            f"temporal_attention: q.shape[2] must be H*D, a multiple of num_heads={num_heads}, got {q.shape[2]}"
        )
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"temporal_attention: scale must be a positive finite float or None, got {scale!r}")


# --- torch.library registration: fake implementations of the C++ ops, autograd -----------------


def _forward_fake(q, k, v, num_frames, num_heads, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, q.new_empty((q.shape[0], q.shape[1], num_heads), dtype=lse_dtype)


def _backward_fake(grad_out, q, k, v, out, lse, num_frames, num_heads, scale):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, num_frames, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.num_frames, ctx.num_heads, ctx.scale = num_frames, num_heads, scale


def _autograd_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward_op(grad_out, q, k, v, out, lse, ctx.num_frames, ctx.num_heads, ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None

    return backward


if _triton.available():
    from svd_fast.triton import temporal_attention as triton_temporal_attention

    _triton.register_op("svd_fast::temporal_attention_forward_triton", triton_temporal_attention.forward)
    _triton.register_op("svd_fast::temporal_attention_backward_triton", triton_temporal_attention.backward)
    register_differentiable_op(
        "svd_fast::temporal_attention_forward_triton", "svd_fast::temporal_attention_backward_triton",
        _setup_context, _autograd_backward,
    )  # fmt: skip
if _extension.unavailable_reason() is None:
    _extension.extension()  # loading svd_fast._C defines svd_fast::temporal_attention_forward/backward
    register_differentiable_op(
        "svd_fast::temporal_attention_forward", "svd_fast::temporal_attention_backward", _setup_context, _autograd_backward,
        fakes=(_forward_fake, _backward_fake),
    )
