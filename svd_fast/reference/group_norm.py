"""Reference GroupNorm(+SiLU): torch's own group_norm, computed in float32 (float64 for float64) and cast back.

Statistics in float32 match what the SVD reference code does for fp16/bf16 activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.group_norm(
        x.to(compute_dtype),
        num_groups,
        None if weight is None else weight.to(compute_dtype),
        None if bias is None else bias.to(compute_dtype),
        eps,
    )
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=suggest_memory_format(x))


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) when x is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
