"""GroupNorm with an optional fused SiLU: the public op.

``group_norm(x, num_groups, weight, bias, eps, activation)`` checks its arguments, picks a backend
(see :mod:`svd_fast.backends`, where this module declares what each backend accepts) and runs it. The
compiled backends are torch ops (``torch.ops.svd_fast.group_norm_forward`` from C++,
``torch.ops.svd_fast.group_norm_forward_triton`` from Triton) with autograd formulas registered here;
the reference backend is differentiable PyTorch.
"""

from __future__ import annotations

import torch

from svd_fast import _extension, _triton, backends
from svd_fast.ops._library import extension_cuda_unavailable, extension_unavailable, register_differentiable_op, triton_unavailable
from svd_fast.reference import group_norm as reference

OP_NAME = "group_norm"
ACTIVATIONS = (None, "silu")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT32_MATH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compiled_forward(x, num_groups, weight, bias, eps, silu):
    return torch.ops.svd_fast.group_norm_forward(x, num_groups, weight, bias, eps, silu)[0]


def _triton_forward(x, num_groups, weight, bias, eps, silu):
    return torch.ops.svd_fast.group_norm_forward_triton(x, num_groups, weight, bias, eps, silu)[0]


# On CPU tensors ATen's own vectorised GroupNorm and SiLU (the reference path) measured 2x faster than
# the scalar C++ kernel on SVD shapes (bench/RESULTS.md), so auto mode prefers it there; the C++ kernel
# stays available with use_backend("cpu"). On CUDA, Triton first: its arithmetic is checked against the
# float64 truth on every CI run (under the interpreter); the CUDA kernels are ranked from GPU measurements.
backends.register(OP_NAME, "reference", reference.group_norm, devices=("cpu", "cuda"), dtypes=SUPPORTED_DTYPES, priority={"cpu": 0, "cuda": 2})
backends.register(OP_NAME, "cpu", _compiled_forward, devices=("cpu",), dtypes=SUPPORTED_DTYPES, priority={"cpu": 1}, probe=extension_unavailable)
backends.register(OP_NAME, "cuda", _compiled_forward, devices=("cuda",), dtypes=SUPPORTED_DTYPES, priority={"cuda": 1}, probe=extension_cuda_unavailable)
# The Triton kernels compute in float32 and do not take float64 input.
backends.register(OP_NAME, "triton", _triton_forward, devices=("cuda", "cpu"), dtypes=FLOAT32_MATH_DTYPES, priority={"cuda": 0}, probe=triton_unavailable)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """GroupNorm over ``x`` of shape (N, C, H, W) or (N, C, F, H, W), then ``activation`` (None or "silu").

    Statistics are computed in float32 (float64 for float64 input). The output has the input's
    dtype and memory format (contiguous or channels_last / channels_last_3d).
    """
    _check_arguments(x, num_groups, weight, bias, eps, activation)
    return backends.select_backend(OP_NAME, x).implementation(x, num_groups, weight, bias, eps, activation == "silu")


def _check_arguments(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    activation: str | None,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(f"group_norm: x must be 4-D (N, C, H, W) or 5-D (N, C, F, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"group_norm: x must not be empty, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"group_norm: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the channel count C={channels}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.shape != (channels,):
            raise ValueError(f"group_norm: {name} must have shape (C,)=({channels},), got {tuple(param.shape)}")
        if param.dtype != x.dtype:
            raise TypeError(f"group_norm: {name} dtype {param.dtype} must match x dtype {x.dtype}")
        if param.device != x.device:
            raise ValueError(f"group_norm: {name} is on {param.device} but x is on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"group_norm: eps must be >= 0, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")


# --- torch.library registration: fake implementations of the C++ ops, autograd -----------------


def _forward_fake(x, num_groups, weight, bias, eps, silu):
    memory_format = reference.suggest_memory_format(x)
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=memory_format), stats, torch.empty_like(stats)


def _backward_fake(grad_output, x, mean, rstd, weight, bias, num_groups, silu):
    param_dtype = x.dtype if weight is None else weight.dtype
    channels = x.shape[1]
    memory_format = reference.suggest_memory_format(x)
    return (
        torch.empty_like(x, memory_format=memory_format),
        x.new_empty((channels,), dtype=param_dtype),
        x.new_empty((channels,), dtype=param_dtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, num_groups, weight, bias, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.num_groups = num_groups
    ctx.silu = silu


def _autograd_backward(backward_op):
    def backward(ctx, grad_output, _grad_mean, _grad_rstd):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward_op(
            grad_output, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu
        )
        return (
            grad_x,
            None,
            grad_weight if weight is not None else None,
            grad_bias if bias is not None else None,
            None,
            None,
        )

    return backward


if _triton.available():
    from svd_fast.triton import group_norm as triton_group_norm
    from svd_fast.triton import group_norm_backward as triton_group_norm_backward

    _triton.register_op("svd_fast::group_norm_forward_triton", triton_group_norm.forward)
    _triton.register_op("svd_fast::group_norm_backward_triton", triton_group_norm_backward.backward)
    register_differentiable_op(
        "svd_fast::group_norm_forward_triton", "svd_fast::group_norm_backward_triton", _setup_context, _autograd_backward
    )
if _extension.unavailable_reason() is None:
    _extension.extension()  # loading svd_fast._C defines svd_fast::group_norm_forward/backward
    register_differentiable_op(
        "svd_fast::group_norm_forward", "svd_fast::group_norm_backward", _setup_context, _autograd_backward,
        fakes=(_forward_fake, _backward_fake),
    )
