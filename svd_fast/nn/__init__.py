"""nn.Module wrappers of svd_fast's fused ops."""

from svd_fast.nn.group_norm import GroupNorm
from svd_fast.nn.temporal_attention import FusedTemporalBasicTransformerBlock

__all__ = ["FusedTemporalBasicTransformerBlock", "GroupNorm"]
