// Shape/layout logic and argument checks shared by the CPU (csrc/group_norm.cpp) and CUDA
// (kernels/group_norm.cu) GroupNorm kernels, so both backends accept exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

#include <ATen/ops/empty_like.h>

#include <optional>

namespace svd_fast {

// The layouts the kernels read in place. Planar: each channel's spatial elements are `outer` runs of `inner`
// contiguous elements, element (n, c, o, i) at n*batch_stride + c*channel_stride + o*outer_stride + i. That covers
// contiguous (N, C, S) input (outer = 1) and SVD's temporal resnets, which normalise a (B, C, F, H, W) permuted
// view of a (B, F, C, H, W) tensor (outer = F, inner = H*W, outer_stride = C*H*W): read through its strides, it
// costs no copy. Channels-last: memory (N, S, C). Any other layout is copied to contiguous first.
struct GroupNormGeometry {
  int64_t batch;               // N
  int64_t channels;            // C
  int64_t spatial;             // product of the dims after C (H*W or F*H*W) = outer * inner
  int64_t num_groups;          // G
  int64_t channels_per_group;  // C / G
  bool channels_last;          // memory is (N, spatial, C) rather than planar
  int64_t outer, inner;                                // planar only
  int64_t batch_stride, channel_stride, outer_stride;  // planar only, in elements
  bool needs_copy;             // the input is in neither layout: the kernels get input.contiguous()
};

namespace group_norm_detail {

// Planar with one strided outer spatial dim (dim 2) and the remaining spatial dims merged into a contiguous run.
// Dense (no gaps or overlaps) so that empty_like(input) gives outputs with the same strides.
inline bool strided_planar(const at::Tensor& input) {
  if (!input.is_non_overlapping_and_dense()) return false;
  int64_t expected = 1;
  for (int64_t dim = input.dim() - 1; dim >= 3; --dim) {
    if (input.size(dim) != 1 && input.stride(dim) != expected) return false;
    expected *= input.size(dim);
  }
  return true;
}

}  // namespace group_norm_detail

// channels_last(_3d) only when the input is stored that way and not also plainly contiguous
// (a tensor with spatial size 1 is both, and the planar kernels are the simpler path).
inline GroupNormGeometry group_norm_geometry(const at::Tensor& input, int64_t num_groups) {
  GroupNormGeometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.spatial = input.numel() / (g.batch * g.channels);
  g.num_groups = num_groups;
  g.channels_per_group = g.channels / num_groups;
  // Contiguous (N, C, S), also what a copied input becomes.
  g.outer = 1;
  g.inner = g.spatial;
  g.batch_stride = g.channels * g.spatial;
  g.channel_stride = g.spatial;
  g.outer_stride = g.spatial;
  if (input.is_contiguous()) return g;
  if ((input.dim() == 4 && input.is_contiguous(c10::MemoryFormat::ChannelsLast)) ||
      (input.dim() == 5 && input.is_contiguous(c10::MemoryFormat::ChannelsLast3d))) {
    g.channels_last = true;
  } else if (group_norm_detail::strided_planar(input)) {
    g.outer = input.size(2);
    g.inner = g.spatial / g.outer;
    g.batch_stride = input.stride(0);
    g.channel_stride = input.stride(1);
    g.outer_stride = input.stride(2);
  } else {
    g.needs_copy = true;
  }
  return g;
}

// The tensor the kernels read: the input itself unless its layout is unsupported.
inline at::Tensor group_norm_kernel_input(const at::Tensor& input, const GroupNormGeometry& g) {
  return g.needs_copy ? input.contiguous() : input;
}

// `t` in the memory layout of `like` (same shape, dense): grad_output must be read with the input's strides.
inline at::Tensor group_norm_same_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

inline void check_group_norm_args(const at::Tensor& input, int64_t num_groups,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 4 || input.dim() == 5,
              "group_norm: input must be 4-D (N, C, H, W) or 5-D (N, C, F, H, W), got ", input.dim(), "-D");
  TORCH_CHECK(input.numel() > 0, "group_norm: input must not be empty, got shape ", input.sizes());
  TORCH_CHECK(num_groups > 0 && input.size(1) % num_groups == 0, "group_norm: num_groups (", num_groups,
              ") must be positive and divide the channel count C=", input.size(1));
  for (const auto* param : {&weight, &bias}) {
    if (!param->has_value()) continue;
    const char* name = param == &weight ? "weight" : "bias";
    const at::Tensor& t = param->value();
    TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), "group_norm: ", name, " must have shape (C,)=(",
                input.size(1), ",), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == input.scalar_type(), "group_norm: ", name, " dtype ", t.scalar_type(),
                " must match input dtype ", input.scalar_type());
    TORCH_CHECK(t.device() == input.device(), "group_norm: ", name, " is on ", t.device(),
                " but input is on ", input.device());
  }
}

inline void check_group_norm_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                           const at::Tensor& mean, const at::Tensor& rstd,
                                           int64_t num_groups) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "group_norm_backward: grad_output shape ",
              grad_output.sizes(), " must equal input shape ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "group_norm_backward: grad_output dtype must match input dtype");
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->numel() == input.size(0) * num_groups,
                "group_norm_backward: mean/rstd must be float32 with N*num_groups elements");
  }
}

}  // namespace svd_fast
