"""nn.Module wrappers of svd_fast's fused ops."""

from svd_fast.nn.group_norm import GroupNorm

__all__ = ["GroupNorm"]
