// Shape checks and the memory layout shared by the CPU (csrc/edm_step.cpp) and CUDA
// (kernels/edm_step.cu) EDM step kernels, so both backends accept exactly the same inputs.
//
// Layout: every 5-D tensor (B, F, C, H, W) is read as B*F "slabs" of C*H*W elements. A slab must
// be contiguous, but the batch and frame strides are free: the two halves of the UNet's (2B, ...)
// output, frame-strided views and frame-broadcast conditioning latents (frame stride 0) are read
// in place, without copies. Anything else is made contiguous first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace svd_fast {

// Element strides of one slab-contiguous (B, F, C, H, W) tensor.
struct SlabStrides {
  int64_t batch;
  int64_t frame;
};

inline bool slab_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t dim = t.dim() - 1; dim >= 2; --dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
  }
  return true;
}

inline at::Tensor slab_view(const at::Tensor& t) { return slab_contiguous(t) ? t : t.contiguous(); }

inline SlabStrides slab_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

inline void check_latent(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 5, op, ": ", name, " must be 5-D (B, F, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " must not be empty, got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " dtype must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_same(const at::Tensor& x, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " shape ", t.sizes(), " must equal x shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_edm_euler_step_args(const at::Tensor& x, const at::Tensor& model_out_uncond,
                                      const std::optional<at::Tensor>& model_out_cond, double sigma,
                                      const std::optional<at::Tensor>& guidance) {
  constexpr const char* op = "edm_euler_step";
  check_latent(x, op, "x");
  check_same(x, model_out_uncond, op, "model_out_uncond");
  TORCH_CHECK(sigma > 0, op, ": sigma must be > 0, got ", sigma);
  if (!model_out_cond.has_value()) return;
  check_same(x, *model_out_cond, op, "model_out_cond");
  TORCH_CHECK(guidance.has_value(), op, ": guidance is required when model_out_cond is given");
  const at::Tensor& g = *guidance;
  TORCH_CHECK(g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == x.size(1), op,
              ": guidance must have shape (B, F)=(", x.size(0), ", ", x.size(1), "), got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat, op, ": guidance must be float32, got ", g.scalar_type());
  TORCH_CHECK(g.device() == x.device(), op, ": guidance is on ", g.device(), " but x is on ", x.device());
}

inline void check_edm_prepare_model_input_args(const at::Tensor& x, const at::Tensor& cond_latents,
                                               double sigma) {
  constexpr const char* op = "edm_prepare_model_input";
  check_latent(x, op, "x");
  check_latent(cond_latents, op, "cond_latents");
  TORCH_CHECK(cond_latents.size(0) == x.size(0) && cond_latents.size(1) == x.size(1) &&
                  cond_latents.size(3) == x.size(3) && cond_latents.size(4) == x.size(4),
              op, ": cond_latents must have shape (B, F, C_cond, H, W) matching x ", x.sizes(), " except C, got ",
              cond_latents.sizes());
  TORCH_CHECK(cond_latents.scalar_type() == x.scalar_type(), op, ": cond_latents dtype ",
              cond_latents.scalar_type(), " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(cond_latents.device() == x.device(), op, ": cond_latents is on ", cond_latents.device(),
              " but x is on ", x.device());
  TORCH_CHECK(sigma >= 0, op, ": sigma must be >= 0, got ", sigma);
}

// Host-side step coefficients in double (the kernels then compute in float32), the same formulas
// as svd_fast/reference/edm_step.py.
struct EulerCoefficients {
  double c_skip;
  double c_out;
  double step_ratio;  // (sigma_next - sigma) / sigma
};

inline EulerCoefficients euler_coefficients(double sigma, double sigma_next) {
  return {1.0 / (sigma * sigma + 1.0), -sigma / std::sqrt(sigma * sigma + 1.0), (sigma_next - sigma) / sigma};
}

inline double input_scale(double sigma) { return 1.0 / std::sqrt(sigma * sigma + 1.0); }

}  // namespace svd_fast
