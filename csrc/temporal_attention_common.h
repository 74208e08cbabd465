// Shape checks and geometry of the fused temporal attention, shared by the CPU (csrc/temporal_attention.cpp)
// and CUDA (kernels/temporal_attention.cu) kernels.
//
// q, k, v: (B*F, S, H*D) frame-major, any strides; row b*F + f is frame f of video b. Each position
// (b, s, h) attends over its F frames. Element (b, f, s, h, d) of q lives at
//   (b*F + f) * stride[0] + s * stride[1] + (h*D + d) * stride[2].
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>

namespace svd_fast {

struct TemporalAttentionGeometry {
  int64_t batch;       // B videos
  int64_t frames;      // F
  int64_t positions;   // S spatial positions
  int64_t heads;       // H
  int64_t head_dim;    // D
};

// Element strides of one (B*F, S, H*D) tensor, as the kernels index it.
struct TemporalStrides {
  int64_t row;      // dim 0: one frame of one video
  int64_t position; // dim 1
  int64_t channel;  // dim 2
};

inline TemporalStrides temporal_strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2)};
}

inline void check_temporal_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 3, "temporal_attention: ", name, " must be 3-D (B*F, S, H*D), got ", t.dim(), "-D");
  TORCH_CHECK(t.sizes() == q.sizes(), "temporal_attention: ", name, " must have q's shape ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "temporal_attention: ", name, " dtype ", t.scalar_type(),
              " must match q dtype ", q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "temporal_attention: ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

inline TemporalAttentionGeometry temporal_attention_geometry(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, int64_t num_frames,
                                                              int64_t num_heads) {
  check_temporal_tensor(q, "q", q);
  check_temporal_tensor(k, "k", q);
  check_temporal_tensor(v, "v", q);
  TORCH_CHECK(num_frames >= 1, "temporal_attention: num_frames must be >= 1, got ", num_frames);
  TORCH_CHECK(num_heads >= 1, "temporal_attention: num_heads must be >= 1, got ", num_heads);
  TORCH_CHECK(q.size(0) % num_frames == 0, "temporal_attention: q.shape[0] = B*F = ", q.size(0),
              " is not a multiple of num_frames = ", num_frames);
  TORCH_CHECK(q.size(2) % num_heads == 0, "temporal_attention: q.shape[2] = H*D = ", q.size(2),
              " is not a multiple of num_heads = ", num_heads);
  return {q.size(0) / num_frames, num_frames, q.size(1), num_heads, q.size(2) / num_heads};
}

// lse: float32 (float64 for float64 input), contiguous (B*F, S, H).
inline void check_temporal_lse(const at::Tensor& lse, const at::Tensor& q, const TemporalAttentionGeometry& g) {
  const auto expected = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == expected, "temporal_attention_backward: lse must be ", expected, ", got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == g.positions && lse.size(2) == g.heads,
              "temporal_attention_backward: lse must have shape (B*F, S, H) = (", q.size(0), ", ", g.positions, ", ",
              g.heads, "), got ", lse.sizes());
  TORCH_CHECK(lse.device() == q.device(), "temporal_attention_backward: lse is on ", lse.device(),
              " but q is on ", q.device());
}

}  // namespace svd_fast
