"""Plain helpers shared by the test files (fixtures and hooks live in conftest.py, which switches the Triton
interpreter on before this module is imported); bench/gpu_check.py imports the tolerance rule from here too.

Markers: GPU cases carry ``gpu`` (``requires_cuda``); cases that also need an optional package (flash-attn,
DALI, deepspeed) carry ``gpu_optional`` too (``requires_cuda_and_package``); cases that force Triton on CPU
tensors (``requires_triton_interpreter``) skip when the interpreter is off, as on a CUDA machine, where the
triton-cuda cases run the same kernels.

The op tests' tolerance rule, in one place:

    error <= max(2 * torch_error, floor(dtype, reduction_length) * magnitude)

``error`` and ``torch_error`` are the largest absolute differences from a float64 truth computed from the same,
already rounded, inputs: ``torch_error`` is PyTorch's own computation of the op in the storage dtype (what
diffusers runs), as flash-attention's tests compare a kernel with 2x PyTorch's error. That baseline alone
depends on the machine: CPU kernel variants (ATen's scalar/AVX2/AVX-512 code, the BLAS that runs the Triton
interpreter's dots) round differently, and where PyTorch happens to be lucky a correct kernel fails. So the
bound never goes below a floor that depends only on the dtype and the op (flash-attention keeps such a fixed
``fwd_atol`` beside its 2x rule), see :func:`error_floor`.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
TRITON_INTERPRETER_ON = os.environ.get("TRITON_INTERPRET", "0") == "1"
# "1" or "0" overrides whether skipped gpu cases fail (default: they fail where CUDA is available).
GPU_TESTS_MUST_RUN_ENV = "SVD_FAST_GPU_TESTS_MUST_RUN"

requires_cuda = pytest.mark.gpu
requires_cuda_and_package = [pytest.mark.gpu, pytest.mark.gpu_optional]
requires_triton_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRETER_ON,
    reason="forces Triton on CPU tensors, which needs the Triton interpreter (TRITON_INTERPRET=1); "
    "with it off the triton-cuda cases run these kernels on a GPU",
)


def error_floor(dtype: torch.dtype, reduction_length: int = 1) -> float:
    """The machine-independent part of the rule, relative to the output's magnitude.

    A kernel that reads inputs stored in ``dtype``, sums ``reduction_length`` terms in its accumulation precision
    (float32 for float16/bfloat16/float32 storage, as every kernel here accumulates; float64 for float64) and
    rounds the result to ``dtype`` errs by at most

        gamma_n * sum |terms| + u_store * |result|,   gamma_n = n * u_acc / (1 - n * u_acc) ~ n * u_acc,

    the worst-case summation bound (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5 and
    Lemma 3.1), with u = eps / 2 the unit roundoff. ``magnitude`` stands in for sum |terms| (the callers pass the
    cancelled magnitude where a result is a difference of much larger sums). Two output roundings (2 * u_store,
    one ulp) cover an intermediate rounded to the storage dtype besides the final one, as flash-attention's
    ``fwd_atol`` is two roundings of the output.

    ``reduction_length`` is the longest chain of sums one output element goes through (attention: the head_dim
    dot product of the scores, then the sum over frames; GroupNorm: the group's size; elementwise ops: 1).
    The worst-case n (not the typical sqrt(n)) is needed: the Triton interpreter's float32 grad_k at 3 frames,
    head_dim 40 errs by 10.7 u * magnitude with OpenBLAS's Haswell/Zen kernels (8.0 with its SkylakeX ones).
    """
    if reduction_length < 1:
        raise ValueError(f"reduction_length must be >= 1, got {reduction_length}")
    unit_store = torch.finfo(dtype).eps / 2
    unit_accumulate = torch.finfo(torch.promote_types(dtype, torch.float32)).eps / 2
    return 2 * unit_store + reduction_length * unit_accumulate


def allowed_error(torch_error: float, dtype: torch.dtype, magnitude: float, reduction_length: int = 1) -> float:
    """The largest error the rule allows: 2x PyTorch's own error, or the floor at ``magnitude``, whichever is larger."""
    return max(2 * torch_error, error_floor(dtype, reduction_length) * magnitude)


def max_abs_error(result: torch.Tensor, truth: torch.Tensor) -> float:
    return (result.detach().double().cpu() - truth.detach().double().cpu()).abs().max().item()


def assert_within_torch_error(
    out: torch.Tensor,
    truth: torch.Tensor,
    torch_out: torch.Tensor,
    dtype: torch.dtype,
    reduction_length: int = 1,
    magnitude: float | None = None,
    what: str = "",
) -> None:
    """Assert ``out`` is within the rule: its error against the float64 ``truth`` is at most 2x that of PyTorch's
    ``torch_out`` or the floor of ``dtype`` and ``reduction_length`` at ``magnitude`` (default: max |truth|)."""
    magnitude = truth.abs().max().item() if magnitude is None else magnitude
    error = max_abs_error(out, truth)
    torch_error = max_abs_error(torch_out, truth)
    allowed = allowed_error(torch_error, dtype, magnitude, reduction_length)
    assert error <= allowed, (
        f"{what}: error {error:.3g} > allowed {allowed:.3g} (max of 2 x torch's {torch_error:.3g} and the "
        f"{dtype} floor at reduction length {reduction_length}, magnitude {magnitude:.3g})"
    )
