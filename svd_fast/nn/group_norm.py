"""GroupNorm module with an optional fused SiLU, a drop-in for torch.nn.GroupNorm.

Parameter and buffer names match torch.nn.GroupNorm (``weight``, ``bias``), so state dicts load
either way; :meth:`FusedGroupNorm.from_torch` wraps an existing module, sharing its parameters, e.g. to
fuse the GroupNorm + SiLU pairs of the SVD UNet's resnet blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from svd_fast.ops.group_norm import ACTIVATIONS, group_norm


class FusedGroupNorm(nn.Module):
    """``activation(group_norm(x))`` over (N, C, L), (N, C, H, W) or (N, C, F, H, W) input (3-D as diffusers'
    attention processors pass it: (N, C, L) seen as (N, C, L, 1), a view); activation None or "silu"."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"FusedGroupNorm: num_groups must be a positive int, got {num_groups!r}")
        if num_channels % num_groups != 0:
            raise ValueError(f"FusedGroupNorm: num_groups={num_groups} must divide num_channels={num_channels}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedGroupNorm: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.activation = activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_torch(cls, module: nn.GroupNorm, activation: str | None = None) -> FusedGroupNorm:
        """A GroupNorm computing ``activation(module(x))`` that shares ``module``'s parameters."""
        if not isinstance(module, nn.GroupNorm):
            raise TypeError(f"GroupNorm.from_torch: module must be a torch.nn.GroupNorm, got {type(module).__name__}")
        fused = cls(module.num_groups, module.num_channels, module.eps, affine=False, activation=activation)
        fused.affine = module.affine
        fused.weight = module.weight
        fused.bias = module.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return group_norm(x.unsqueeze(-1), self.num_groups, self.weight, self.bias, self.eps, self.activation).squeeze(-1)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"activation={self.activation!r}"
        )
