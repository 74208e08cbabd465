"""nn.Module wrappers of svd_fast's fused ops (framework-free: imports torch and svd_fast.ops only)."""

from svd_fast.nn.group_norm import FusedGroupNorm

__all__ = ["FusedGroupNorm"]
