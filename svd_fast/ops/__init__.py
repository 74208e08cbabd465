"""svd_fast's fused ops. Each dispatches to a reference, C++ (cpu), CUDA or Triton backend."""

from svd_fast.ops.edm_step import edm_euler_step, edm_prepare_model_input
from svd_fast.ops.group_norm import group_norm
from svd_fast.ops.temporal_attention import temporal_attention

__all__ = ["group_norm", "edm_euler_step", "edm_prepare_model_input", "temporal_attention"]
