"""svd_fast's fused ops. Each dispatches to a reference, C++ (cpu), CUDA or Triton backend."""

from svd_fast.ops.group_norm import group_norm

__all__ = ["group_norm"]
