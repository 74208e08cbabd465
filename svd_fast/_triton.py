"""Triton availability, op registration and launching shared by every Triton kernel in svd_fast.

Triton ops are ``torch.library.triton_op``s: torch.compile sees through them to the kernels, and their
fake implementation (shapes for torch.compile and meta tensors) is the op's own Python body, run on
fake tensors. Kernels launch through ``torch.library.wrap_triton``; in eager mode triton_op turns it
off, so a launch is a plain Triton launch that records nothing in torch's kernel side table.

Under the Triton CPU interpreter (``TRITON_INTERPRET=1``, which must be set before triton is imported)
kernels are interpreted functions that torch.compile cannot trace, so the ops are opaque custom ops
there, with the same body as their fake: on fake tensors :func:`launch` does nothing.

:func:`recorded_launches` captures what the launchers would launch (kernel, grid, arguments) without
running anything, e.g. on meta tensors: bench/kernel_report.py compiles exactly those configurations
ahead of time for GPU targets, without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401, PLC0415 - triton is optional
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


def available() -> bool:
    return _import_error() is None


def register_op(name: str, body: Callable[..., Any]) -> Any:
    """Register ``body`` (which launches Triton kernels through :func:`launch`) as the torch op ``name``,
    running on the GPU of its first argument."""

    @functools.wraps(body)
    def on_first_argument_device(*args: Any, **kwargs: Any) -> Any:
        with on_device_of(args[0]):
            return body(*args, **kwargs)

    if interpreting():
        op = torch.library.custom_op(name, on_first_argument_device, mutates_args=())
        op.register_fake(on_first_argument_device)
        return op
    return torch.library.triton_op(name, on_first_argument_device, mutates_args=())


@contextlib.contextmanager
def on_device_of(tensor: torch.Tensor) -> Iterator[None]:
    """Make ``tensor``'s GPU the current one, so that kernels launch there on a multi-GPU machine."""
    if tensor.device.type == "cuda" and not isinstance(tensor, FakeTensor):
        with torch.cuda.device(tensor.device):
            yield
    else:
        yield


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_recorders: list[list[Launch]] = []


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Inside the block, :func:`launch` appends to the yielded list instead of launching."""
    records: list[Launch] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.pop()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``, traceable by torch.compile outside the interpreter."""
    if _recorders:
        _recorders[-1].append(Launch(kernel, tuple(grid), args, kwargs))
        return
    if interpreting():
        if any(isinstance(arg, FakeTensor) for arg in args):
            return
        kernel[grid](*args, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
