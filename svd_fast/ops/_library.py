"""torch.library registration shared by svd_fast's differentiable ops.

Each such op exists as a pair of torch ops, forward and backward, once for the compiled extension (CPU/CUDA)
and once for Triton; both pairs get the same fake implementations (torch.compile, meta tensors) and the
same autograd formula, which calls the pair's own backward op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def register_differentiable_op(
    forward_name: str,
    backward_name: str,
    forward_fake: Callable[..., Any],
    backward_fake: Callable[..., Any],
    setup_context: Callable[..., None],
    make_backward: Callable[[Any], Callable[..., Any]],
) -> None:
    """Fake implementations for ``forward_name``/``backward_name`` ("svd_fast::..."), and autograd for the
    forward: ``make_backward(backward_op)`` returns the formula given the registered backward op."""
    torch.library.register_fake(forward_name)(forward_fake)
    torch.library.register_fake(backward_name)(backward_fake)
    backward_op = getattr(torch.ops.svd_fast, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, make_backward(backward_op), setup_context=setup_context)
