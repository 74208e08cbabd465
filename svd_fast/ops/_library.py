"""torch.library registration shared by svd_fast's differentiable ops, and the availability probes every op
registers with its compiled backends (:func:`svd_fast.backends.register`).

Each such op exists as a pair of torch ops, forward and backward, once for the compiled extension (CPU/CUDA)
and once for Triton; both pairs get the same autograd formula, which calls the pair's own backward op.
The extension's pair gets hand-written fake implementations (torch.compile, meta tensors); a Triton
op's fake is its own body (see svd_fast._triton).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from svd_fast import _extension, _triton


def register_differentiable_op(
    forward_name: str,
    backward_name: str,
    setup_context: Callable[..., None],
    make_backward: Callable[[Any], Callable[..., Any]],
    fakes: tuple[Callable[..., Any], Callable[..., Any]] | None = None,
) -> None:
    """Autograd for ``forward_name`` ("svd_fast::..."): ``make_backward(backward_op)`` returns the formula
    given the registered ``backward_name`` op; ``fakes`` (forward, backward) when the ops have none yet."""
    if fakes is not None:
        torch.library.register_fake(forward_name)(fakes[0])
        torch.library.register_fake(backward_name)(fakes[1])
    backward_op = getattr(torch.ops.svd_fast, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, make_backward(backward_op), setup_context=setup_context)


def extension_unavailable(_device: torch.device) -> str | None:
    """Probe of the ``cpu`` backends: the compiled extension is importable."""
    return _extension.unavailable_reason()


def extension_cuda_unavailable(_device: torch.device) -> str | None:
    """Probe of the ``cuda`` backends: the extension has CUDA kernels and a CUDA device is present."""
    return _extension.cuda_unavailable_reason()


def triton_unavailable(device: torch.device) -> str | None:
    """Probe of the ``triton`` backends: Triton is installed and runs on ``device`` (CPU: the interpreter)."""
    return _triton.unavailable_reason(device)
