// Shape/layout logic and argument checks shared by the CPU (csrc/group_norm.cpp) and CUDA
// (kernels/group_norm.cu) GroupNorm kernels, so both backends accept exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

#include <optional>

namespace svd_fast {

struct GroupNormGeometry {
  int64_t batch;               // N
  int64_t channels;            // C
  int64_t spatial;             // product of the dims after C (H*W or F*H*W)
  int64_t num_groups;          // G
  int64_t channels_per_group;  // C / G
  bool channels_last;          // memory is (N, spatial, C) rather than (N, C, spatial)
  c10::MemoryFormat memory_format;
};

// channels_last(_3d) only when the input is stored that way and not also plainly contiguous
// (a tensor with spatial size 1 is both, and the contiguous kernels are the simpler path).
inline GroupNormGeometry group_norm_geometry(const at::Tensor& input, int64_t num_groups) {
  GroupNormGeometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.spatial = input.numel() / (g.batch * g.channels);
  g.num_groups = num_groups;
  g.channels_per_group = g.channels / num_groups;
  g.memory_format = c10::MemoryFormat::Contiguous;
  g.channels_last = false;
  if (!input.is_contiguous()) {
    if (input.dim() == 4 && input.is_contiguous(c10::MemoryFormat::ChannelsLast)) {
      g.memory_format = c10::MemoryFormat::ChannelsLast;
      g.channels_last = true;
    } else if (input.dim() == 5 && input.is_contiguous(c10::MemoryFormat::ChannelsLast3d)) {
      g.memory_format = c10::MemoryFormat::ChannelsLast3d;
      g.channels_last = true;
    }
  }
  return g;
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
