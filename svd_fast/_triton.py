"""Triton availability and launching shared by every Triton kernel in svd_fast.

On CUDA tensors Triton kernels are launched through ``torch.library.wrap_triton`` so that
torch.compile can trace them. Under the Triton CPU interpreter (``TRITON_INTERPRET=1``, which must
be set before triton is imported) wrap_triton may refuse kernels, so the raw kernel is launched.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    error = _import_error()
    if error is not None:
        return error
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"triton does not run on {device.type} tensors"


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``, traceable by torch.compile outside the interpreter."""
    if interpreting():
        kernel[grid](*args, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
